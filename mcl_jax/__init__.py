"""mcl_jax: MCL (Multi-Level Contrastive Learning for Dense Prediction Task) in JAX.

The subpackages are layers; each imports only those before it in this list:
`nn` (the network), `data` (stored images to augmented crops), `pretext`
(montages and the multi-level loss), `eval` (probes, export, pictures of a
set of variables), `training` (state, step, the loop, checkpoints).
The leaves any layer may use: `errors` (the bases of every user-facing
error), `cli` (a command's error line and exit status), `cli_flags`,
`console`, `config_validation`, `paths` (local and gs:// files),
`append_log` and `storage_checks`. The top-level `evaluate`, `dense_eval`,
`export` and `visualize` are the command lines (`python -m mcl_jax.X`);
`main.py` is the training one. tests/test_layers.py holds every module to
this order. The method as implemented is docs/METHOD.md.

`paths` is imported first: it fixes which storage clients handle gs:// paths
(etils epath and gcsfs read those settings once; see mcl_jax/paths.py).
"""

from mcl_jax import paths as _paths  # noqa: F401  pylint: disable=unused-import
