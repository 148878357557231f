"""Fault tolerance of the training loop, checkpoints, config and workdir (issue 7).

The config rules themselves are tests/test_config_validation.py's.

Subprocess tests run the real `python main.py` (tests/subprocess_runs.py:
small config, shared compilation cache) and kill or signal it at a random
step, printed, and settable with MCL_TEST_KILL_STEP / MCL_TEST_STOP_STEPS.
In-process tests work on copies of the reference run's workdir and never
compile a train step.
"""

import gc
import hashlib
import logging
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from tests import subprocess_runs as runs
from tests.tiny_config import tiny_config
from mcl_jax.training import checkpointing, logs, loop, signals
from mcl_jax import config_validation
from mcl_jax.training import state as state_lib
from mcl_jax.training import optim

# Orbax/TensorStore report failed reads of damaged files from a closed event loop.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

# issue 7: resumed losses equal the uninterrupted run's (CPU f32): the same
# program on the same restored state, so equal up to one final rounding of
# each value (runs.same_up_to_rounding).


# ------------------------------------------- 4. config validation (the run) --

def test_validation_runs_before_anything_else(tmp_path, monkeypatch):
  """An impossible config fails at once: no workdir, no compile, no data."""
  monkeypatch.setattr(loop, 'make_train_step', lambda *a: pytest.fail('compiled'))
  monkeypatch.setattr(state_lib, 'create_train_state', lambda *a, **k: pytest.fail('initialised'))
  workdir = tmp_path / 'never'
  t0 = time.monotonic()
  with pytest.raises(config_validation.ConfigError, match='optim.momentum'):
    loop.train_and_evaluate(tiny_config(**{'optim.momentum': 1.5, 'optim.global_batch': 64}),
                             str(workdir))
  assert time.monotonic() - t0 < 5 and not workdir.exists()


# ------------------------------------------------- 5. non-finite (units) --

def test_check_finite_names_the_step():
  loop._check_finite({'loss': 1.0, 'grad_norm': 2.0, 'param_norm': 3.0}, 7, 6)
  for name, bad in (('loss', float('nan')), ('grad_norm', float('inf')),
                    ('param_norm', float('inf'))):
    m = {'loss': 1.0, 'grad_norm': 2.0, 'param_norm': 3.0, name: bad}
    with pytest.raises(loop.NonFiniteError, match=rf'{name} not finite at step 7 .*step 6\)'):
      loop._check_finite(m, 7, 6)


# ----------------------------------------------------------- 7. the workdir --

def test_missing_workdir_is_created(tmp_path):
  workdir = tmp_path / 'a' / 'b' / 'run'
  checkpointing.check_workdir(str(workdir))
  assert workdir.is_dir() and not os.listdir(workdir)  # the write probe is removed


