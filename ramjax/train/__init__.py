"""Training: the loop, optimiser, sharding, checkpoints and metrics."""
