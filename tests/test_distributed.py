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

import pytest

from tests import subprocess_runs as runs

# Each process runs the per-device program of the 1-process run on the same
# shard, and a sum over two devices is the same in either order: equal up to
# one final rounding of each value (runs.same_up_to_rounding).


def _start_pair(workdir, port, name):
  return [runs.Run(workdir, '--distributed', f'--coordinator_address=127.0.0.1:{port}',
                   '--num_processes=2', f'--process_id={i}', devices=1, name=f'{name}{i}')
          for i in (0, 1)]


def _wait_all(procs):
  rcs = [p.wait() for p in procs]
  assert rcs == [0, 0], '\n\n'.join(f'process {i} rc {rc}:\n{p.tail()}'
                                   for i, (p, rc) in enumerate(zip(procs, rcs)))


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_two_processes_equal_one_process_on_two_devices(tmp_path):
  ref = runs.reference()
  env_steps = os.environ.get('MCL_TEST_STOP_STEPS')
  j = int(env_steps.split(',')[0]) if env_steps else random.Random(
      int.from_bytes(os.urandom(8), 'little')).randint(3, 8)
  workdir = str(tmp_path / 'run')

  # Both processes start; process 1 alone is sent SIGTERM once step j is logged.
  procs = _start_pair(workdir, runs.free_port(), 'dist')
  seen = procs[0].wait_for_step(j)
  procs[1].signal(signal.SIGTERM)
  _wait_all(procs)
  stops = [re.findall(r'^Stopped after step (\d+)', p.output(), re.M) for p in procs]
  print(f'\n2 processes: SIGTERM to process 1 once step {j} was logged (seen {seen}); '
        f'stopped after steps {stops}; first run {procs[0].seconds:.1f}s')
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  s = int(stops[0][0])
  assert max(runs.checkpoint_steps(workdir)) == s < runs.NUM_STEPS

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
