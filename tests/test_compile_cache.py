"""Multi-process CPU runs and the persistent compilation cache.

On jaxlib 0.12.1 a CPU program with several cross-process (Gloo) collectives
hangs in its first all-gather when it is loaded from the persistent
compilation cache, and runs when compiled afresh (0.12.0.1 and earlier run
either way). `cli_flags.initialize_distributed`, which main.py and the
fine-tune call, turns the cache off for such runs. Here two processes run one
such program twice with one cache directory: the second time is where the
cache would serve it.
"""

import os
import subprocess
import sys
import time

import jaxlib
import numpy as np
import pytest

from mcl_jax import cli_flags
from tests import subprocess_runs as runs
from tests.tolerance import tol

# Seconds for one pair of processes (start, rendezvous, compile, run: ~10 s
# alone on 2 cores). A hang waits for XLA's 30 min collective timeout.
PAIR_TIMEOUT_S = 180
X_LEN, Y_LEN = 400, 40_000

# Every process: the CLI's rendezvous, then one jitted program whose outputs
# are all replicated: two all-reduces and three all-gathers of independent
# inputs. Process 0 saves the outputs.
PROGRAM = f'''
import sys, types
import numpy as np
from mcl_jax import cli_flags
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cli_flags.initialize_distributed(types.SimpleNamespace(
    distributed=True, coordinator_address=f'127.0.0.1:{{port}}', num_processes=2,
    process_id=pid, local_device_ids=None))
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2,), ('data',))
def rows(n, seed):
  local = np.random.default_rng([seed, pid]).standard_normal((1, n)).astype(np.float32)
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)
def program(x, y):
  return (jnp.sum(x), x.reshape(-1) * 2, (y * 3).reshape(-1), y[:, :1000].reshape(-1),
          jnp.sum(y * y))
outs = jax.device_get(jax.jit(program, out_shardings=NamedSharding(mesh, P()))(
    rows({X_LEN}, 0), rows({Y_LEN}, 1)))
if pid == 0:
  np.savez(out, *outs)
print('finished', flush=True)
'''


def _rows(n: int, seed: int) -> np.ndarray:
  """Both processes' rows, stacked as the global array [2, n] holds them."""
  return np.stack([np.random.default_rng([seed, pid]).standard_normal(n).astype(np.float32)
                   for pid in (0, 1)])


def _run_pair(tmp_path, cache: str, name: str) -> tuple[list[str], dict]:
  """Runs PROGRAM on two processes; their outputs and process 0's arrays."""
  port, out = runs.free_port(), str(tmp_path / f'{name}.npz')
  env = runs.env(1, JAX_COMPILATION_CACHE_DIR=cache)
  procs = [subprocess.Popen([sys.executable, '-c', PROGRAM, str(i), str(port), out],
                            cwd=runs.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
  deadline = time.monotonic() + PAIR_TIMEOUT_S
  try:
    texts = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    texts = [p.communicate()[0] for p in procs]
    pytest.fail(f'{name}: two processes still running after {PAIR_TIMEOUT_S}s (a hang):\n'
                + '\n'.join(t[-3000:] for t in texts))
  for i, (p, text) in enumerate(zip(procs, texts)):
    assert p.returncode == 0 and 'finished' in text, f'{name}, process {i}:\n{text[-3000:]}'
  return texts, dict(np.load(out))


def test_cached_multi_process_program_runs(tmp_path):
  cache = str(tmp_path / 'cache')
  x, y = _rows(X_LEN, 0), _rows(Y_LEN, 1)
  hangs = cli_flags.cpu_cache_hangs(jaxlib.__version__)
  for name in ('cold', 'warm'):  # 'warm': the cache holds the program, unless turned off
    texts, got = _run_pair(tmp_path, cache, name)
    assert all(('compilation cache off' in t) == hangs for t in texts), texts
    # Gathered values are copies, exact; sums within their rounding.
    np.testing.assert_array_equal(got['arr_1'], (x * 2).reshape(-1))
    np.testing.assert_array_equal(got['arr_2'], (y * 3).reshape(-1))
    np.testing.assert_array_equal(got['arr_3'], y[:, :1000].reshape(-1))
    # A sum of random signs: its partial sums are about sqrt(n) in size.
    assert abs(got['arr_0'] - x.astype(np.float64).sum()) <= tol(np.float32, x.size, np.sqrt(x.size))
    yy = (y.astype(np.float64) ** 2).sum()
    assert abs(got['arr_4'] - yy) <= tol(np.float32, y.size, yy)
  # Where the cache is used, the warm run had it to read from.
  assert hangs or os.listdir(cache)
  print(f'\njaxlib {jaxlib.__version__}: cache {"off" if hangs else "on"}; both pairs ran')


@pytest.mark.parametrize('version, hangs', [
    ('0.10.2', False), ('0.11.2', False), ('0.12.0', False), ('0.12.0.1', False),
    ('0.12.1', True), ('0.12.1.dev20261201', True), ('0.13.0', True), ('1.0.0', True)])
def test_which_jaxlib_releases_turn_the_cache_off(version, hangs):
  assert cli_flags.cpu_cache_hangs(version) == hangs
