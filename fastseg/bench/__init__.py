"""fastseg.bench."""
