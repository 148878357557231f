"""The training loop: check, start or resume, train, stop, evaluate.

`train_and_evaluate(config, workdir)` is the whole run. Before anything is
compiled and before the workdir is created it checks, once, the config (its
every rule, with the real device count), the data (opened once, here, and
passed along) and a saved config.json of another model shape. Then it
restores the newest readable checkpoint or starts a new state, runs the
sharded step of `step.py` until the end, a stop signal (`signals.py`) or a
non-finite value, and evaluates the backbone at the end if the config asks.
"""

import dataclasses
import functools
import math

from absl import logging
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mcl_jax import append_log, cli, config_validation, errors, paths
from mcl_jax.data import device_crops, input_pipeline
from mcl_jax.eval import pictures
from mcl_jax.training import checkpointing, logs, memory, optim, signals
from mcl_jax.training import state as state_lib
from mcl_jax.training.step import make_train_step


class NonFiniteError(errors.RunError, FloatingPointError):
  """A NaN or Inf in the loss or the gradient norm."""


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

  Order of the checks, all before anything is compiled: the config
  (config_validation) and the data source (a missing dataset or folder fails
  here; tfds data is prepared here when data.tfds_download_and_prepare asks
  for it), before the workdir is created; then the workdir (created and
  checked writable; on gs:// the credentials, the bucket and a probe object)
  and a saved config.json of another model shape (refused). Then the log
  file is opened in it, and the newest readable checkpoint
  restored (unreadable ones are skipped, see checkpointing.restore_latest);
  metrics.jsonl is cut back to its step. A workdir this call created is
  removed again if the run fails before its first step is logged.

  Every process of a multi-process run calls this with the same arguments;
  process 0 alone writes config.json and metrics, all of them save.
  """
  config_validation.validate(config, jax.device_count(), jax.process_count())
  source = _open_source(config)
  created = checkpointing.check_workdir(workdir)
  try:
    checkpointing.check_compatible(workdir, config)
    _open_log_file(workdir)
    num_steps = state_lib.total_steps(config, source.num_examples)
    setup = RunSetup(config, workdir, source, state_lib.make_mesh(), num_steps,
                     optim.create_optimizer(config, num_steps))
    with signals.StopSignal(jax.process_count()) as stop:
      manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
      try:
        return _train(setup, manager, stop)
      finally:
        # Also on errors (a non-finite step, an interrupt): a save in flight is
        # of a state that passed its checks; finish it rather than leave a tmp dir.
        manager.wait_until_finished()
        manager.close()
  except BaseException:
    if created:
      _remove_unstarted(workdir)
    raise


def _open_source(config) -> input_pipeline.DataSource:
  """Opens the configured data source once, so that missing data fails before any set-up.

  Raises:
    DatasetNotFoundError: the data is missing (the message says what to provide).
    ConfigError: an unknown data.source, or an unlabelled source for the
      supervised objective.
  """
  try:
    source = input_pipeline.open_source(config.data)
  except input_pipeline.DatasetNotFoundError:
    raise
  except ValueError as e:  # an unknown data.source
    raise config_validation.ConfigError(str(e)) from e
  if config.objective == 'supervised':
    try:  # an unlabelled source, or too few classes: one clear error
      source.require_labels()
    except input_pipeline.DatasetNotFoundError:
      raise
    except ValueError as e:
      raise config_validation.ConfigError(str(e)) from e
  return source


def _open_log_file(workdir: str):
  """WORKDIR/train.log (train.<process>.log beyond process 0), if the CLI logs."""
  name = LOG_FILE if jax.process_index() == 0 else f'train.{jax.process_index()}.log'
  if jax.process_index() == 0:
    append_log.remove_leftover_parts(workdir)  # of appends cut short by a kill (gs://)
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
class RunSetup:
  """What stays fixed over a run: config, workdir, data source, mesh, length, optimizer.

  `source` is the run's one opened data source: the training batches and the
  final evaluation's arrays both come from it.
  """
  config: ml_collections.ConfigDict
  workdir: str
  source: input_pipeline.DataSource
  mesh: jax.sharding.Mesh
  num_steps: int
  tx: optax.GradientTransformation


def _restore_or_init(setup: RunSetup, manager):
  """The newest readable checkpoint's state and step, or a new state at step 0."""
  config, workdir = setup.config, setup.workdir
  replicated = NamedSharding(setup.mesh, P())
  state, start = checkpointing.restore_latest(
      manager, state_lib.abstract_train_state(config, setup.tx, setup.mesh))
  if state is None:
    init = jax.jit(functools.partial(state_lib.create_train_state, config, tx=setup.tx),
                   out_shardings=replicated)
    state, start = init(jax.random.key(config.seed)), 0
    checkpointing.save_config(workdir, config)
    logging.info('==> Starting a new run: %d steps of %d images, a checkpoint every %d '
                 'steps.', setup.num_steps, config.optim.global_batch, config.checkpoint_every)
  else:
    if not paths.exists(paths.join(workdir, checkpointing.CONFIG_FILE)):
      checkpointing.save_config(workdir, config)
    if start >= setup.num_steps:
      logging.info('==> Already finished at step %d (of %d): nothing to train.', start,
                   setup.num_steps)
    else:
      logging.info('==> Resumed from the checkpoint of step %d. %d of %d steps to go.',
                   start, setup.num_steps - start, setup.num_steps)
  return state, start


def _train(setup: RunSetup, manager, stop: signals.StopSignal) -> dict:
  """The steps from the newest checkpoint (or 0) to the end or a stop; the final evaluation."""
  config, num_steps = setup.config, setup.num_steps
  _log_where(setup.workdir)
  state, start = _restore_or_init(setup, manager)
  if start >= num_steps:
    return _already_finished(setup, state)
  # Steps after `start` are trained (and logged) again: drop their old lines.
  logs.truncate_metrics(setup.workdir, start)
  last_saved = start if start else None

  train_step = make_train_step(config, setup.mesh, setup.tx, num_steps)
  batch_sharding = NamedSharding(setup.mesh, P('data'))
  batches = setup.source.train_iterator(global_batch=config.optim.global_batch, seed=config.seed,
                                 start_step=start)
  writer = logs.MetricWriter(setup.workdir, num_steps, config.optim.global_batch)
  last = {}
  stopped = False
  pending = None  # (step, metrics) of the step in flight: checked one step late
  try:
    for step in range(start, num_steps):
      batch = input_pipeline.to_global_batch(next(batches), batch_sharding)
      images = device_crops.step_images(batch, config.data.crop_on)
      if step == start == 0 and config.montage_png:
        pictures.write_montage_png(config, device_crops.crops_of(images, config.data),
                                    paths.join(setup.workdir, 'montage.png'))
      if step == start:
        # The first call compiles. XLA's "Very slow compile?" alarm, printed
        # from C++ on a busy CPU, goes to the log file, not the console.
        logging.info('Compiling the train step (the first step; minutes on a CPU)...')
        with cli.native_stderr_to_log('xla'):
          # Compiled ahead of time: its memory is checked before it runs.
          train_step = train_step.lower(state, images, batch['label']).compile()
        memory.check_step_fits(train_step, config, setup.mesh)
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
                     paths.join(checkpointing.checkpoint_dir(setup.workdir), str(done)))
        last_saved = done
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
    last.update(_final_eval(config, state, setup.source))
  return last


