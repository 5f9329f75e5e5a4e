"""What the training loop and the tools share: configuration and flags, run files and checkpoints, data, EMA, the
fast path, the samplers beyond the sheet's (DDIM, DPM-Solver++), generation, and the sample-quality metrics."""
