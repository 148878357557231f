"""The fine-tuning run: check, start or resume, train, stop, evaluate.

`finetune(config, workdir)` is the whole run of `python -m mcl_jax.finetune`,
with the pretraining's conventions (mcl_jax/training/loop.py): before the
workdir is created it checks the config, the data and the pretrained source;
then it restores the newest readable checkpoint or builds a new state from
the pretrained variables, runs the sharded train step until the end, a stop
signal (SIGTERM / SIGINT: finish the step, save, return) or a non-finite
value, and evaluates on the validation split every `eval_every` steps and at
the end (evaluation.py).

The train step is one `jax.jit` over the 'data' mesh: the batch sharded, the
state replicated and donated. Each canvas shape of `config.data.canvas_sizes`
compiles once (a dict of compiled steps), the largest first, so that its
memory is checked before anything trains.
"""

import dataclasses
import functools
import math
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mcl_jax import append_log, cli, config_validation, errors, paths
from mcl_jax.detection import evaluation, optim
from mcl_jax.detection import state as state_lib
from mcl_jax.training import checkpointing, logs, memory, signals
from mcl_jax.training import state as training_state

LOG_FILE = 'train.log'
# What the train step reads of a batch (the rest is for evaluation).
TRAIN_KEYS = ('images', 'image_hw', 'gt_boxes', 'gt_classes', 'gt_valid', 'gt_masks')
LOSS_NAMES = ('loss_rpn_cls', 'loss_rpn_loc', 'loss_cls', 'loss_box_reg', 'loss_mask')
# Must be finite for a step's state to be kept (as the pretraining's guard).
FINITE_METRICS = ('loss', 'grad_norm', 'param_norm')
# Fields whose change alters the state's shapes: a checkpoint of other values
# cannot be resumed.
SHAPE_FIELDS = ('model.depth', 'model.width', 'model.stage_sizes', 'model.block',
                'model.fpn_channels', 'model.aspect_ratios', 'model.roi.num_convs',
                'model.roi.fc_dim', 'model.roi.mask_conv_dim', 'data.num_classes',
                'optim.momentum')


class NonFiniteError(errors.RunError):
  """A NaN or Inf in the loss, the gradient norm or the parameters."""


class PretrainedError(errors.RunError):
  """A pretrained source that cannot be used."""


# ------------------------------------------------------------------- checks --

def _require(ok: bool, field: str, value, rule: str):
  if not ok:
    raise config_validation.ConfigError(f'config.{field}={value!r}: {rule}')


def validate(config, num_devices: int = 1, num_processes: int = 1, need_data: bool = True):
  """Raises ConfigError (one line: field, value, rule) on an impossible setting.

  need_data=False (the memory preflight) skips the data location.
  """
  o, d = config.optim, config.data
  sizes = tuple(tuple(int(v) for v in hw) for hw in d.canvas_sizes)
  _require(len(sizes) >= 1 and all(len(hw) == 2 for hw in sizes), 'data.canvas_sizes',
           sizes, 'needs one or more (H, W) pairs')
  _require(all(h > 0 and w > 0 and h % 32 == 0 and w % 32 == 0 for h, w in sizes),
           'data.canvas_sizes', sizes, 'every side must be a multiple of 32 (the stride of '
           'P5; detectron2 pads to multiples of 32 too)')
  _require(d.source in ('coco', 'digit_scenes'), 'data.source', d.source,
           "must be 'coco' or 'digit_scenes'")
  _require(not need_data or d.source != 'coco' or bool(d.coco_root), 'data.coco_root', d.coco_root,
           'the COCO folder (train2017/, val2017/, annotations/) is needed: pass '
           '--config.data.coco_root=PATH')
  _require(isinstance(o.global_batch, int) and o.global_batch > 0
           and o.global_batch % num_devices == 0, 'optim.global_batch', o.global_batch,
           f'must be a positive multiple of the device count ({num_devices})')
  _require(o.global_batch % num_processes == 0, 'optim.global_batch', o.global_batch,
           f'must be divisible by the process count ({num_processes})')
  _require(o.base_lr > 0 and math.isfinite(o.base_lr), 'optim.base_lr', o.base_lr, 'must be > 0')
  _require(0 <= o.momentum < 1, 'optim.momentum', o.momentum, 'must be in [0, 1)')
  _require(o.weight_decay >= 0 and o.weight_decay_norm >= 0, 'optim.weight_decay',
           o.weight_decay, 'weight_decay and weight_decay_norm must be >= 0')
  _require(o.warmup_iters >= 0 and 0 < o.warmup_factor <= 1, 'optim.warmup_factor',
           o.warmup_factor, 'must be in (0, 1] (and warmup_iters >= 0)')
  _require(list(o.lr_steps) == sorted(o.lr_steps), 'optim.lr_steps', tuple(o.lr_steps),
           'must be increasing')
  _require(o.num_steps > 0, 'optim.num_steps', o.num_steps, 'must be > 0')
  _require(d.max_gt >= 1 and d.mask_size >= 1, 'data.max_gt', d.max_gt,
           'max_gt and mask_size must be >= 1')
  _require(config.eval_per_device_batch >= 1, 'eval_per_device_batch',
           config.eval_per_device_batch, 'must be >= 1')
  _require(config.precise_bn_iters == 0, 'precise_bn_iters', config.precise_bn_iters,
           'precise BN is not implemented: set it to 0 (docs/DETECTION.md)')
  for field in ('keep_checkpoints', 'checkpoint_every', 'log_every'):
    _require(config[field] >= 1, field, config[field], 'must be >= 1')
  _require(config.eval_every >= 0, 'eval_every', config.eval_every,
           'must be >= 0 (0: evaluate at the end only)')


