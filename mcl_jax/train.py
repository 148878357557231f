"""TrainState, optimizer, the sharded train step, and the training loop.

One `jax.jit` over a mesh with a 'data' axis: the batch is sharded, the state
replicated and donated. BatchNorm over the global jitted batch is already
synchronised across devices (SyncBN), and the loss's targets span the global
batch; only montage assembly runs per device (`jax.shard_map`).
"""

import functools
import math
import signal
from typing import Any

from absl import logging
import flax
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mcl_jax import augment, checkpointing, config_validation, logs, montage
from mcl_jax import model as model_lib


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue: online and target networks, optimizer."""
  step: jax.Array
  params: Any
  batch_stats: Any
  target_params: Any
  target_batch_stats: Any
  opt_state: Any


class NonFiniteError(FloatingPointError):
  """A NaN or Inf in the loss or the gradient norm."""


# ---------------------------------------------------------------- schedules --

def total_steps(config) -> int:
  """optim.num_steps, or num_epochs of the training set at global_batch."""
  if config.optim.num_steps:
    return int(config.optim.num_steps)
  from mcl_jax import input_pipeline  # late: needs TensorFlow only for counting
  per_epoch = input_pipeline.steps_per_epoch(config.data, config.optim.global_batch)
  return int(config.optim.num_epochs * per_epoch)


def peak_lr(config) -> float:
  return config.optim.base_lr * config.optim.global_batch / 256


def lr_schedule(config, num_steps: int) -> optax.Schedule:
  """Linear warm-up from warmup_ratio x lr, then cosine decay to min_lr."""
  o, lr = config.optim, peak_lr(config)
  warmup = min(o.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=lr * o.warmup_ratio, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=min(o.min_lr, lr))


def ema_momentum(step, num_steps: int, base: float):
  """m = 1 - (1 - base) (cos(pi t / T) + 1) / 2: from base to 1 over the run."""
  t = jnp.asarray(step, jnp.float32) / max(num_steps, 1)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * t) + 1.0) / 2.0


def decay_mask(params):
  """True for weights that get weight decay and LARS adaptation.

  Kernels only: BatchNorm scales/biases and all biases are excluded, as in
  the reference's paramwise options.
  """
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config, num_steps: int) -> optax.GradientTransformation:
  o = config.optim
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.lars(lr_schedule(config, num_steps), weight_decay=o.weight_decay,
                 weight_decay_mask=decay_mask, trust_coefficient=o.trust_coefficient,
                 trust_ratio_mask=decay_mask, momentum=o.momentum))


# -------------------------------------------------------------------- state --

def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default)."""
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  # Auto axes: the partitioner propagates shardings (GSPMD) from the inputs.
  return jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def layout_for(config) -> montage.Layout:
  return montage.make_layout(config.montage, config.data.image_size,
                             len(config.loss.level_weights))


def create_train_state(config, key, num_steps: int | None = None) -> TrainState:
  """Initial state: Kaiming-initialised online network, target = its copy."""
  net = model_lib.create_model(config)
  variables = model_lib.init_variables(net, layout_for(config), key, config.data.image_size)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  tx = create_optimizer(config, num_steps or 1)
  supervised = config.objective == 'supervised'
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      target_params={} if supervised else model_lib.encoder_subtree(params),
      target_batch_stats={} if supervised else model_lib.encoder_subtree(batch_stats),
      opt_state=tx.init(params))


def abstract_train_state(config, mesh=None):
  """ShapeDtypeStructs of the state, replicated over `mesh` (for restoring)."""
  abstract = jax.eval_shape(lambda k: create_train_state(config, k), jax.random.key(0))
  sharding = NamedSharding(mesh or make_mesh(), P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      abstract)


# --------------------------------------------------------------- train step --

