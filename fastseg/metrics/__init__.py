"""fastseg.metrics."""
