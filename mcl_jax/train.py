"""The sharded train step and the training loop (start, resume, stop, evaluate).

One `jax.jit` over a mesh with a 'data' axis: the batch is sharded, the state
replicated and donated. BatchNorm over the global jitted batch is already
synchronised across devices (SyncBN), and the loss's targets span the global
batch; only montage assembly runs per device (`jax.shard_map`). The state and
its update are state.py's, the batch loss objective.py's.
"""

import dataclasses
import functools
import math
import os
import signal
import socket
import threading

from absl import logging
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mcl_jax import augment, checkpointing, cli, config_validation, device_crops, logs
from mcl_jax import memory, montage, objective, paths
from mcl_jax import model as model_lib
from mcl_jax import state as state_lib
from mcl_jax import visualize


class NonFiniteError(FloatingPointError):
  """A NaN or Inf in the loss or the gradient norm."""


def make_train_step(config, mesh, tx: optax.GradientTransformation, num_steps: int):
  """The jitted train step: (state, images, labels) -> (state, metrics).

  images: `device_crops.step_images(batch, config.data.crop_on)`, sharded
  over 'data': with crop_on='host' the uint8 crops [global_batch, num_crops,
  S, S, 3]; with 'device' the dict of padded buffers, valid sizes and crop
  windows, cut into those crops first thing in the step.
  labels: [global_batch] int (read by the supervised objective only).
  Per-step randomness (augmentation, montage) is fold_in(seed key, step), so
  a resumed run draws exactly what an uninterrupted one would.
  """
  loss_fn = objective.batch_loss_fn(config, model_lib.create_model(config),
                                    montage.layout_for(config), mesh)
  schedule = state_lib.lr_schedule(config, num_steps)
  base_key = jax.random.key(config.seed)

  def step_fn(state: state_lib.TrainState, images, labels):
    key = jax.random.fold_in(base_key, state.step)
    aug_key, montage_key = jax.random.split(key)
    crops_u8 = device_crops.crops_of(images, config.data)
    crops = augment.augment_crops(crops_u8, aug_key, config.augment, config.data.num_crops)
    (_, (metrics, batch_stats, target_bs)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params, state, crops, labels, montage_key)
    new_state, update_metrics = state_lib.apply_update(
        state, grads, batch_stats, target_bs, tx, num_steps, config.optim.ema_base_momentum)
    return new_state, dict(metrics, lr=schedule(state.step), **update_metrics)

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

  Python runs signal handlers only between bytecodes, so a signal that comes
  during a long XLA compile would wait for it. The handlers' C side also
  writes the signal number to a wake-up socket (`signal.set_wakeup_fd`),
  and a thread reading it acknowledges the signal at once.
  """

  def __init__(self, num_processes: int = 1):
    self.received = None
    self._old = {}
    self._multi = num_processes > 1
    self._preemption = False
    self._wakeup = None  # (reader, writer, previous wake-up fd)

  def __enter__(self):
    signals = (signal.SIGTERM, signal.SIGINT)
    if self._multi:
      # jax.distributed.initialize starts the preemption service unless this
      # (public) option turned it off.
      self._preemption = bool(jax.config.jax_enable_preemption_service)
      if self._preemption:
        signals = (signal.SIGINT,)  # SIGTERM stays with JAX's preemption notifier
    for sig in signals:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    if self._old:
      self._start_acknowledging()
    return self

  def _start_acknowledging(self):
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
      previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:
      reader.close()
      writer.close()
      return
    self._wakeup = (reader, writer, previous)
    threading.Thread(target=self._acknowledge, args=(reader, set(self._old)),
                     name='mcl-signal-ack', daemon=True).start()

  @staticmethod
  def _acknowledge(reader, watched):
    """Says at once what a stop signal will do (runs until the writer closes)."""
    counts = {}
    while True:
      try:
        data = reader.recv(64)
      except OSError:
        return
      if not data:
        reader.close()
        return
      for signum in data:
        if signum not in watched:
          continue
        counts[signum] = n = counts.get(signum, 0) + 1
        name = signal.Signals(signum).name
        again = 'press Ctrl-C again' if signum == signal.SIGINT else f'send {name} again'
        if n == 1:
          logging.info('%s received: stopping after the current step and saving it '
                       '(the first step includes compiling); %s to quit without saving.',
                       name, again)
        elif n == 2:
          logging.info('%s received again: quitting without saving.', name)

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
    if self._wakeup is not None:
      _, writer, previous = self._wakeup
      signal.set_wakeup_fd(previous)
      writer.close()  # the acknowledging thread sees the end and exits
      self._wakeup = None


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


LOG_FILE = 'train.log'


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) pretraining in `workdir`. Returns the last metrics.

  Order of the checks, all before anything is compiled and before the
  workdir is created: the config (config_validation), the data source (a
  missing dataset or folder fails here; tfds data is prepared here when
  data.tfds_download_and_prepare asks for it), and a saved config.json of
  another model shape (refused). Then the workdir is created (and checked
  writable), the log file opened in it, and the newest readable checkpoint
  restored (unreadable ones are skipped, see checkpointing.restore_latest);
  metrics.jsonl is cut back to its step. A workdir this call created is
  removed again if the run fails before its first step is logged.

  Every process of a multi-process run calls this with the same arguments;
  process 0 alone writes config.json and metrics, all of them save.
  """
  config_validation.validate(config, jax.device_count(), jax.process_count())
  _check_data(config)
  paths.check_supported(workdir)
  created = not paths.exists(workdir)
  checkpointing.check_workdir(workdir)
  checkpointing.check_compatible(workdir, config)
  try:
    _open_log_file(workdir)
    num_steps = state_lib.total_steps(config)
    run = _Run(config, workdir, state_lib.make_mesh(), num_steps,
               state_lib.create_optimizer(config, num_steps))
    with _StopSignal(jax.process_count()) as stop:
      manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
      try:
        return _run(run, manager, stop)
      finally:
        # Also on errors (a non-finite step, an interrupt): a save in flight is
        # of a state that passed its checks; finish it rather than leave a tmp dir.
        manager.wait_until_finished()
        manager.close()
  except BaseException:
    if created:
      _remove_unstarted(workdir)
    raise


