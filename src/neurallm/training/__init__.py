"""Training: the loop, optimizers and schedules, and the run directory's checkpoints."""
