"""Training runtime: data, the epoch loop, checkpoints."""