def _check_data(config):
  """Opens the configured data source, so that missing data fails before any set-up.

  Raises:
    DatasetNotFoundError: the data is missing (the message says what to provide).
    ConfigError: an unknown data.source, or an unlabelled source for the
      supervised objective.
  """
  from mcl_jax import input_pipeline  # late: pulls in TensorFlow
  from mcl_jax.data import tfds as tfds_source  # pylint: disable=g-import-not-at-top
  try:
    spec = input_pipeline.DataSpec.from_config(config.data)
    input_pipeline.source_for(spec)
  except ValueError as e:
    raise config_validation.ConfigError(str(e)) from e
  if spec.source == 'tfds':
    tfds_source.builder(spec)  # prepares the dataset if tfds_download_and_prepare
  else:
    input_pipeline.num_train_examples(spec)  # digits: loads; folder: scans (cached)
  if config.objective == 'supervised':
    try:  # an unlabelled source, or too few classes: one clear error
      input_pipeline.require_labels(config.data)
    except input_pipeline.DatasetNotFoundError:
      raise
    except ValueError as e:
      raise config_validation.ConfigError(str(e)) from e


def _open_log_file(workdir: str):
  """WORKDIR/train.log (train.<process>.log beyond process 0), if the CLI logs."""
  name = LOG_FILE if jax.process_index() == 0 else f'train.{jax.process_index()}.log'
  if jax.process_index() == 0:
    paths.remove_leftover_parts(workdir)  # of appends cut short by a kill (gs://)
  cli.log_to_file(paths.join(workdir, name))


def _remove_unstarted(workdir: str):
  """Removes a workdir this run created, if nothing of a step was written to it."""
  metrics = paths.join(workdir, logs.METRICS_FILE)
  if (jax.process_index() != 0 or checkpointing.latest_steps(workdir)
      or (paths.exists(metrics) and paths.getsize(metrics) > 0)):
    return
  cli.close_log_file()
  try:
    paths.rmtree(workdir)
  except OSError:
    pass


@dataclasses.dataclass(frozen=True)
class _Run:
  """What stays fixed over a run: its config, workdir, mesh, length and optimizer."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  num_steps: int
  tx: optax.GradientTransformation


def _restore_or_init(run: _Run, manager):
  """The newest readable checkpoint's state and step, or a new state at step 0."""
  config, workdir = run.config, run.workdir
  replicated = NamedSharding(run.mesh, P())
  state, start = checkpointing.restore_latest(
      manager, state_lib.abstract_train_state(config, run.tx, run.mesh))
  if state is None:
    init = jax.jit(functools.partial(state_lib.create_train_state, config, tx=run.tx),
                   out_shardings=replicated)
    state, start = init(jax.random.key(config.seed)), 0
    checkpointing.save_config(workdir, config)
    logging.info('==> Starting a new run: %d steps of %d images, a checkpoint every %d '
                 'steps.', run.num_steps, config.optim.global_batch, config.checkpoint_every)
  else:
    if not paths.exists(paths.join(workdir, checkpointing.CONFIG_FILE)):
      checkpointing.save_config(workdir, config)
    if start >= run.num_steps:
      logging.info('==> Already finished at step %d (of %d): nothing to train.', start,
                   run.num_steps)
    else:
      logging.info('==> Resumed from the checkpoint of step %d. %d of %d steps to go.',
                   start, run.num_steps - start, run.num_steps)
  return state, start


