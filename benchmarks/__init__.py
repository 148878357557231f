"""Benchmarks: the JAX train-step benchmark and the PyTorch reference step."""
