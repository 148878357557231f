"""Tests, and the oracles they share (torch_reference, subprocess_runs)."""