def test_workdir_that_cannot_be_created(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(checkpointing.CheckpointError, match='cannot be created'):
    checkpointing.check_workdir(str(blocker / 'run'))   # a path under a regular file
  with pytest.raises(checkpointing.CheckpointError, match='cannot be created'):
    checkpointing.check_workdir(str(blocker))            # the workdir is a file


def test_read_only_workdir(tmp_path):
  if os.geteuid() == 0:
    pytest.skip('running as root: chmod does not stop root from writing')
  workdir = tmp_path / 'ro'
  workdir.mkdir()
  workdir.chmod(0o555)
  try:
    with pytest.raises(checkpointing.CheckpointError, match='not writable'):
      checkpointing.check_workdir(str(workdir))
  finally:
    workdir.chmod(0o755)


def test_unusable_workdir_fails_before_compiling(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, 'make_train_step', lambda *a: pytest.fail('compiled'))
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(checkpointing.CheckpointError, match='cannot be created'):
    loop.train_and_evaluate(tiny_config(**{'optim.global_batch': 64}), str(blocker / 'run'))


def test_truncate_metrics_keeps_one_line_per_step(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [f'{{"step": {s}, "loss": {s}.0}}' for s in (1, 2, 3, 4)]
  path.write_text('\n'.join(lines) + '\n{"step": 5, "lo')  # a line cut by a kill
  assert logs.truncate_metrics(str(tmp_path), 2) == 3
  assert path.read_text() == '\n'.join(lines[:2]) + '\n'
  assert logs.truncate_metrics(str(tmp_path), 2) == 0


# --------------------------------------------- 1. SIGKILL, resume, identical --

def test_sigkill_at_random_step_then_resume_matches_uninterrupted(tmp_path):
  ref = runs.reference()
  k = (runs.env_steps('MCL_TEST_KILL_STEP')
       or [runs.random_steps_rng().randint(3, runs.NUM_STEPS - 3)])[0]
  workdir = str(tmp_path / 'run')
  r = runs.Run(workdir, name='killed')
  seen = r.wait_for_step(k)
  r.proc.send_signal(signal.SIGKILL)
  rc = r.wait()
  assert rc == -signal.SIGKILL, f'not killed (rc {rc}):\n{r.tail()}'
  logged, entries = runs.logged_steps(workdir), runs.checkpoint_entries(workdir)
  ckpts = runs.checkpoint_steps(workdir)
  print(f'\nSIGKILL chosen at step {k} (seen {seen}); the killed run had logged up to '
        f'{max(logged)}, checkpoints on disk: {entries} (killed run {r.seconds:.1f}s)')
  assert not ckpts or max(ckpts) < runs.NUM_STEPS

  resumed = runs.run(workdir, name='resumed')
  assert resumed.rc == 0, resumed.tail()
  out = resumed.output()
  # The async save of a checkpoint can still be in flight when the kill lands
  # (then only its .orbax-checkpoint-tmp dir exists): the run restarts from
  # the newest complete one, or from scratch.
  start = max(ckpts) if ckpts else 0
  assert (f'Resumed from the checkpoint of step {start}.' if ckpts
          else 'Starting a new run') in out, out[-3000:]
  # metrics.jsonl was cut back to `start` on resume: each step once, in order.
  assert runs.logged_steps(workdir) == list(range(1, runs.NUM_STEPS + 1))
  runs.assert_losses_match(workdir, range(start + 1, runs.NUM_STEPS + 1),
                       f'resumed from {start} after SIGKILL at {seen}')
  runs.assert_losses_match(workdir, range(1, runs.NUM_STEPS + 1), 'whole log')
  assert not [e for e in runs.checkpoint_entries(workdir) if 'tmp' in e]
  got, _ = runs.load_state(workdir, runs.NUM_STEPS)
  want, _ = runs.load_state(ref['workdir'], runs.NUM_STEPS)
  diff = runs.max_abs_diff(got, want)
  print(f'final TrainState max |resumed - uninterrupted| = {diff:.3g}; resume run '
        f'{resumed.seconds:.1f}s')
  runs.same_state_up_to_rounding(got, want, 'resumed vs uninterrupted')


# -------------------------- 2 + 3. SIGTERM, corrupt latest, SIGINT (E2E) --

def _data_files(step_dir):
  out = []
  for d, _, files in os.walk(step_dir):
    if os.path.basename(d) == 'd':
      out += [os.path.join(d, f) for f in files]
  assert out, step_dir
  return out


def corrupt(step_dir, how):
  """Damages a checkpoint the way a crash or a bad disk would."""
  if how == 'truncate':
    for f in _data_files(step_dir):
      os.truncate(f, os.path.getsize(f) // 2)
  elif how == 'overwrite':
    rng = np.random.default_rng(0)
    for f in _data_files(step_dir):
      with open(f, 'r+b') as fh:
        fh.seek(os.path.getsize(f) // 2)
        fh.write(rng.bytes(64))
  elif how == 'metadata':
    with open(os.path.join(step_dir, 'default', '_METADATA'), 'w') as fh:
      fh.write('{"tree_metadata": {')
  else:
    raise ValueError(how)


def test_sigterm_saves_and_exits_0_then_corrupt_latest_falls_back_then_sigint(tmp_path):
  runs.reference()
  rng = runs.random_steps_rng()
  j1, j2 = runs.env_steps('MCL_TEST_STOP_STEPS') or (rng.randint(3, 6), rng.randint(8, 9))
  workdir = str(tmp_path / 'run')

  # SIGTERM: checkpoint of the current step, exit status 0.
  r = runs.Run(workdir, name='sigterm')
  seen = r.wait_for_step(j1)
  r.signal(signal.SIGTERM)
  assert r.wait() == 0, r.tail()
  s1 = max(runs.logged_steps(workdir))
  print(f'\nSIGTERM sent once step {j1} was logged (seen {seen}): stopped after step {s1}, '
        f'checkpoints {runs.checkpoint_entries(workdir)}')
  assert f'Stopped after step {s1} (SIGTERM)' in r.output()
  assert max(runs.checkpoint_steps(workdir)) == s1 and s1 < runs.NUM_STEPS
  runs.assert_losses_match(workdir, range(1, s1 + 1), 'before SIGTERM')

  # Corrupt the newest checkpoint: the rerun warns, restores the previous one,
  # moves the bad one aside, and trains on exactly as the uninterrupted run.
  corrupt(os.path.join(workdir, 'checkpoints', str(s1)), 'truncate')
  previous = max(s for s in runs.checkpoint_steps(workdir) if s < s1)
  r = runs.Run(workdir, name='sigint')
  seen = r.wait_for_step(j2)
  r.signal(signal.SIGINT)
  assert r.wait() == 0, r.tail()
  out = r.output()
  s2 = max(runs.logged_steps(workdir))
  print(f'corrupted checkpoint {s1}: resumed from {previous}; SIGINT once step {j2} was '
        f'logged (seen {seen}): stopped after {s2}; checkpoints '
        f'{runs.checkpoint_entries(workdir)}')
  assert f'Checkpoint of step {s1} is unreadable' in out
  assert f'Resumed from the checkpoint of step {previous}.' in out
  assert f'Stopped after step {s2} (SIGINT)' in out
  assert ('SIGINT received: stopping after the current step and saving it' in out
          and 'press Ctrl-C again' in out), out[-3000:]
  assert f'{s1}.corrupt' in runs.checkpoint_entries(workdir)
  assert max(runs.checkpoint_steps(workdir)) == s2
  assert runs.logged_steps(workdir) == list(range(1, s2 + 1))
  runs.assert_losses_match(workdir, range(previous + 1, s2 + 1), 'after the fallback')
  state, got = runs.load_state(workdir)
  assert got == s2 and int(state.step) == s2


# -------------------------------------- 3. corrupt checkpoints, in process --

def _abstract(workdir):
  config = checkpointing.load_config(workdir)
  return state_lib.abstract_train_state(config, optim.create_optimizer(config, 1))


@pytest.mark.parametrize('how, keep', [('truncate', 1), ('truncate', 2), ('overwrite', 1),
                                       ('metadata', 2)])
def test_corrupt_latest_is_skipped_quarantined_and_never_costs_the_good_one(
    tmp_path, caplog, how, keep):
  workdir = runs.copy_workdir(runs.reference()['workdir'], str(tmp_path / 'run'),
                              keep_steps=(8, 10))
  corrupt(os.path.join(workdir, 'checkpoints', '10'), how)
  abstract = _abstract(workdir)
  manager = checkpointing.make_manager(workdir, keep, async_save=False)
  with caplog.at_level(logging.WARNING):
    state, step = checkpointing.restore_latest(manager, abstract)
  assert step == 8 and int(jax.device_get(state.step)) == 8
  assert 'Checkpoint of step 10 is unreadable' in caplog.text
  assert runs.checkpoint_entries(workdir) == ['10.corrupt', '8']
  assert manager.all_steps() == [8]
  # The resumed run saves step 10 again; max_to_keep (1 or 2) counts only
  # real checkpoints, so the good one goes only once the new one is complete.
  checkpointing.save(manager, 10, state, force=True)
  manager.wait_until_finished()
  manager.close()
  assert runs.checkpoint_entries(workdir) == (['10', '10.corrupt'] if keep == 1
                                              else ['10', '10.corrupt', '8'])
  again = checkpointing.make_manager(workdir, keep, async_save=False)
  restored, step = checkpointing.restore_latest(again, abstract)
  again.close()
  assert step == 10
  assert runs.max_abs_diff(jax.device_get(restored), jax.device_get(state)) == 0


def test_unreadable_everywhere_raises_and_renames_nothing(tmp_path):
  workdir = runs.copy_workdir(runs.reference()['workdir'], str(tmp_path / 'run'),
                              keep_steps=(8, 10))
  for s in (8, 10):
    corrupt(os.path.join(workdir, 'checkpoints', str(s)), 'truncate')
  manager = checkpointing.make_manager(workdir, 2, async_save=False)
  with pytest.raises(checkpointing.CheckpointError, match=r'tried steps \[10, 8\]'):
    checkpointing.restore_latest(manager, _abstract(workdir))
  manager.close()
  assert runs.checkpoint_entries(workdir) == ['10', '8']


def test_leftover_tmp_checkpoint_is_never_restored_and_is_cleaned(tmp_path):
  """A save cut short leaves <step>.orbax-checkpoint-tmp; the last good one is used."""
  workdir = runs.copy_workdir(runs.reference()['workdir'], str(tmp_path / 'run'),
                              keep_steps=(8,))
  ckpts = os.path.join(workdir, 'checkpoints')
  # Complete contents, never renamed (the kill came between write and rename),
  # and a half-written one.
  shutil.copytree(os.path.join(ckpts, '8'), os.path.join(ckpts, '12.orbax-checkpoint-tmp'))
  shutil.copytree(os.path.join(ckpts, '8'), os.path.join(ckpts, '10.orbax-checkpoint-tmp'))
  corrupt(os.path.join(ckpts, '10.orbax-checkpoint-tmp'), 'truncate')
  assert checkpointing.latest_steps(workdir) == [8]
  manager = checkpointing.make_manager(workdir, 2, async_save=False)
  state, step = checkpointing.restore_latest(manager, _abstract(workdir))
  manager.close()
  assert step == 8 and int(jax.device_get(state.step)) == 8
  assert runs.checkpoint_entries(workdir) == ['8']


# ---------------------------------------- 7. a checkpoint of another model --

def test_checkpoint_of_another_model_is_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, 'make_train_step', lambda *a: pytest.fail('compiled'))
  workdir = runs.copy_workdir(runs.reference()['workdir'], str(tmp_path / 'run'),
                              keep_steps=(12,))
  other = checkpointing.load_config(workdir)
  other.optim.global_batch = 64  # 8 in-process devices
  other.model.width = 16
  # Caught from config.json before anything is built...
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"different model \(model.width: checkpoint 8 vs now 16"):
    loop.train_and_evaluate(other, workdir)
  # ...and from the checkpoint's own array shapes when config.json is gone.
  os.remove(os.path.join(workdir, checkpointing.CONFIG_FILE))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'checkpoint 12 .* different model .*backbone'):
    loop.train_and_evaluate(other, workdir)
  assert runs.checkpoint_entries(workdir) == ['12']  # nothing renamed or deleted


# --------------------------------------------- 5. non-finite, end to end --

def _digest(step_dir):
  h = hashlib.sha256()
  for d, _, files in sorted(os.walk(step_dir)):
    for f in sorted(files):
      with open(os.path.join(d, f), 'rb') as fh:
        h.update(f.encode() + fh.read())
  return h.hexdigest()


def test_non_finite_loss_stops_and_no_non_finite_state_is_saved(tmp_path):
  """A NaN loss at step 11 stops the run; nothing of step 11 is saved.

  The NaN comes from the real model: checkpoint 10 of a copy of the
  reference run gets a NaN in the target encoder's first conv (the online
  network and the optimizer are untouched), so the target embeddings, the
  loss and the gradients of step 11 are NaN. (A config such as
  --config.loss.tau=1e-30 does the same, at the price of compiling another
  program.) checkpoint_every=1 makes step 11 a checkpoint step: its metrics
  must be checked before its state is saved (they are otherwise fetched one
  step late).
  """
  workdir = runs.copy_workdir(runs.reference()['workdir'], str(tmp_path / 'run'),
                              keep_steps=(8, 10))
  state, _ = runs.load_state(workdir, 10)
  kernel = state.target_params['backbone']['conv1']['kernel']
  state.target_params['backbone']['conv1']['kernel'] = np.full_like(kernel, np.nan)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '10'))
  manager = checkpointing.make_manager(workdir, 12, async_save=False)
  checkpointing.save(manager, 10, state, force=True)
  manager.close()
  before = {s: _digest(os.path.join(workdir, 'checkpoints', str(s))) for s in (8, 10)}

  r = runs.run(workdir, '--config.checkpoint_every=1', name='nan')
  out = r.output()
  print(f'\nnon-finite run: rc {r.rc}, {r.seconds:.1f}s')
  assert r.rc == 1, out[-3000:]
  msg = re.search(r'^error: (.*not finite.*)$', out, re.M)
  assert msg, out[-3000:]
  print(msg.group(0))
  assert re.match(r'loss(, \w+)* not finite at step 11 \(loss=nan', msg.group(1))
  assert 'the last good checkpoint (step 10) is kept' in msg.group(1)
  assert runs.checkpoint_entries(workdir) == ['10', '8']  # no 11, no tmp dir
  assert {s: _digest(os.path.join(workdir, 'checkpoints', str(s))) for s in (8, 10)} == before
  assert max(runs.logged_steps(workdir)) == 10  # the NaN step is not logged


