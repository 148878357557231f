"""configs/test_tiny.py with dotted overrides, for the tests that build a config in process."""

from configs import test_tiny


def tiny_config(**overrides):
  """test_tiny's config with `{'optim.global_batch': 64, ...}` set (dotted paths)."""
  c = test_tiny.get_config()
  for dotted, value in overrides.items():
    node = c
    *path, leaf = dotted.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return c