def _log_where(workdir: str):
  """The start-up line: where the checkpoints, the log and TensorBoard's scalars go."""
  log = cli.log_file()
  logging.info('workdir: %s (checkpoints/, metrics.jsonl%s; TensorBoard: tensorboard '
               '--logdir %s)', workdir, f', log file {paths.basename(log)}' if log else '',
               workdir)


def _already_finished(setup: RunSetup, state) -> dict:
  """A rerun of a finished run: the final table if the config asks for it."""
  if setup.config.eval_knn_at_end and jax.process_index() == 0:
    return _final_eval(setup.config, state, setup.source)
  logging.info('Evaluate it with: python -m mcl_jax.evaluate --workdir=%s', setup.workdir)
  return {}


def _finish_step(step: int, metrics, writer, config, last_saved=None) -> dict:
  """Fetches a step's metrics, stops on non-finite values, logs."""
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  _check_finite(host, step + 1, last_saved)
  writer.write(step + 1, host, console=(step + 1) % config.log_every == 0 or step == 0)
  return host


def _final_eval(config, state, source: input_pipeline.DataSource) -> dict:
  """kNN on held-out data of the run's `source`, before (random init) and after pretraining."""
  from mcl_jax.eval import probes  # late: evaluation pulls in scikit-learn
  # Host copies: the state is replicated over every process's devices, and
  # process 0 evaluates alone on its own devices.
  local = lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x
  trained = jax.tree.map(local, {'params': state.params, 'batch_stats': state.batch_stats})
  logging.info('Evaluating the backbone (kNN and linear probe on held-out data)...')
  result = probes.evaluate_variables(config, trained, compare_random_init=True, source=source)
  logging.info('%s', probes.format_table(result))
  out = {f'eval_{k}': v for k, v in result.items() if isinstance(v, (int, float))}
  if config.eval_dense_at_end:
    from mcl_jax.eval import dense_probe  # pylint: disable=import-outside-toplevel
    logging.info('Dense probe (frozen FPN, linear per-pixel classifier on digit scenes)...')
    dense = dense_probe.evaluate_variables(config, trained, compare_random_init=True)
    logging.info('%s', dense_probe.format_table(dense))
    out.update({f'dense_{k}': v for k, v in dense.items() if isinstance(v, (int, float))})
  return out
