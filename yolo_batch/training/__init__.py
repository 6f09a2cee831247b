"""Training: the AutoBatch decision (memory-filling), what a batch implies, and the training run."""
