"""Orbax checkpoints in the workdir, the saved config, and loading for tools.

Layout of a workdir:
  config.json          the config of the run (tools rebuild the model from it)
  checkpoints/<step>/  Orbax checkpoints of the TrainState (atomic: written to
                       a temporary directory and renamed once complete)
  metrics.jsonl, events.* (TensorBoard), montage.png
"""

import json
import os

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'


class CheckpointError(RuntimeError):
  """A workdir whose checkpoints cannot be used."""


def check_workdir(workdir: str):
  """Creates the workdir, or says clearly why it cannot be used."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise CheckpointError(f'workdir {workdir!r} cannot be created: {e}') from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise CheckpointError(f'workdir {workdir!r} is not writable: choose another '
                          '--workdir or fix its permissions')


def save_config(workdir: str, config):
  """Writes config.json (process 0)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f'{path} not found: is {workdir!r} an mcl_jax workdir?')
  with open(path) as f:
    raw = json.load(f)
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
                'loss.level_weights', 'loss.classifier', 'data.num_classes')


def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node.get(part) if hasattr(node, 'get') else None
  return tuple(node) if isinstance(node, list) else node


def check_compatible(workdir: str, config):
  """Refuses a workdir whose saved config has other parameter shapes."""
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
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
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep` complete checkpoints."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max(1, keep), create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def latest_steps(workdir: str) -> list[int]:
  """Complete checkpoint steps in the workdir, newest first."""
  d = checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return []
  return sorted((int(n) for n in os.listdir(d) if n.isdigit()), reverse=True)


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  """Saves the state (every process must call this)."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores the newest readable checkpoint onto `abstract_state`'s shardings.

  A corrupt or truncated checkpoint is skipped with a warning and the one
  before it is tried; returns (state, step), or (None, None) when none exist.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f'no checkpoint at step {step}; have {sorted(steps)}')
    steps = [step]
  for s in steps:
    try:
      state = manager.restore(s, args=ocp.args.StandardRestore(abstract_state))
      return state, s
    except Exception as e:  # pylint: disable=broad-except
      if step is not None:
        raise CheckpointError(f'checkpoint {s} in {manager.directory} cannot be '
                              f'restored: {type(e).__name__}: {e}') from e
      logging.warning('Checkpoint at step %d is unreadable (%s: %s); trying the '
                      'previous one.', s, type(e).__name__, str(e)[:300])
  if steps:
    raise CheckpointError(f'no readable checkpoint in {manager.directory} '
                          f'(tried steps {steps})')
  return None, None


def load_variables(workdir: str, step: int | None = None, which: str = 'online'):
  """(config, variables) of a run's online network or target encoder.

  For tools (export, evaluation): rebuilds the model from config.json and
  restores the TrainState on the local devices.
  """
  from mcl_jax import train  # late import: train imports this module
  if which not in ('online', 'target'):
    raise ValueError(f"which={which!r}: must be 'online' or 'target'")
  config = load_config(workdir)
  abstract = train.abstract_train_state(config)
  manager = make_manager(workdir, config.keep_checkpoints, async_save=False)
  state, got = restore_latest(manager, abstract, step)
  manager.close()
  if state is None:
    raise CheckpointError(f'no checkpoint in {checkpoint_dir(workdir)}')
  logging.info('Loaded %s variables of step %d from %s', which, got, workdir)
  if which == 'online':
    return config, {'params': state.params, 'batch_stats': state.batch_stats}
  return config, {'params': state.target_params, 'batch_stats': state.target_batch_stats}
