"""TensorFlow, imported on first use and kept off every GPU.

Lazy so that importing `mcl_jax.augment`, or the rest of the project, never
needs TensorFlow; hidden from GPUs because JAX owns the devices.
"""

import functools


@functools.lru_cache(maxsize=None)
def tf():
  """Imports TensorFlow, keeping it off every GPU (JAX owns the devices)."""
  import tensorflow  # pylint: disable=g-import-not-at-top
  try:
    tensorflow.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # Devices were already initialised by someone else; nothing to hide then.
    pass
  return tensorflow
