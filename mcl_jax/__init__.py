"""MCL pretraining in JAX/Flax.

`paths` is imported first: it fixes which storage clients handle gs:// paths
(etils epath and gcsfs read those settings once, see mcl_jax/paths.py).
"""

from mcl_jax import paths as _paths  # pylint: disable=unused-import
