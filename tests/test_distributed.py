"""Two JAX processes on localhost equal one process with two devices (issue 7, item 6).

Each process runs `main.py --distributed --coordinator_address=127.0.0.1:PORT
--num_processes=2 --process_id=i` with one CPU device (gloo collectives, the
jax default on CPU) and reads its own half of every global batch
(input_pipeline: process_index / process_count). The reference is the
1-process run on 2 simulated devices with the same global batch
(tests/subprocess_runs.reference()).

One process alone gets SIGTERM at a random step: through JAX's preemption
sync both must stop after the same step, save it together and exit 0. The
losses of every step up to there and the whole saved TrainState must equal
the reference's (which checkpoints every step). Resuming is the same code
with one process or two (tests/test_reliability.py).
"""

import os
import random
import re
import signal
import time

import pytest

from tests import subprocess_runs as runs

# Each process runs the per-device program of the 1-process run on the same
# shard, and a sum over two devices is the same in either order: equal up to
# one final rounding of each value (runs.same_up_to_rounding).


# The 2-process run, start to exit (runs.TIMEOUT_S, as for every main.py run
# of the suite). A process waiting in a collective that its peer never joins
# would otherwise wait for XLA's own collective timeout (30 min), and pytest
# with it; past this the test fails with both processes' stacks and output.
PAIR_TIMEOUT_S = runs.TIMEOUT_S
# Once one process has exited, how long the other may take to follow it.
EXIT_GRACE_S = 120


def _start_pair(workdir, port, name):
  # montage_png: process 0 draws the first montage group from its own half of
  # the batch (slicing the global batch from one process made the first step's
  # collectives fail); it changes no step.
  return [runs.Run(workdir, '--distributed', f'--coordinator_address=127.0.0.1:{port}',
                   '--num_processes=2', f'--process_id={i}', '--config.montage_png=True',
                   devices=1, name=f'{name}{i}')
          for i in (0, 1)]


def _fail(procs, what: str):
  """Stacks of the processes still running, then kills them; fails with every output."""
  running = [p for p in procs if p.proc.poll() is None]
  for p in running:  # mcl_jax.cli.run: SIGUSR1 writes every thread's Python stack
    p.signal(signal.SIGUSR1)
  time.sleep(3 if running else 0)
  for p in running:
    p.proc.kill()
    p.proc.wait()
  report = '\n\n'.join(
      f'--- process {i}: ' + ('killed (still running; its stacks above the kill)'
                              if p in running else f'exit status {p.proc.returncode}') +
      f', {time.monotonic() - p.started:.0f}s, last lines:\n{p.tail(120)}'
      for i, p in enumerate(procs))
  raise AssertionError(f'2-process run: {what}\n{report}')


def _wait_for_step(procs, step: int, deadline: float) -> int:
  """Waits until process 0 has logged `step`; fails if a process exits first."""
  while time.monotonic() < deadline:
    seen = procs[0].printed_steps()
    if seen and max(seen) >= step:
      return max(seen)
    if any(p.proc.poll() is not None for p in procs):
      _wait_all(procs, deadline)
      _fail(procs, f'exited before step {step} was logged')
    time.sleep(0.05)
  _fail(procs, f'step {step} not logged within {PAIR_TIMEOUT_S}s')


def _wait_all(procs, deadline: float) -> list[int]:
  """Both exit statuses; fails at `deadline`, or EXIT_GRACE_S after one exited."""
  first_exit = None
  while True:
    rcs = [p.proc.poll() for p in procs]
    if None not in rcs:
      return [p.wait() for p in procs]
    now = time.monotonic()
    if first_exit is None and any(rc is not None for rc in rcs):
      first_exit = now
    if first_exit is not None and now > first_exit + EXIT_GRACE_S:
      _fail(procs, f'one process exited, the other still ran {EXIT_GRACE_S}s later')
    if now > deadline:
      _fail(procs, f'still running after {PAIR_TIMEOUT_S}s (a hang)')
    time.sleep(0.05)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_two_processes_equal_one_process_on_two_devices(tmp_path):
  ref = runs.reference()
  env_steps = os.environ.get('MCL_TEST_STOP_STEPS')
  j = int(env_steps.split(',')[0]) if env_steps else random.Random(
      int.from_bytes(os.urandom(8), 'little')).randint(3, 8)
  workdir = str(tmp_path / 'run')

  # Both processes start; process 1 alone is sent SIGTERM once step j is logged.
  procs = _start_pair(workdir, runs.free_port(), 'dist')
  deadline = procs[0].started + PAIR_TIMEOUT_S
  try:
    seen = _wait_for_step(procs, j, deadline)
    procs[1].signal(signal.SIGTERM)
    rcs = _wait_all(procs, deadline)
  finally:  # a failure above (or an interrupt) leaves no process behind
    for p in procs:
      if p.proc.poll() is None:
        p.proc.kill()
        p.proc.wait()
  if rcs != [0, 0]:
    _fail(procs, f'exit statuses {rcs}, expected [0, 0]')
  stops = [re.findall(r'^Stopped after step (\d+)', p.output(), re.M) for p in procs]
  print(f'\n2 processes: SIGTERM to process 1 once step {j} was logged (seen {seen}); '
        f'stopped after steps {stops}; first run {procs[0].seconds:.1f}s')
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  s = int(stops[0][0])
  assert max(runs.checkpoint_steps(workdir)) == s < runs.NUM_STEPS
  assert os.path.getsize(os.path.join(workdir, 'montage.png')) > 0

  # Process 0 alone writes metrics.jsonl: one line per step (not two).
  assert runs.logged_steps(workdir) == list(range(1, s + 1))
  got, want = runs.metrics_by_step(workdir), ref['metrics']
  keys = ('loss', 'grad_norm', 'param_norm')
  worst = max(abs(got[t][k] - want[t][k]) for t in range(1, s + 1) for k in keys)
  print(f'max |2 processes - 1 process| over loss/grad_norm/param_norm of steps 1..{s}: '
        f'{worst:.3g}')
  runs.same_up_to_rounding(got, want, range(1, s + 1), keys, '2 processes vs 1 process')
  a, _ = runs.load_state(workdir, s)
  b, _ = runs.load_state(ref['workdir'], s)
  diff = runs.max_abs_diff(a, b)
  print(f'TrainState of step {s} (params, target, BN stats, LARS state) max |diff|: {diff:.3g}')
  runs.same_state_up_to_rounding(a, b, '2 processes vs 1 process')
