"""Training: loss, optimizers, metrics, sharded train step, checkpoints, loop."""
