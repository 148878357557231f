"""Real `python main.py` runs for tests/test_reliability.py and test_distributed.py.

Every run trains one small config for NUM_STEPS steps: configs/test_tiny.py
with two montage levels and one neck conv (a smaller program to compile; the
loop, the checkpoints and the data pipeline are the same code as any run).
All runs of a pytest session share one JAX persistent compilation cache and
compile at XLA CPU optimisation level 0, so the train step is compiled once
per distinct program (the reference run, a changed-loss run, the 2-process
run) and every other run loads it. The numbers are those of the same program
either way; only compile time changes.

The reference run (1 process, 2 simulated CPU devices, uninterrupted) is run
once per session (once for all pytest-xdist workers), keeping every
checkpoint, and serves every file that starts main.py: resume
runs are compared with it, and so is the 2-process run (same global batch).

The runs compile with the XLA flags of the pytest process (a float path
chosen by the caller, scripts/float_paths.py), with the device count and
the optimisation level replaced as above.

Every run also gets the same XLA CPU thread count, whatever the machine.
XLA sizes a process's intra-op thread pool as max(cores, devices), and the
pool's size decides how a long reduction is split (the stem convolution's
weight gradient sums over the whole batch). On one core, a 1-process run
on 2 devices gets two threads and each process of a 2-process run one, so
the two would sum in different orders from the first step. XLA reads the
core count from NPROC when it is set; env() passes the caller's NPROC on,
or sets it to 2.

Two runs of the same program on the same state (a resumed run and the
uninterrupted one; two processes and one process with the same per-device
work) are expected to agree bit for bit; the comparisons allow each value
one final rounding on each side (`same_up_to_rounding`, tests/tolerance.py).

Environment knobs (for reproducing a failure):
  MCL_TEST_KILL_STEP, MCL_TEST_STOP_STEPS  fix the random steps of the
                                           kill / signal tests;
  MCL_TEST_JAX_CACHE                       reuse a compilation cache dir
                                           across sessions.
"""

import atexit
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from mcl_jax import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 12
# Every random augmentation on (flip, jitter, grayscale, blur, solarize), so that
# resume tests cover all the per-step keys whatever configs/demo.py sets.
FLAGS = ('--config=configs/test_tiny.py', f'--config.optim.num_steps={NUM_STEPS}',
         '--config.loss.level_weights=(0.5,0.5)', '--config.data.num_crops=4',
         '--config.model.neck_convs=1', '--config.augment.flip_p=(0.5,0.5)',
         '--config.augment.blur_p=(1.0,0.1)', '--config.augment.solarize_p=(0.0,0.2)',
         '--config.augment.grayscale_p=(0.2,0.2)', '--config.augment.jitter_p=(0.8,0.8)')
TIMEOUT_S = 900
# XLA CPU threads of every run (see the module docstring), unless NPROC is set.
THREADS = 2

_ROOT = None
_REFERENCE = None


def root() -> str:
  """A scratch directory for the whole pytest session.

  tests/conftest.py makes it (MCL_TEST_RUNS_ROOT) and removes it at the end;
  pytest-xdist's workers inherit it, so they share the reference run and
  the compilation cache.
  """
  global _ROOT
  if _ROOT is None:
    _ROOT = os.environ.get('MCL_TEST_RUNS_ROOT')
    if not _ROOT:  # imported outside the suite
      _ROOT = tempfile.mkdtemp(prefix='mcl_runs_')
      atexit.register(shutil.rmtree, _ROOT, True)
  return _ROOT


def cache_dir() -> str:
  return os.environ.get('MCL_TEST_JAX_CACHE') or os.path.join(root(), 'jax_cache')


# Flags env() sets itself; any other XLA flag of this process is passed on.
_OWN_FLAGS = ('--xla_force_host_platform_device_count', '--xla_backend_optimization_level')


def env(num_devices: int, **extra) -> dict:
  e = dict(os.environ)
  inherited = [f for f in os.environ.get('XLA_FLAGS', '').split()
               if not f.startswith(_OWN_FLAGS)]
  e.update(
      JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='', TF_CPP_MIN_LOG_LEVEL='2',
      PYTHONUNBUFFERED='1',
      XLA_FLAGS=' '.join([f'--xla_force_host_platform_device_count={num_devices}',
                          '--xla_backend_optimization_level=0', *inherited]),
      JAX_COMPILATION_CACHE_DIR=cache_dir(),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
      NPROC=os.environ.get('NPROC') or str(THREADS))
  e.update({k: str(v) for k, v in extra.items()})
  return e


def command(workdir: str, *extra: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, 'main.py'), *FLAGS, f'--workdir={workdir}',
          *extra]


