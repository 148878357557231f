"""The train state and what changes it: TrainState, its creation, the update.

Owns:
  * `TrainState`: online params and batch_stats, target params and
    batch_stats, optimizer state and step;
  * the step count of a run (`total_steps`) and the target's EMA momentum
    schedule (the optimizer is optim.py's);
  * creating the state, concrete (`create_train_state`) or abstract for
    restoring (`abstract_train_state`), and the device mesh it lives on;
  * `apply_update`: one optimizer step plus the EMA of the target, the part
    of the train step after the gradients.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mcl_jax.nn import model as model_lib
from mcl_jax.pretext import montage


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue: online and target networks, optimizer."""
  step: jax.Array
  params: Any
  batch_stats: Any
  target_params: Any
  target_batch_stats: Any
  opt_state: Any


def total_steps(config, num_examples: int) -> int:
  """optim.num_steps, or num_epochs of `num_examples` images at global_batch.

  Args:
    config: the run's config.
    num_examples: training examples (`DataSource.num_examples`); only the
      epoch count needs it. Partial batches are dropped, as the stream does.
  """
  if config.optim.num_steps:
    return int(config.optim.num_steps)
  per_epoch = int(num_examples) // int(config.optim.global_batch)
  return int(config.optim.num_epochs * per_epoch)


def ema_momentum(step, num_steps: int, base: float):
  """m = 1 - (1 - base) (cos(pi t / T) + 1) / 2: from base to 1 over the run."""
  t = jnp.asarray(step, jnp.float32) / max(num_steps, 1)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * t) + 1.0) / 2.0


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh with a 'data' axis over the first `num_devices` devices (all by default)."""
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  # Auto axes: the partitioner propagates shardings (GSPMD) from the inputs.
  return jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def create_train_state(config, key, tx: optax.GradientTransformation) -> TrainState:
  """Initial state: Kaiming-initialised online network, target = its copy."""
  net = model_lib.create_model(config)
  variables = model_lib.init_variables(net, montage.layout_for(config), key,
                                       config.data.image_size)
  params, batch_stats = variables['params'], variables['batch_stats']
  supervised = config.objective == 'supervised'
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      target_params={} if supervised else model_lib.encoder_subtree(params),
      target_batch_stats={} if supervised else model_lib.encoder_subtree(batch_stats),
      opt_state=tx.init(params))


def abstract_train_state(config, tx: optax.GradientTransformation, mesh=None):
  """ShapeDtypeStructs of the state, replicated over `mesh` (for restoring)."""
  abstract = jax.eval_shape(lambda k: create_train_state(config, k, tx), jax.random.key(0))
  sharding = NamedSharding(mesh or make_mesh(), P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      abstract)


def apply_update(state: TrainState, grads, batch_stats, target_batch_stats,
                 tx: optax.GradientTransformation, num_steps: int,
                 ema_base_momentum: float) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of the online network, then the EMA of the target.

  Args:
    state: the state the gradients were taken at.
    grads: gradients of the loss with respect to `state.params`.
    batch_stats, target_batch_stats: the BatchNorm statistics the loss's
      forward passes produced (the target's are {} for the supervised objective).
    tx: the optimizer.
    num_steps: length of the run (the EMA momentum schedule spans it).
    ema_base_momentum: the target momentum at step 0.

  Returns:
    (the state of the next step, {'target_momentum', 'grad_norm', 'param_norm'}).
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  m = ema_momentum(state.step, num_steps, ema_base_momentum)
  target_params = state.target_params
  if target_params:  # the supervised objective has no target
    # The target follows the online parameters (not BN statistics) after every step.
    target_params = optax.incremental_update(
        model_lib.encoder_subtree(params), target_params, 1.0 - m)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         target_params=target_params, target_batch_stats=target_batch_stats,
                         opt_state=opt_state)
  metrics = {'target_momentum': m, 'grad_norm': optax.tree.norm(grads),
             'param_norm': optax.tree.norm(params)}
  return new_state, metrics
