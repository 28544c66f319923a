"""fastseg.engine."""