def check_pretrained(source: str, config=None):
  """Raises (one line) for a source that cannot load: before the workdir exists.

  PretrainedError for no source or a missing file; CheckpointError for a
  pretraining workdir without config.json or a checkpoint; with `config`,
  PretrainedMismatchError for a pretraining of another backbone / FPN.
  """
  if not source:
    raise PretrainedError("no pretrained source: pass --pretrained=WORKDIR (a main.py run), "
                          "'none', 'torchvision:PATH.pth' or 'detectron2:PATH.pkl'")
  if source == 'none':
    return
  kind, _, path = source.partition(':')
  if kind in ('torchvision', 'detectron2') and path:
    if not paths.exists(path):
      raise PretrainedError(f'--pretrained={source}: no such file')
    return
  pre_config = checkpointing.check_readable(source)
  if config is not None:
    from mcl_jax.detection import pretrained  # pylint: disable=import-outside-toplevel
    pretrained.check_matching(pre_config.model, config.model, source)


def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node.get(part) if hasattr(node, 'get') else None
  return tuple(node) if isinstance(node, (list, tuple)) else node


def check_compatible(workdir: str, config):
  """Refuses a workdir whose checkpoints are of another detector (its config.json differs)."""
  if not (paths.exists(paths.join(workdir, checkpointing.CONFIG_FILE))
          and checkpointing.latest_steps(workdir)):
    return
  old = checkpointing.load_config(workdir)
  diffs = [f'{f}: checkpoint {_get(old, f)!r} vs now {_get(config, f)!r}'
           for f in SHAPE_FIELDS if _get(old, f) != _get(config, f)]
  if diffs:
    raise checkpointing.CheckpointError(
        f'workdir {workdir!r} holds checkpoints of a different detector ('
        + '; '.join(diffs) + '). Use a new --workdir, or the config it was made with.')


def _has_checkpoint(workdir: str) -> bool:
  return paths.isdir(checkpointing.checkpoint_dir(workdir)) and bool(
      checkpointing.latest_steps(workdir))


# --------------------------------------------------------------------- data --

def scenes_root(config, workdir: str) -> str:
  """Where digit scenes are kept: config.data.scenes_root, else beside the workdir."""
  root = config.data.get('scenes_root')
  return root or paths.join(paths.dirname(paths.abspath(workdir)), 'detection_scenes')


def open_data(config, workdir: str):
  """(train split, val split) of the configured source; writes digit scenes once.

  Raises:
    DetectionDataError: a missing or unreadable COCO folder.
  """
  from mcl_jax.detection import coco  # pylint: disable=import-outside-toplevel
  d = config.data
  if d.source == 'digit_scenes':
    from mcl_jax.detection import scenes  # pylint: disable=import-outside-toplevel
    root = scenes.ensure_scenes(d.scenes, scenes_root(config, workdir))
  else:
    root = d.coco_root
  train = coco.load_split(root, d.train_split)
  val = coco.load_split(root, d.val_split)
  if train.num_classes != d.num_classes:
    raise config_validation.ConfigError(
        f'config.data.num_classes={d.num_classes}: the annotation file of {root} has '
        f'{train.num_classes} categories; set it to {train.num_classes}')
  return train, val


