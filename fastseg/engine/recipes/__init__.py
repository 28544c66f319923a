"""Multi-stage training procedures that do not fit the one-loss, one-optimiser loop of `fastseg.engine.trainer`."""