def _logged(caplog, text: str) -> bool:
  """Waits up to 5 s for `text` in the log (the acknowledging thread logs it)."""
  for _ in range(500):
    if text in caplog.text:
      return True
    time.sleep(0.01)
  return False


def test_second_signal_is_not_swallowed(caplog):
  """The first SIGINT is a stop request, acknowledged at once; a second one interrupts."""
  caplog.set_level(logging.INFO)
  # raise_signal delivers to this (the main) thread; os.kill may pick another
  # thread, whose C handler can run later than a fixed sleep on a loaded box.
  # The polls below give delivery up to 5 s and end as soon as it happens.
  # The "previous behaviour" is pinned to Python's default (KeyboardInterrupt),
  # and the garbage collector is paused: a Python signal handler that happens
  # to run inside a finaliser has its exception printed and dropped.
  ambient = signal.signal(signal.SIGINT, signal.default_int_handler)
  gc.collect()
  gc.disable()
  raised = False
  try:
    with signals.StopSignal() as stop:
      assert not stop.should_stop(0)
      signal.raise_signal(signal.SIGINT)
      for _ in range(500):
        if stop.received:
          break
        time.sleep(0.01)
      assert stop.received == 'SIGINT' and stop.should_stop(1)
      assert _logged(caplog, 'SIGINT received: stopping after the current step'), caplog.text
      try:
        signal.raise_signal(signal.SIGINT)
        for _ in range(500):
          time.sleep(0.01)
      except KeyboardInterrupt:
        raised = True
  finally:
    gc.enable()
    signal.signal(signal.SIGINT, ambient)
  assert raised, f'second SIGINT swallowed (handler before the test: {ambient!r})'
  assert _logged(caplog, 'SIGINT received again: quitting without saving'), caplog.text