# --------------------------------------------------------------------- step --

def batch_spec(config, global_batch: int, canvas, mesh) -> dict:
  """ShapeDtypeStructs of a training batch on `canvas`, sharded over 'data'."""
  g, m = int(config.data.max_gt), int(config.data.mask_size)
  h, w = canvas
  shapes = {'images': ((h, w, 3), jnp.uint8), 'image_hw': ((2,), jnp.int32),
            'gt_boxes': ((g, 4), jnp.float32), 'gt_classes': ((g,), jnp.int32),
            'gt_valid': ((g,), jnp.bool_), 'gt_masks': ((g, m, m), jnp.uint8)}
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.ShapeDtypeStruct((global_batch, *s), dt, sharding=sharding)
          for k, (s, dt) in shapes.items()}


def make_train_step(config, model, tx: optax.GradientTransformation, mesh):
  """The jitted train step: (state, batch) -> (state, metrics).

  The five losses are summed with weight 1 each. Sampling randomness is
  fold_in(seed key, step): a resumed run draws what an uninterrupted one would.
  """
  schedule = optim.lr_schedule(config)
  base_key = jax.random.key(config.seed)

  def loss_fn(params, batch_stats, batch, key):
    losses, new = model.apply({'params': params, 'batch_stats': batch_stats}, batch,
                              train=True, rngs={'sampling': key}, mutable=['batch_stats'])
    new_stats = new['batch_stats'] if 'batch_stats' in new else new
    total = sum(losses[k] for k in sorted(losses))
    return total, (losses, new_stats)

  def step_fn(state: state_lib.TrainState, batch):
    key = jax.random.fold_in(base_key, state.step)
    (loss, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, key)
    new_state, update_metrics = state_lib.apply_update(state, grads, batch_stats, tx)
    return new_state, dict(losses, loss=loss, lr=schedule(state.step), **update_metrics)

  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P('data'))
  return jax.jit(step_fn, in_shardings=(replicated, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def largest_canvas(config) -> tuple[int, int]:
  return max((tuple(int(v) for v in hw) for hw in config.data.canvas_sizes),
             key=lambda hw: (hw[0] * hw[1], hw))


def check_memory(compiled, per_device_batch: int, canvas, mesh) -> dict:
  """Raises DoesNotFitError when the compiled step needs more than the device has."""
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  limit = memory.device_bytes_limit(device)
  need = memory.compiled_bytes(compiled)
  gib = memory.GIB
  if limit is not None and need['total'] > limit:
    raise memory.DoesNotFitError(
        f'the train step on {canvas[0]}x{canvas[1]} canvases needs {need["total"] / gib:.2f} '
        f'GiB per device at per-device batch {per_device_batch} (arguments '
        f'{need["arguments"] / gib:.2f} + temporaries {need["temp"] / gib:.2f} GiB), the device '
        f'has {limit / gib:.2f} GiB: lower optim.global_batch (and optim.base_lr with it), '
        "set model.remat='blocks', or drop the largest of config.data.canvas_sizes")
  logging.info('Train step memory per device on %dx%d canvases: %.2f GiB (arguments %.2f, '
               'temporaries %.2f)%s', canvas[0], canvas[1], need['total'] / gib,
               need['arguments'] / gib, need['temp'] / gib,
               '' if limit is None else f' of {limit / gib:.2f} GiB')
  return need


class CompiledSteps:
  """One compiled train step per canvas shape (a few buckets: a few compiles)."""

  def __init__(self, step_fn, config, mesh):
    self.step_fn, self.config, self.mesh = step_fn, config, mesh
    self.per_device = config.optim.global_batch // mesh.devices.size
    self.compiled = {}

  def get(self, state, canvas):
    canvas = tuple(int(v) for v in canvas)
    if canvas not in self.compiled:
      logging.info('Compiling the train step for %dx%d canvases (minutes on a CPU)...',
                   *canvas)
      spec = batch_spec(self.config, self.config.optim.global_batch, canvas, self.mesh)
      with cli.native_stderr_to_log('xla'):
        compiled = self.step_fn.lower(state, spec).compile()
      check_memory(compiled, self.per_device, canvas, self.mesh)
      self.compiled[canvas] = compiled
    return self.compiled[canvas]


# ---------------------------------------------------------------------- run --

@dataclasses.dataclass(frozen=True)
class _Run:
  """What stays fixed over a run."""
  config: ml_collections.ConfigDict
  workdir: str
  train: object  # coco.CocoSplit
  val: object
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation


def finetune(config, workdir: str) -> dict:
  """Fine-tunes (or resumes) a detector in `workdir`. Returns the last metrics and the scores.

  Checks, in order and before the workdir is created: the config, the data
  (digit scenes are written once beside the workdir), and, for a new run,
  the pretrained source. A workdir this call created is removed again if
  the run fails before its first step is logged. With
  config.compare_random_init a second run from a random init follows in
  WORKDIR/random_init and the two are scored side by side.
  """
  validate(config, jax.device_count(), jax.process_count())
  train, val = open_data(config, workdir)
  if not _has_checkpoint(workdir):
    check_pretrained(config.pretrained, config)
  created = checkpointing.check_workdir(workdir)
  try:
    check_compatible(workdir, config)
    _open_log_file(workdir)
    run = _Run(config, workdir, train, val, training_state.make_mesh(),
               optim.create_optimizer(config))
    with signals.StopSignal(jax.process_count()) as stop:
      manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
      try:
        result = _run(run, manager, stop)
      finally:
        manager.wait_until_finished()
        manager.close()
  except BaseException:
    if created:
      _remove_unstarted(workdir)
    raise
  if config.get('compare_random_init') and not result.get('stopped'):
    result['random_init'] = _random_init_arm(config, workdir, result)
  return result


def _random_init_arm(config, workdir: str, pretrained_result: dict) -> dict:
  """The same fine-tune from a random init in WORKDIR/random_init; prints both scores."""
  other = ml_collections.ConfigDict(config.to_dict())
  other.pretrained = 'none'
  other.compare_random_init = False
  if other.data.source == 'digit_scenes':
    other.data.scenes_root = scenes_root(config, workdir)
  sub = paths.join(workdir, 'random_init')
  logging.info('==> The same fine-tune from a random init (the baseline), in %s', sub)
  result = finetune(other, sub)
  cli.log_to_file(paths.join(workdir, LOG_FILE))  # back to the main run's log
  if 'scores' in result and 'scores' in pretrained_result:
    from mcl_jax.detection import coco_eval  # pylint: disable=import-outside-toplevel
    table = coco_eval.format_table({'random init': result['scores'],
                                    f'pretrained ({config.pretrained})':
                                        pretrained_result['scores']})
    logging.info('COCO AP on the held-out split (%s), random init vs pretrained:\n%s',
                 config.data.val_split, table)
  return result


def _open_log_file(workdir: str):
  name = LOG_FILE if jax.process_index() == 0 else f'train.{jax.process_index()}.log'
  if jax.process_index() == 0:
    append_log.remove_leftover_parts(workdir)
  cli.log_to_file(paths.join(workdir, name))


def _remove_unstarted(workdir: str):
  metrics = paths.join(workdir, logs.METRICS_FILE)
  if (jax.process_index() != 0 or _has_checkpoint(workdir)
      or (paths.exists(metrics) and paths.getsize(metrics) > 0)):
    return
  cli.close_log_file()
  try:
    paths.rmtree(workdir)
  except OSError:
    pass


def _restore_or_init(run: _Run, manager):
  """The newest readable checkpoint's state and step, or a new state at step 0."""
  config, workdir = run.config, run.workdir
  state, start = checkpointing.restore_latest(
      manager, state_lib.abstract_train_state(config, run.tx, run.mesh))
  if state is None:
    logging.info('Initialising the detector from %s...', config.pretrained)
    variables, report = state_lib.initial_variables(config, config.pretrained)
    logging.info('%s', _describe_report(report))
    state, start = state_lib.create_train_state(variables, run.tx, run.mesh), 0
    checkpointing.save_config(workdir, config)
    logging.info('==> Starting a new run: %d steps of %d images, a checkpoint every %d '
                 'steps.', config.optim.num_steps, config.optim.global_batch,
                 config.checkpoint_every)
  else:
    if not paths.exists(paths.join(workdir, checkpointing.CONFIG_FILE)):
      checkpointing.save_config(workdir, config)
    if start >= config.optim.num_steps:
      logging.info('==> Already finished at step %d (of %d): nothing to train.', start,
                   config.optim.num_steps)
    else:
      logging.info('==> Resumed from the checkpoint of step %d. %d of %d steps to go.',
                   start, config.optim.num_steps - start, config.optim.num_steps)
  return state, start


def _describe_report(report) -> str:
  """One line of what the pretrained loader loaded."""
  if isinstance(report, dict) and 'arrays' in report:
    parts = ', '.join(f'{part} {n}' for part, n in report['arrays'].items())
    return f'Loaded {report.get("kind", "")} {report.get("source", "")}: {parts} arrays'.replace(
        '  ', ' ')
  return str(report)


def _check_finite(metrics: dict, step: int, last_checkpoint):
  bad = [n for n in FINITE_METRICS if n in metrics and not math.isfinite(metrics[n])]
  if bad:
    values = ', '.join(f'{n}={metrics[n]}' for n in FINITE_METRICS if n in metrics)
    kept = ('no checkpoint was written yet' if last_checkpoint is None else
            f'the last good checkpoint (step {last_checkpoint}) is kept')
    raise NonFiniteError(
        f'{", ".join(bad)} not finite at step {step} ({values}): stopping before anything '
        f'of this step is saved; {kept}. Lower optim.base_lr or check the data.')


class _Console:
  """The step lines: losses, lr, images/s, ETA (metrics.jsonl and TensorBoard: MetricWriter)."""

  def __init__(self, workdir: str, num_steps: int, global_batch: int):
    self.writer = logs.MetricWriter(workdir, num_steps, global_batch)
    self.num_steps, self.global_batch = num_steps, global_batch
    self._t0 = self._step0 = None

  def write(self, step: int, metrics: dict, console: bool):
    now = time.perf_counter()
    if self._t0 is None:  # the first step includes compiling: the rate starts after it
      self._t0, self._step0 = now, step
    rate = (step - self._step0) * self.global_batch / max(now - self._t0, 1e-9)
    self.writer.write(step, metrics, console=False)
    if console and jax.process_index() == 0:
      parts = ' '.join(f'{k[5:]} {metrics[k]:.3f}' for k in LOSS_NAMES if k in metrics)
      eta = (self.num_steps - step) * self.global_batch / rate if rate > 0 else float('nan')
      logging.info('step %d/%d  loss %.4f [%s]  lr %.4g  %.1f img/s  ETA %s', step,
                   self.num_steps, metrics['loss'], parts, metrics['lr'], rate,
                   logs.hms(eta))


def _global_batch(local: dict, sharding) -> dict:
  """This process's part of a batch -> global arrays sharded over 'data'."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
          for k in TRAIN_KEYS}


def _run(run: _Run, manager, stop: signals.StopSignal) -> dict:
  from mcl_jax.detection import inputs, model as model_lib  # pylint: disable=import-outside-toplevel
  config, workdir = run.config, run.workdir
  num_steps = int(config.optim.num_steps)
  log = cli.log_file()
  logging.info('workdir: %s (checkpoints/, metrics.jsonl%s; TensorBoard: tensorboard '
               '--logdir %s)', workdir, f', log file {paths.basename(log)}' if log else '',
               workdir)
  state, start = _restore_or_init(run, manager)
  model = model_lib.create_detector(config)
  if start >= num_steps:
    return _already_finished(run, model, state, start)
  logs.truncate_metrics(workdir, start)
  last_saved = start if start else None
  steps = CompiledSteps(make_train_step(config, model, run.tx, run.mesh), config, run.mesh)
  # The largest canvas first: its memory is checked before anything trains.
  steps.get(state, largest_canvas(config))
  sharding = NamedSharding(run.mesh, P('data'))
  per_process = config.optim.global_batch // jax.process_count()
  data = inputs.train_batches(run.train, config, jax.process_index(), jax.process_count(),
                              per_process, config.seed, start_step=start)
  console = _Console(workdir, num_steps, config.optim.global_batch)
  last, scores, stopped, pending = {}, None, False, None
  try:
    for step in range(start, num_steps):
      local = next(data)
      compiled = steps.get(state, local['images'].shape[1:3])
      state, metrics = compiled(state, _global_batch(local, sharding))
      if pending is not None:  # the previous step's metrics, fetched one step late
        last = _finish_step(*pending, console, config, last_saved)
      pending = (step, metrics)
      done = step + 1
      stopped = stop.should_stop(step)
      evaluate_now = done == num_steps or (config.eval_every and done % config.eval_every == 0)
      if stopped or evaluate_now or done % config.checkpoint_every == 0:
        last = _finish_step(*pending, console, config, last_saved)
        pending = None
        console.writer.flush()
        checkpointing.save(manager, done, state, force=True)
        logging.info('checkpoint of step %d -> %s', done,
                     paths.join(checkpointing.checkpoint_dir(workdir), str(done)))
        last_saved = done
      if stopped:
        logging.info('Stopped after step %d (%s); checkpoint saved. Rerun the same command '
                     'to resume.', done, stop.received or 'preemption notice')
        break
      if evaluate_now:
        scores = evaluation.evaluate_and_report(config, model, state, run.val, workdir, done)
    if pending is not None:
      last = _finish_step(*pending, console, config, last_saved)
  finally:
    data.close()  # stops the decoding threads
    console.writer.close()
  manager.wait_until_finished()
  out = dict(last, stopped=stopped)
  if scores is not None:
    out['scores'] = scores
  return out


def _finish_step(step: int, metrics, console: _Console, config, last_saved) -> dict:
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  _check_finite(host, step + 1, last_saved)
  console.write(step + 1, host, console=(step + 1) % config.log_every == 0 or step == 0)
  return host


def _already_finished(run: _Run, model, state, step: int) -> dict:
  """A rerun of a finished run: the saved scores (evaluated now if there are none)."""
  scores = evaluation.saved_scores(run.workdir, step)
  if scores is None:
    scores = evaluation.evaluate_and_report(run.config, model, state, run.val, run.workdir,
                                            step)
  else:
    evaluation.report(run.config, scores, step)
  return {'scores': scores, 'stopped': False}


# ---------------------------------------------------------------- preflight --

def preflight(config, num_devices: int, budget_gib: float) -> dict:
  """Compiles the train step for the largest canvas without data; its bytes per device.

  The mesh is this machine's first device; the batch is the per-device
  batch of a `num_devices`-device run (global_batch / num_devices), so the
  figure is what one device of that run holds (the step's collectives do not
  change its buffers). Nothing is initialised: the state is abstract.

  Returns:
    memory.compiled_bytes of the compiled step, plus 'fits' (total <= budget).
  """
  from mcl_jax.detection import model as model_lib  # pylint: disable=import-outside-toplevel
  validate(config, num_devices, need_data=False)
  per_device = config.optim.global_batch // num_devices
  mesh = training_state.make_mesh(1)
  tx = optim.create_optimizer(config)
  model = model_lib.create_detector(config)
  state = state_lib.abstract_train_state(config, tx, mesh)
  canvas = largest_canvas(config)
  step = make_train_step(config, model, tx, mesh)
  t0 = time.perf_counter()
  logging.info('Compiling the train step for %dx%d canvases at per-device batch %d '
               '(%s)...', *canvas, per_device, config.model.dtype)
  with cli.native_stderr_to_log('xla'):
    compiled = step.lower(state, batch_spec(config, per_device, canvas, mesh)).compile()
  need = memory.compiled_bytes(compiled)
  gib = memory.GIB
  need['fits'] = need['total'] <= budget_gib * gib
  need['compile_s'] = time.perf_counter() - t0
  logging.info('Train step per device (%dx%d, batch %d, %s): %.2f GiB = arguments %.2f + '
               'outputs %.2f - aliased %.2f + temporaries %.2f; %s a %.0f GiB device '
               '(compiled in %.0f s on %s)', *canvas, per_device, config.model.dtype,
               need['total'] / gib, need['arguments'] / gib, need['outputs'] / gib,
               need['aliased'] / gib, need['temp'] / gib,
               'fits' if need['fits'] else 'does NOT fit', budget_gib, need['compile_s'],
               jax.devices()[0].platform)
  return need
