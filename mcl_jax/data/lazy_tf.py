"""TensorFlow, imported on first use and kept off every accelerator.

Lazy so that importing `mcl_jax.data.augment`, or the rest of the project,
never needs TensorFlow; hidden from GPUs and TPUs because JAX owns the
devices (TensorFlow only runs tf.data here).
"""

import functools


@functools.lru_cache(maxsize=None)
def tf():
  """Imports TensorFlow, keeping it off every GPU and TPU (JAX owns the devices)."""
  import tensorflow  # pylint: disable=g-import-not-at-top
  for kind in ('GPU', 'TPU'):
    try:
      if tensorflow.config.list_physical_devices(kind):
        tensorflow.config.set_visible_devices([], kind)
    except RuntimeError:
      # Devices were already initialised by someone else; nothing to hide then.
      pass
  return tensorflow