def make_train_step(config, mesh, num_steps: int):
  """The jitted train step: (state, crops uint8) -> (state, metrics).

  crops: [global_batch, num_crops, S, S, 3] uint8, sharded over 'data'.
  Per-step randomness (augmentation, montage) is fold_in(seed key, step), so
  a resumed run draws exactly what an uninterrupted one would.
  """
  net = model_lib.create_model(config)
  layout = layout_for(config)
  tx = create_optimizer(config, num_steps)
  schedule = lr_schedule(config, num_steps)
  base_key = jax.random.key(config.seed)
  supervised = config.objective == 'supervised'

  def step_fn(state: TrainState, crops_u8, labels):
    key = jax.random.fold_in(base_key, state.step)
    aug_key, montage_key = jax.random.split(key)
    crops = augment.augment_crops(crops_u8, aug_key, config.augment, config.data.num_crops)

    def loss_fn(params):
      if supervised:
        return model_lib.supervised_loss_fn(
            net, params, state.batch_stats, crops, labels, montage_key, layout,
            level_weights=config.loss.level_weights,
            label_smoothing=config.loss.label_smoothing, mesh=mesh,
            downsample=config.montage.downsample)
      return model_lib.mcl_loss_fn(
          net, params, state.batch_stats,
          {'params': state.target_params, 'batch_stats': state.target_batch_stats},
          crops, montage_key, layout, tau=config.loss.tau,
          level_weights=config.loss.level_weights, mesh=mesh,
          downsample=config.montage.downsample,
          target_whole_crops_only=config.model.target_whole_crops_only)

    (loss, (metrics, batch_stats, target_bs)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    m = ema_momentum(state.step, num_steps, config.optim.ema_base_momentum)
    if supervised:
      target_params = state.target_params
    else:
      # The target follows the online parameters (not BN statistics) after every step.
      target_params = optax.incremental_update(
          model_lib.encoder_subtree(params), state.target_params, 1.0 - m)
    metrics = dict(metrics, lr=schedule(state.step), target_momentum=m,
                   grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           target_params=target_params, target_batch_stats=target_bs,
                           opt_state=opt_state)
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P('data'))
  return jax.jit(step_fn, in_shardings=(replicated, sharded, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


# --------------------------------------------------------------------- loop --

class _StopSignal:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _check_finite(metrics: dict, step: int):
  for name in ('loss', 'grad_norm'):
    if not math.isfinite(float(metrics[name])):
      raise NonFiniteError(
          f'{name} is {float(metrics[name])} at step {step}: stopping. The last good '
          'checkpoint is kept; lower the learning rate or check the data.')


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) pretraining in `workdir`. Returns the last metrics."""
  from mcl_jax import input_pipeline  # late: pulls in TensorFlow
  config_validation.validate(config, jax.device_count(), jax.process_count())
  checkpointing.check_workdir(workdir)
  checkpointing.check_compatible(workdir, config)
  logging.info('Process %d/%d, local devices %s, global devices %d',
               jax.process_index(), jax.process_count(), jax.local_devices(),
               jax.device_count())
  mesh = make_mesh()
  num_steps = total_steps(config)
  state_sharding = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))

  manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
  abstract = abstract_train_state(config, mesh)
  state, start = checkpointing.restore_latest(manager, abstract)
  if state is None:
    init = jax.jit(functools.partial(create_train_state, config, num_steps=num_steps),
                   out_shardings=state_sharding)
    state, start = init(jax.random.key(config.seed)), 0
    checkpointing.save_config(workdir, config)
    logging.info('Starting a new run: %d steps.', num_steps)
  else:
    logging.info('Resumed from the checkpoint of step %d.', start)

  train_step = make_train_step(config, mesh, num_steps)
  data = input_pipeline.create_train_iterator(
      config.data, global_batch=config.optim.global_batch, seed=config.seed,
      start_step=start)
  writer = logs.MetricWriter(workdir, num_steps, config.optim.global_batch)
  last = {}
  pending = None  # (step, metrics) of the step in flight: checked one step late
  with _StopSignal() as stop:
    for step in range(start, num_steps):
      batch = input_pipeline.to_global_batch(next(data), batch_sharding)
      if step == start == 0 and config.montage_png:
        logs.write_montage_png(config, batch['crops'], workdir)
      state, metrics = train_step(state, batch['crops'], batch['label'])
      if pending is not None:
        last = _finish_step(*pending, writer, config)
      pending = (step, metrics)
      done = step + 1
      if stop.received or done % config.checkpoint_every == 0 or done == num_steps:
        last = _finish_step(*pending, writer, config)
        pending = None
        checkpointing.save(manager, done, state, force=True)
      if stop.received:
        logging.warning('%s received: saved the checkpoint of step %d, exiting.',
                        stop.received, done)
        break
    if pending is not None:
      last = _finish_step(*pending, writer, config)
  manager.wait_until_finished()
  manager.close()
  writer.close()
  if config.eval_knn_at_end and not stop.received and jax.process_index() == 0:
    last.update(_final_eval(config, state))
  return last


def _finish_step(step: int, metrics, writer, config) -> dict:
  """Fetches a step's metrics, stops on non-finite values, logs."""
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  _check_finite(host, step)
  writer.write(step + 1, host, console=(step + 1) % config.log_every == 0 or step == 0)
  return host


def _final_eval(config, state) -> dict:
  """kNN on held-out data before (random init) and after pretraining."""
  from mcl_jax import evaluate  # late: evaluation pulls in scikit-learn
  trained = {'params': state.params, 'batch_stats': state.batch_stats}
  result = evaluate.evaluate_variables(config, trained, compare_random_init=True)
  logging.info('Evaluation: %s', result)
  print(evaluate.format_table(result), flush=True)
  return {f'eval_{k}': v for k, v in result.items() if isinstance(v, (int, float))}

