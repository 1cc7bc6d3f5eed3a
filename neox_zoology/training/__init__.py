"""Training: the DeepSpeed engine, the loop, checkpoints, metrics and the command line."""
