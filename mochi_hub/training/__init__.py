"""Pretraining: `train()`'s loop, its checkpoints and the run directory."""
