"""Tests, and the helpers they share (subprocess_runs, imagenet_archives)."""
