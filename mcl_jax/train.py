"""TrainState, optimizer, the sharded train step, and the training loop.

One `jax.jit` over a mesh with a 'data' axis: the batch is sharded, the state
replicated and donated. BatchNorm over the global jitted batch is already
synchronised across devices (SyncBN), and the loss's targets span the global
batch; only montage assembly runs per device (`jax.shard_map`).
"""

import functools
import math
import os
import signal
from typing import Any

from absl import logging
import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
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
  """Turns SIGTERM / SIGINT into a stop request that the loop acts on between steps.

  The loop asks `should_stop(step)` after every step, on every process; when
  it says yes, the loop checkpoints that step and returns normally (exit
  status 0). A second signal of the same kind gets the previous handler back
  and re-delivers the signal (Ctrl-C twice stops at once, without a save).

  With several processes all of them must stop at the same step (the save is
  collective). SIGTERM, the preemption notice of TPU VMs, SLURM and
  Kubernetes, is left to JAX's preemption notifier that
  `jax.distributed.initialize` installs; `reached_preemption_sync_point`
  then agrees on a step with every process through the coordination service,
  on the host, without device work per step. SIGINT is forwarded to it as a
  SIGTERM of this process. Without the preemption service the processes
  combine their local flags with a `process_allgather` every step.
  """

  def __init__(self, num_processes: int = 1):
    self.received = None
    self._old = {}
    self._multi = num_processes > 1
    self._preemption = False

  def __enter__(self):
    signals = (signal.SIGTERM, signal.SIGINT)
    if self._multi:
      from jax._src import distributed  # pylint: disable=g-import-not-at-top
      self._preemption = distributed.global_state.preemption_sync_manager is not None
      if self._preemption:
        signals = (signal.SIGINT,)  # SIGTERM stays with JAX's preemption notifier
    for sig in signals:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received == name:  # the second one: the previous behaviour, now
      old = self._old.pop(signum, signal.SIG_DFL)
      signal.signal(signum, old)
      if callable(old):
        old(signum, frame)
      else:
        os.kill(os.getpid(), signum)
      return
    self.received = name
    if self._multi and self._preemption and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier: every process stops

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; every process must call it."""
    if not self._multi:
      return self.received is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if self._preemption:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return bool(np.any(np.asarray(flags)))

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


# Metrics that must be finite for a step's state to be kept: the loss and the
# gradient norm of the step, and the norm of the parameters it produced (an
# overflowing update can give finite gradients but Inf parameters).
FINITE_METRICS = ('loss', 'grad_norm', 'param_norm')


def _check_finite(metrics: dict, step: int, last_checkpoint: int | None = None):
  """Raises NonFiniteError if a FINITE_METRICS value of `step` (1-based) is NaN/Inf."""
  bad = [n for n in FINITE_METRICS if n in metrics and not math.isfinite(float(metrics[n]))]
  if bad:
    values = ', '.join(f'{n}={float(metrics[n])}' for n in FINITE_METRICS if n in metrics)
    kept = ('no checkpoint was written yet' if last_checkpoint is None else
            f'the last good checkpoint (step {last_checkpoint}) is kept')
    raise NonFiniteError(
        f'{", ".join(bad)} not finite at step {step} ({values}): stopping before '
        f'anything of this step is saved; {kept}. Lower the learning rate or check '
        'the data.')


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) pretraining in `workdir`. Returns the last metrics.

  Order of the checks, all before anything is compiled: the config
  (config_validation), the workdir (created, writable), and a saved
  config.json of another model shape (refused). Then the newest readable
  checkpoint is restored (unreadable ones are skipped, see
  checkpointing.restore_latest) and metrics.jsonl is cut back to its step.

  Every process of a multi-process run calls this with the same arguments;
  process 0 alone writes config.json and metrics, all of them save.
  """
  from mcl_jax import input_pipeline  # late: pulls in TensorFlow
  config_validation.validate(config, jax.device_count(), jax.process_count())
  if config.objective == 'supervised':
    try:  # an unlabelled source, or too few classes: one clear error
      input_pipeline.require_labels(config.data)
    except input_pipeline.DatasetNotFoundError:
      raise
    except ValueError as e:
      raise config_validation.ConfigError(str(e)) from e
  checkpointing.check_workdir(workdir)
  checkpointing.check_compatible(workdir, config)
  logging.info('Process %d/%d, local devices %s, global devices %d',
               jax.process_index(), jax.process_count(), jax.local_devices(),
               jax.device_count())
  mesh = make_mesh()
  num_steps = total_steps(config)
  state_sharding = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))

  with _StopSignal(jax.process_count()) as stop:
    manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
    try:
      return _run(config, workdir, manager, stop, mesh, num_steps, state_sharding,
                  batch_sharding, input_pipeline)
    finally:
      # Also on errors (a non-finite step, an interrupt): a save in flight is
      # of a state that passed its checks; finish it rather than leave a tmp dir.
      manager.wait_until_finished()
      manager.close()


