"""fastseg.layers."""