def _run(run: _Run, manager, stop: _StopSignal) -> dict:
  from mcl_jax import input_pipeline  # late: pulls in TensorFlow
  config, num_steps = run.config, run.num_steps
  _log_where(run.workdir)
  state, start = _restore_or_init(run, manager)
  if start >= num_steps:
    return _already_finished(run, state)
  # Steps after `start` are trained (and logged) again: drop their old lines.
  logs.truncate_metrics(run.workdir, start)
  last_saved = start if start else None

  train_step = make_train_step(config, run.mesh, run.tx, num_steps)
  batch_sharding = NamedSharding(run.mesh, P('data'))
  data = input_pipeline.create_train_iterator(
      config.data, global_batch=config.optim.global_batch, seed=config.seed,
      start_step=start)
  writer = logs.MetricWriter(run.workdir, num_steps, config.optim.global_batch)
  last = {}
  stopped = False
  pending = None  # (step, metrics) of the step in flight: checked one step late
  try:
    for step in range(start, num_steps):
      batch = input_pipeline.to_global_batch(next(data), batch_sharding)
      images = device_crops.step_images(batch, config.data.crop_on)
      if step == start == 0 and config.montage_png:
        visualize.write_montage_png(config, device_crops.crops_of(images, config.data),
                                    paths.join(run.workdir, 'montage.png'))
      if step == start:
        # The first call compiles. XLA's "Very slow compile?" alarm, printed
        # from C++ on a busy CPU, goes to the log file, not the console.
        logging.info('Compiling the train step (the first step; minutes on a CPU)...')
        with cli.native_stderr_to_log('xla'):
          # Compiled ahead of time: its memory is checked before it runs.
          train_step = train_step.lower(state, images, batch['label']).compile()
        memory.check_step_fits(train_step, config, run.mesh)
        state, metrics = train_step(state, images, batch['label'])
      else:
        state, metrics = train_step(state, images, batch['label'])
      if pending is not None:
        last = _finish_step(*pending, writer, config, last_saved)
      pending = (step, metrics)
      done = step + 1
      stopped = stop.should_stop(step)
      if stopped or done % config.checkpoint_every == 0 or done == num_steps:
        # The state of step `done` is saved only after its metrics passed
        # _check_finite: a non-finite state is never checkpointed; and only
        # once its metrics line is durable (gs:// uploads logs in batches).
        last = _finish_step(*pending, writer, config, last_saved)
        pending = None
        writer.flush()
        checkpointing.save(manager, done, state, force=True)
        logging.info('checkpoint of step %d -> %s', done,
                     paths.join(checkpointing.checkpoint_dir(run.workdir), str(done)))
        cli.flush_log_file()
        last_saved = done
      else:
        cli.flush_log_file(force=False)
      if stopped:
        logging.info('Stopped after step %d (%s); checkpoint saved. Rerun the same '
                     'command to resume.', done, stop.received or 'preemption notice')
        break
    if pending is not None:
      last = _finish_step(*pending, writer, config, last_saved)
  finally:
    writer.close()
  manager.wait_until_finished()
  if config.eval_knn_at_end and not stopped and jax.process_index() == 0:
    last.update(_final_eval(config, state))
  return last


def _log_where(workdir: str):
  """The start-up line: where the checkpoints, the log and TensorBoard's scalars go."""
  log = cli.log_file()
  logging.info('workdir: %s (checkpoints/, metrics.jsonl%s; TensorBoard: tensorboard '
               '--logdir %s)', workdir, f', log file {paths.basename(log)}' if log else '',
               workdir)


def _already_finished(run: _Run, state) -> dict:
  """A rerun of a finished run: the final table if the config asks for it."""
  if run.config.eval_knn_at_end and jax.process_index() == 0:
    return _final_eval(run.config, state)
  logging.info('Evaluate it with: python -m mcl_jax.evaluate --workdir=%s', run.workdir)
  return {}


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
  logging.info('Evaluating the backbone (kNN and linear probe on held-out data)...')
  result = evaluate.evaluate_variables(config, trained, compare_random_init=True)
  logging.info('%s', evaluate.format_table(result))
  out = {f'eval_{k}': v for k, v in result.items() if isinstance(v, (int, float))}
  if config.eval_dense_at_end:
    from mcl_jax import dense_eval  # pylint: disable=import-outside-toplevel
    logging.info('Dense probe (frozen FPN, linear per-pixel classifier on digit scenes)...')
    dense = dense_eval.evaluate_variables(config, trained, compare_random_init=True)
    logging.info('%s', dense_eval.format_table(dense))
    out.update({f'dense_{k}': v for k, v in dense.items() if isinstance(v, (int, float))})
  return out