class Run:
  """One main.py process, its output in a log file."""

  def __init__(self, workdir: str, *extra: str, devices: int = 2, name: str = 'run',
               env_extra: dict | None = None):
    self.workdir = workdir
    self.log_path = os.path.join(root(), f'{name}-{os.getpid()}-{time.monotonic_ns()}.log')
    self._log = open(self.log_path, 'w')
    self.started = time.monotonic()
    self.proc = subprocess.Popen(command(workdir, *extra), cwd=REPO,
                                 env=env(devices, **(env_extra or {})),
                                 stdout=self._log, stderr=subprocess.STDOUT)

  def wait(self, timeout: float = TIMEOUT_S) -> int:
    try:
      rc = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise AssertionError(f'main.py still running after {timeout}s:\n{self.tail()}')
    self._log.close()
    self.seconds = time.monotonic() - self.started
    return rc

  def output(self) -> str:
    if not self._log.closed:
      self._log.flush()
    with open(self.log_path) as f:
      return f.read()

  def tail(self, n: int = 40) -> str:
    return '\n'.join(self.output().splitlines()[-n:])

  def printed_steps(self) -> list[int]:
    """Steps this process has finished and logged (its console lines "step k/N")."""
    return [int(m) for m in re.findall(r'^step (\d+)/\d+ ', self.output(), re.M)]

  def wait_for_step(self, step: int, timeout: float = TIMEOUT_S) -> int:
    """Waits until this process has logged `step`; returns the last step it logged.

    Reads the process's own console lines, printed right after each
    metrics.jsonl line: a resumed run's metrics.jsonl still holds the old
    run's lines until it has restored its checkpoint.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      seen = self.printed_steps()
      if seen and max(seen) >= step:
        return max(seen)
      if self.proc.poll() is not None:
        raise AssertionError(f'main.py exited ({self.proc.returncode}) before step '
                             f'{step} was logged:\n{self.tail()}')
      time.sleep(0.005)
    raise AssertionError(f'step {step} not logged within {timeout}s:\n{self.tail()}')

  def signal(self, sig):
    self.proc.send_signal(sig)


def run(workdir: str, *extra: str, devices: int = 2, name: str = 'run') -> Run:
  """Runs main.py to completion; returns the Run (rc in .rc)."""
  r = Run(workdir, *extra, devices=devices, name=name)
  r.rc = r.wait()
  return r


# ------------------------------------------------------------------ reading --

def metrics_lines(workdir: str) -> list[dict]:
  """All complete, parsable lines of metrics.jsonl, in order (local or gs://)."""
  path = paths.join(workdir, 'metrics.jsonl')
  if not paths.exists(path):
    return []
  out = []
  for line in paths.read_text(path).splitlines(keepends=True):
    if line.endswith('\n'):
      try:
        out.append(json.loads(line))
      except ValueError:
        pass
  return out


def logged_steps(workdir: str) -> list[int]:
  return [int(m['step']) for m in metrics_lines(workdir)]


def metrics_by_step(workdir: str) -> dict[int, dict]:
  """{step: metrics}; a step logged twice keeps its last line."""
  return {int(m['step']): m for m in metrics_lines(workdir)}


def checkpoint_steps(workdir: str) -> list[int]:
  """Complete checkpoints: step folders (on gs://, those holding Orbax's commit marker)."""
  d = paths.join(workdir, 'checkpoints')
  steps = sorted(int(n) for n in paths.listdir(d) if n.isdigit())
  if paths.is_cloud(d):
    steps = [s for s in steps if paths.exists(paths.join(d, str(s), paths.COMMIT_FILE))]
  return steps


def checkpoint_entries(workdir: str) -> list[str]:
  return paths.listdir(paths.join(workdir, 'checkpoints'))


def load_state(workdir: str, step: int | None = None):
  """The TrainState of a checkpoint as host numpy arrays (restored in this process)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mcl_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from mcl_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from mcl_jax.training import optim  # pylint: disable=g-import-not-at-top
  config = checkpointing.load_config(workdir)
  manager = checkpointing.make_manager(workdir, config.keep_checkpoints, async_save=False)
  try:
    state, got = checkpointing.restore_latest(manager, state_lib.abstract_train_state(
        config, optim.create_optimizer(config, 1)),
                                              step, quarantine_corrupt=False)
  finally:
    manager.close()
  return jax.device_get(state), got


def max_abs_diff(a, b) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             if np.size(x) else 0.0 for x, y in zip(la, lb))


def loss_diffs(got: dict[int, dict], want: dict[int, dict], steps) -> dict[int, float]:
  return {s: abs(got[s]['loss'] - want[s]['loss']) for s in steps}


def rounding_tol(value: float) -> float:
  """One float32 rounding of `value` on each side: the same program's result."""
  from tests import tolerance  # pylint: disable=g-import-not-at-top
  return tolerance.tol(np.float32, 1, abs(value), sides=2, worst_case=True)


def same_up_to_rounding(got: dict[int, dict], want: dict[int, dict], steps, keys, label: str):
  """Logged values of two runs of the same program: each within rounding_tol."""
  from tests import tolerance  # pylint: disable=g-import-not-at-top
  worst, where = -1.0, None
  for s in steps:
    for k in keys:
      ratio = abs(got[s][k] - want[s][k]) / rounding_tol(want[s][k])
      if ratio > worst:
        worst, where = ratio, (s, k)
  s, k = where
  tolerance.check(abs(got[s][k] - want[s][k]), rounding_tol(want[s][k]),
                  f'{label}: step {s} {k}, the worst of steps {min(steps)}..{max(steps)}')


def same_state_up_to_rounding(a, b, label: str):
  """Two TrainStates (host arrays): every leaf within one rounding of its
  largest entry on each side."""
  import jax  # pylint: disable=g-import-not-at-top
  from tests import tolerance  # pylint: disable=g-import-not-at-top
  assert jax.tree.structure(a) == jax.tree.structure(b)
  worst, where = -1.0, None
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    if not np.size(x):
      continue
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    err, bound = float(np.max(np.abs(x - y))), rounding_tol(float(np.max(np.abs(y))))
    ratio = err / bound if bound else (0.0 if err == 0 else np.inf)
    if ratio > worst:
      worst, where = ratio, (jax.tree_util.keystr(path), err, bound)
  name, err, bound = where
  tolerance.check(err, bound, f'{label}: TrainState, the worst leaf {name}')


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------- reference --

def reference() -> dict:
  """The uninterrupted 1-process, 2-device run (once per session).

  It checkpoints every step and keeps them all, for the tests that start from
  a copy of one or compare a state with one (checkpoint_every and
  keep_checkpoints are not part of the compiled program).
  """
  global _REFERENCE
  if _REFERENCE is None:
    workdir = os.path.join(root(), 'reference')
    done = os.path.join(root(), 'reference.json')
    # One run for every xdist worker: the first to get here runs it, the
    # others wait for it and read what it wrote.
    with open(os.path.join(root(), 'reference.lock'), 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not os.path.exists(done):
        assert not os.path.exists(workdir), 'the reference run failed in another worker'
        r = run(workdir, '--config.checkpoint_every=1',
                f'--config.keep_checkpoints={NUM_STEPS}', name='reference')
        assert r.rc == 0, r.tail()
        print(f'\nreference run: {r.seconds:.1f}s (includes compiling the train step)')
        with open(done + '.tmp', 'w') as f:
          json.dump({'seconds': r.seconds, 'log': r.log_path}, f)
        os.replace(done + '.tmp', done)
      with open(done) as f:
        info = json.load(f)
    m = metrics_by_step(workdir)
    assert sorted(m) == list(range(1, NUM_STEPS + 1)), sorted(m)
    assert all(np.isfinite(v['loss']) for v in m.values())
    with open(info['log']) as f:
      output = f.read()
    _REFERENCE = {'workdir': workdir, 'metrics': m, 'seconds': info['seconds'],
                  'output': output}
  return _REFERENCE


def copy_workdir(src: str, dst: str, keep_steps=None) -> str:
  """Copies a workdir; with keep_steps, only those checkpoints."""
  shutil.copytree(src, dst)
  if keep_steps is not None:
    for s in checkpoint_steps(dst):
      if s not in keep_steps:
        shutil.rmtree(os.path.join(dst, 'checkpoints', str(s)))
  return dst


def sigkill(r: Run):
  r.proc.send_signal(signal.SIGKILL)


# ----------------------------------------------- shared by the run tests --

def random_steps_rng() -> random.Random:
  """A freshly seeded RNG for the kill and signal steps (printed by each test)."""
  return random.Random(int.from_bytes(os.urandom(8), 'little'))


def env_steps(name: str) -> list[int] | None:
  """The steps fixed in environment variable `name` ('3,7'), or None."""
  v = os.environ.get(name)
  return [int(x) for x in v.split(',')] if v else None


def assert_losses_match(workdir: str, steps, label: str) -> float:
  """Every step's loss in `workdir` within one rounding of the uninterrupted run's.

  Returns the largest difference (printed).
  """
  got, want = metrics_by_step(workdir), reference()['metrics']
  diffs = loss_diffs(got, want, steps)
  worst = max(diffs.values())
  print(f'{label}: steps {min(steps)}..{max(steps)}, max |loss - uninterrupted| = {worst:.3g}')
  same_up_to_rounding(got, want, steps, ('loss',), f'{label} vs uninterrupted')
  return worst