def _run(config, workdir, manager, stop, mesh, num_steps, state_sharding, batch_sharding,
         input_pipeline) -> dict:
  abstract = abstract_train_state(config, mesh)
  state, start = checkpointing.restore_latest(manager, abstract)
  if state is None:
    init = jax.jit(functools.partial(create_train_state, config, num_steps=num_steps),
                   out_shardings=state_sharding)
    state, start = init(jax.random.key(config.seed)), 0
    checkpointing.save_config(workdir, config)
    logging.info('Starting a new run: %d steps.', num_steps)
  else:
    if not os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
      checkpointing.save_config(workdir, config)
    logging.info('Resumed from the checkpoint of step %d.', start)
  # Steps after `start` are trained (and logged) again: drop their old lines.
  checkpointing.truncate_metrics(workdir, start)
  last_saved = start if start else None

  train_step = make_train_step(config, mesh, num_steps)
  data = input_pipeline.create_train_iterator(
      config.data, global_batch=config.optim.global_batch, seed=config.seed,
      start_step=start)
  writer = logs.MetricWriter(workdir, num_steps, config.optim.global_batch)
  last = {}
  stopped = False
  pending = None  # (step, metrics) of the step in flight: checked one step late
  try:
    for step in range(start, num_steps):
      batch = input_pipeline.to_global_batch(next(data), batch_sharding)
      if step == start == 0 and config.montage_png:
        logs.write_montage_png(config, batch['crops'], workdir)
      state, metrics = train_step(state, batch['crops'], batch['label'])
      if pending is not None:
        last = _finish_step(*pending, writer, config, last_saved)
      pending = (step, metrics)
      done = step + 1
      stopped = stop.should_stop(step)
      if stopped or done % config.checkpoint_every == 0 or done == num_steps:
        # The state of step `done` is saved only after its metrics passed
        # _check_finite: a non-finite state is never checkpointed.
        last = _finish_step(*pending, writer, config, last_saved)
        pending = None
        checkpointing.save(manager, done, state, force=True)
        last_saved = done
      if stopped:
        logging.warning('%s: saved the checkpoint of step %d, exiting.',
                        f'{stop.received} received' if stop.received
                        else 'Preemption notice', done)
        print(f'Stopped after step {done} ({stop.received or "preemption notice"}); '
              f'checkpoint saved. Rerun the same command to resume.', flush=True)
        break
    if pending is not None:
      last = _finish_step(*pending, writer, config, last_saved)
  finally:
    writer.close()
  manager.wait_until_finished()
  if config.eval_knn_at_end and not stopped and jax.process_index() == 0:
    last.update(_final_eval(config, state))
  return last


def _finish_step(step: int, metrics, writer, config, last_saved=None) -> dict:
  """Fetches a step's metrics, stops on non-finite values, logs."""
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  _check_finite(host, step + 1, last_saved)
  writer.write(step + 1, host, console=(step + 1) % config.log_every == 0 or step == 0)
  return host


def _final_eval(config, state) -> dict:
  """kNN on held-out data before (random init) and after pretraining."""
  from mcl_jax import evaluate  # late: evaluation pulls in scikit-learn
  # Host copies: the state is replicated over every process's devices, and
  # process 0 evaluates alone on its own devices.
  local = lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x
  trained = jax.tree.map(local, {'params': state.params, 'batch_stats': state.batch_stats})
  result = evaluate.evaluate_variables(config, trained, compare_random_init=True)
  logging.info('Evaluation: %s', result)
  print(evaluate.format_table(result), flush=True)
  return {f'eval_{k}': v for k, v in result.items() if isinstance(v, (int, float))}
