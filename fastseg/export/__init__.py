"""fastseg.export."""
