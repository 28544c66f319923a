"""fastseg.data."""
