"""Orbax checkpoints in the workdir, the saved config, and loading for tools.

Layout of a workdir:
  config.json          the config of the run (tools rebuild the model from it)
  checkpoints/<step>/  Orbax checkpoints of the TrainState (atomic: written to
                       <step>.orbax-checkpoint-tmp and renamed once complete;
                       a leftover tmp directory is never restored and is
                       deleted when the next run opens the directory. On
                       gs:// Orbax writes <step>/ directly and adds
                       commit_success.txt last: a step without it is
                       treated the same way)
  checkpoints/<step>.corrupt/
                       a checkpoint that failed to restore while an older
                       one restored: moved aside so that Orbax neither
                       restores it nor counts it against keep_checkpoints
  metrics.jsonl, events.* (TensorBoard), montage.png (logs.py, eval/pictures.py)

The workdir may be local or gs://BUCKET/path: everything here goes through
mcl_jax.paths, and Orbax writes the arrays with tensorstore's GCS driver.

Resuming restores the newest readable checkpoint. A checkpoint whose arrays
do not match the current model's shapes is refused (CheckpointError), never
treated as corrupt and never silently restored.
"""

import json

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from mcl_jax import errors, paths, storage_checks
from mcl_jax.training import state as state_lib
from mcl_jax.training import optim

CONFIG_FILE = 'config.json'


class CheckpointError(errors.RunError, RuntimeError):
  """A workdir whose checkpoints cannot be used."""


def check_workdir(workdir: str) -> bool:
  """Creates the workdir, or says clearly in one line why it cannot be used.

  Returns whether it is new (created here; on gs://, no object under it yet).

  Local: writability is tested by creating (and removing) a file, not with
  os.access: that also catches read-only mounts, and is not fooled by root,
  for whom os.access reports every directory writable. gs://: credentials,
  then a probe object, which also tells a missing bucket from a refused
  write (storage_checks.check_writable).
  """
  try:
    return storage_checks.check_writable(workdir)
  except paths.StorageError as e:
    if paths.is_cloud(workdir):  # the message says what to do
      raise CheckpointError(f'workdir {e}' if str(e).startswith('gs://') else str(e)) from e
    hint = ' or fix its permissions' if 'not writable' in str(e) else ''
    raise CheckpointError(f'workdir {e}: choose another --workdir{hint}') from e


