"""The fine-tuning state: TrainState, its creation and its abstract form.

A detector's state is its parameters, BatchNorm statistics, SGD momentum and
step count (no target network: that is the pretraining's). It is replicated
over the 'data' mesh of `mcl_jax.training.state.make_mesh`; the batch is
sharded over it.

A new state is the detector's initialisation (`model.init_variables`,
detectron2's inits for the fresh heads) with the pretrained parts loaded over
it (`pretrained.load_pretrained`: a pretraining workdir, 'none', or a
torchvision / detectron2 file). Loading reads files, so it runs on the host
between the jitted initialisation and the optimizer's.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


class TrainState(flax.struct.PyTreeNode):
  """Everything a fine-tuning run needs to continue."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def init_canvas(config) -> tuple[int, int]:
  """The canvas the detector is initialised on: the smallest (parameters do not depend on it)."""
  return tuple(min((tuple(int(v) for v in hw) for hw in config.data.canvas_sizes),
                   key=lambda hw: hw[0] * hw[1]))


def _init_variables(config, key):
  from mcl_jax.detection import model as model_lib  # pylint: disable=import-outside-toplevel
  net = model_lib.create_detector(config)
  variables = model_lib.init_variables(net, key, init_canvas(config))
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def initial_variables(config, source: str) -> tuple[dict, Any]:
  """Host (NumPy) variables of a new run: initialised, then `source` loaded over them.

  Returns:
    (variables {'params', 'batch_stats'}, the loader's report).
  """
  init = jax.jit(lambda k: _init_variables(config, k))
  # Every process initialises from the same seed, so the fresh heads agree.
  variables = jax.device_get(init(jax.random.key(config.seed)))
  if source == 'none':
    report = 'random init (detectron2 / Kaiming initialisation of every layer)'
  else:
    from mcl_jax.detection import pretrained  # pylint: disable=import-outside-toplevel
    variables, report = pretrained.load_pretrained(source, config, variables)
  variables = jax.tree.map(np.asarray, jax.device_get(variables))
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}, report


def create_train_state(variables: dict, tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh) -> TrainState:
  """The step-0 state of `variables` (host arrays), replicated over `mesh`."""
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(variables['params'], replicated)
  batch_stats = jax.device_put(variables['batch_stats'], replicated)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
  return TrainState(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state)


def abstract_train_state(config, tx: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """ShapeDtypeStructs of the state, replicated over `mesh` (for restoring; nothing computed)."""
  from mcl_jax.training import state as training_state  # pylint: disable=import-outside-toplevel

  def build(key):
    v = _init_variables(config, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=v['params'],
                      batch_stats=v['batch_stats'], opt_state=tx.init(v['params']))

  abstract = jax.eval_shape(build, jax.random.key(0))
  sharding = NamedSharding(mesh or training_state.make_mesh(), P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      abstract)


def apply_update(state: TrainState, grads, batch_stats,
                 tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """One optimizer step. Returns (next state, {'grad_norm', 'param_norm'})."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, {'grad_norm': optax.tree.norm(grads), 'param_norm': optax.tree.norm(params)}


def is_detector_config(config) -> bool:
  """Whether a run's saved config is a fine-tuning's (a detector) rather than a pretraining's."""
  return 'rpn' in config.get('model', {})


def load_variables(workdir: str, step: int | None = None) -> tuple[Any, dict]:
  """(config, {'params', 'batch_stats'}) of a fine-tuning run's checkpoint, for tools.

  Rebuilds the detector from the workdir's config.json and restores its newest
  complete checkpoint (or `step`) on the local devices.

  Raises:
    CheckpointError: no config.json, no checkpoint (of that step), or none readable.
  """
  from mcl_jax.detection import optim  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  config = checkpointing.check_readable(workdir, step)
  tx = optim.create_optimizer(config)
  manager = checkpointing.make_manager(workdir, config.keep_checkpoints, async_save=False,
                                       create=False)
  try:
    state, _ = checkpointing.restore_latest(manager, abstract_train_state(config, tx), step,
                                            quarantine_corrupt=False)
  finally:
    manager.close()
  if state is None:
    raise checkpointing.CheckpointError(
        f'no readable checkpoint in {checkpointing.checkpoint_dir(workdir)}')
  return config, {'params': state.params, 'batch_stats': state.batch_stats}
