"""Training: the loss, the optimiser and its schedule, the one loop (`fit`), the CUDA-graph step and checkpoints."""
