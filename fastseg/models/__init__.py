"""fastseg.models."""