def save_config(workdir: str, config):
  """Writes config.json (process 0), atomically: a kill never leaves half of it."""
  if jax.process_index() == 0:
    paths.write_atomic(paths.join(workdir, CONFIG_FILE),
                       config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir."""
  path = paths.join(workdir, CONFIG_FILE)
  if not paths.isdir(workdir):
    raise CheckpointError(f'workdir {workdir!r} does not exist: pass the --workdir of a '
                          'pretraining run (main.py --workdir=...)')
  if not paths.exists(path):
    raise CheckpointError(f'workdir {workdir!r} has no {CONFIG_FILE}, so it is not a '
                          'pretraining workdir (or its run never started): pass the '
                          '--workdir given to main.py')
  try:
    raw = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{path} cannot be read ({type(e).__name__}: {e})') from e
  return ml_collections.ConfigDict(_tuplify(raw))


def _tuplify(x):
  """JSON lists back to tuples (configs hold tuples)."""
  if isinstance(x, dict):
    return {k: _tuplify(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuplify(v) for v in x)
  return x


# Fields whose change alters parameter or state shapes: a checkpoint written
# under other values cannot be resumed.
SHAPE_FIELDS = ('objective', 'model.depth', 'model.width', 'model.stage_sizes',
                'model.block', 'model.fpn_channels', 'model.neck_convs',
                'model.neck_hidden', 'model.embed_dim', 'model.predictor_hidden',
                'loss.level_weights', 'loss.classifier', 'data.num_classes',
                'optim.lars_trust_ratio')  # its optimizer state has another tree


def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node.get(part) if hasattr(node, 'get') else None
  return tuple(node) if isinstance(node, list) else node


def check_compatible(workdir: str, config):
  """Refuses a workdir whose saved config has other parameter shapes."""
  if not paths.exists(paths.join(workdir, CONFIG_FILE)):
    return
  old = load_config(workdir)
  diffs = []
  for field in SHAPE_FIELDS:
    a, b = _get(old, field), _get(config, field)
    if field == 'loss.level_weights':
      a, b = len(a or ()), len(b or ())
    if a != b:
      diffs.append(f'{field}: checkpoint {a!r} vs now {b!r}')
  if diffs and latest_steps(workdir):
    raise CheckpointError(
        f'workdir {workdir!r} holds checkpoints of a different model ('
        + '; '.join(diffs) + '). Use a new --workdir, or the config it was made with.')


def checkpoint_dir(workdir: str) -> str:
  return paths.join(paths.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, keep: int, async_save: bool = True,
                 create: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep` complete checkpoints.

  create=False (tools that only read) never makes the checkpoints directory.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max(1, keep), create=create, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=create)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def latest_steps(workdir: str) -> list[int]:
  """Complete checkpoint steps in the workdir, newest first.

  Locally Orbax renames a checkpoint to its step number once complete; on
  gs:// it writes into the step folder and adds paths.COMMIT_FILE last, so
  there a step folder without it (a save cut short) is not a checkpoint.
  """
  d = checkpoint_dir(workdir)
  steps = sorted((int(n) for n in paths.listdir(d) if n.isdigit()), reverse=True)
  if paths.is_cloud(d):
    steps = [s for s in steps if paths.exists(paths.join(d, str(s), paths.COMMIT_FILE))]
  return steps


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  """Saves the state (every process must call this)."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def _shapes(tree) -> dict[str, tuple[int, ...] | None]:
  """{leaf path: shape} of a state, an abstract state or Orbax metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): (tuple(x.shape) if getattr(x, 'shape', None) is not None else None)
          for p, x in leaves}


def _shape_mismatch(saved: dict, wanted: dict) -> str | None:
  """How a checkpoint's arrays differ from the model's (None: they match)."""
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  changed = [f'{k}: saved {saved[k]}, model {wanted[k]}'
             for k in sorted(set(saved) & set(wanted))
             if saved[k] is not None and saved[k] != wanted[k]]
  parts = []
  if changed:
    parts.append(f'{len(changed)} array(s) of other shapes, e.g. ' + '; '.join(changed[:3]))
  if missing:
    parts.append(f'{len(missing)} array(s) missing, e.g. ' + ', '.join(missing[:3]))
  if extra:
    parts.append(f'{len(extra)} unexpected array(s), e.g. ' + ', '.join(extra[:3]))
  return ' | '.join(parts) or None


def quarantine(directory, step: int) -> str | None:
  """Renames checkpoints/<step> to <step>.corrupt[.N] (process 0); returns the new path.

  The new name is not a step name to Orbax: it is neither restored nor
  counted by max_to_keep, and the files stay for inspection. (On gs:// a
  copy and a delete, the commit marker deleted first: paths.move_tree.)
  """
  src = paths.join(str(directory), str(step))
  if jax.process_index() != 0 or not paths.isdir(src):
    return None
  dst, n = src + '.corrupt', 1
  while paths.exists(dst):
    dst, n = f'{src}.corrupt.{n}', n + 1
  paths.move_tree(src, dst)
  return dst


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, step: int | None = None,
                   quarantine_corrupt: bool = True):
  """Restores the newest readable checkpoint onto `abstract_state`'s shardings.

  A corrupt or truncated checkpoint is skipped with a warning and the one
  before it is tried. Once an older one restores, the unreadable newer ones
  are moved aside to `<step>.corrupt` (`quarantine_corrupt`), so that the
  run's next saves neither collide with them nor let max_to_keep delete the
  good checkpoint in their favour. If no checkpoint restores, nothing is
  renamed (a transient read error must not cost the run its checkpoints) and
  CheckpointError is raised. A checkpoint whose arrays have other shapes than
  the model is refused with CheckpointError: that is a different model, not
  corruption.

  Returns (state, step), or (None, None) when there are no checkpoints.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f'no checkpoint at step {step}; have {sorted(steps)}')
    steps = [step]
  wanted = _shapes(abstract_state)
  failed = []
  for s in steps:
    try:
      saved = _shapes(ocp.StandardCheckpointHandler().metadata(
          manager.directory / str(s) / 'default'))
    except Exception:  # pylint: disable=broad-except
      saved = None  # unreadable metadata: the restore below fails and says why
    if saved:
      mismatch = _shape_mismatch(saved, wanted)
      if mismatch:
        raise CheckpointError(
            f'checkpoint {s} in {manager.directory} was written by a different model '
            f'({mismatch}). Use a new --workdir, or the config it was made with.')
    try:
      state = manager.restore(s, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      if step is not None:
        raise CheckpointError(f'checkpoint {s} in {manager.directory} cannot be '
                              f'restored: {type(e).__name__}: {e}') from e
      failed.append((s, f'{type(e).__name__}: {str(e)[:300]}'))
      logging.warning('Checkpoint of step %d is unreadable (%s); trying the previous '
                      'one.', s, failed[-1][1])
      continue
    _check_same_step_everywhere(s)
    if failed and quarantine_corrupt:
      for bad, _ in failed:
        moved = quarantine(manager.directory, bad)
        if moved:
          logging.warning('Moved the unreadable checkpoint of step %d to %s.', bad, moved)
      _sync('mcl_jax_quarantine')
      manager.reload()
    return state, s
  if steps:
    raise CheckpointError(
        f'no checkpoint in {manager.directory} can be restored (tried steps {steps}: '
        + '; '.join(f'{s}: {msg}' for s, msg in failed) + '). Nothing was renamed; '
        'remove or repair them, or use a new --workdir.')
  return None, None


def _check_same_step_everywhere(step: int):
  """All processes must resume from the same checkpoint (they read the same files)."""
  if jax.process_count() == 1:
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  steps = np.asarray(multihost_utils.process_allgather(np.int32(step)))
  if len(set(steps.ravel().tolist())) != 1:
    raise CheckpointError(f'processes restored different checkpoints {steps.tolist()}: '
                          'do all hosts see the same workdir?')


def check_readable(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The saved config of a workdir that has a checkpoint (of `step`), for tools.

  Cheap (no Orbax object is made), so tools call it before slow imports.

  Raises:
    CheckpointError: no such directory, no config.json, no checkpoint (of `step`).
  """
  config = load_config(workdir)
  steps = latest_steps(workdir)
  if not steps:
    raise CheckpointError(
        f'workdir {workdir!r} has no checkpoint yet (the run saves one every '
        f'{config.get("checkpoint_every", "?")} steps and when it stops): wait for one, '
        'or pass another --workdir')
  if step is not None and step not in steps:
    raise CheckpointError(f'workdir {workdir!r} has no checkpoint of step {step}: it has '
                          f'steps {sorted(steps)}; pass one of them to --step, or leave '
                          'it out for the newest')
  return config


def load_variables(workdir: str, step: int | None = None, which: str = 'online'):
  """(config, variables) of a run's online network or target encoder.

  For tools (export, evaluation): rebuilds the model from config.json and
  restores the TrainState on the local devices.
  """
  if which not in ('online', 'target'):
    raise ValueError(f"which={which!r}: must be 'online' or 'target'")
  config = check_readable(workdir, step)
  # Tools need the state's shapes only, which the schedule's length does not
  # change: the optimizer is built for a short run, one step past the warm-up
  # (a shorter one would make optax build a zero-length warm-up and say so).
  tx = optim.create_optimizer(config, int(config.optim.warmup_steps) + 2)
  abstract = state_lib.abstract_train_state(config, tx)
  manager = make_manager(workdir, config.keep_checkpoints, async_save=False, create=False)
  try:
    state, got = restore_latest(manager, abstract, step, quarantine_corrupt=False)
  finally:
    manager.close()
  if state is None:
    raise CheckpointError(f'no checkpoint in {checkpoint_dir(workdir)}')
  logging.info('Loaded %s variables of step %d from %s', which, got, workdir)
  if which == 'online':
    return config, {'params': state.params, 'batch_stats': state.batch_stats}
  return config, {'params': state.target_params, 'batch_stats': state.target_batch_stats}


def checkpoint_label(workdir: str, step: int | None, which: str) -> str:
  """A tool's name for the checkpoint it read: '<which> step <N>' (N: `step` or the newest)."""
  if step is None:
    steps = latest_steps(workdir)
    step = steps[0] if steps else None
  return f'{which} step {step}' if step is not None else which
