"""What the benchmarks read off a compiled step: FLOPs, memory, peak matmul rate, compiles.

Shared by `benchmarks.train_step`, `benchmarks.step_breakdown` and
`benchmarks.input_pipeline` (each imports this module, never each other).
"""

import contextlib
import logging
import re
import statistics
import time


def flops(compiled) -> float:
  """FLOPs of one call from the compiled executable's cost analysis (nan if none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def memory(compiled, device) -> dict:
  """Device peak (memory_stats) where available, plus the compiled sizes."""
  out = {}
  stats = None
  with contextlib.suppress(Exception):
    stats = device.memory_stats()
  if stats:
    out['peak_bytes_in_use'] = stats.get('peak_bytes_in_use')
    out['bytes_limit'] = stats.get('bytes_limit')
  else:
    out['peak_bytes_in_use'] = None  # 'n/a' (the CPU backend keeps no statistics)
  with contextlib.suppress(Exception):
    ma = compiled.memory_analysis()
    for k in ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
              'temp_size_in_bytes', 'generated_code_size_in_bytes'):
      out[k] = getattr(ma, k, None)
    out['compiled_total_bytes'] = (ma.argument_size_in_bytes + ma.output_size_in_bytes
                                   - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
  return out


def make_matmul(dtype_name: str, n: int):
  """A large n x n x n matmul in the model's dtype: fn() -> seconds of one run."""
  import jax
  import jax.numpy as jnp
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[dtype_name]
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()

  def run():
    t = time.perf_counter()
    f(a, b).block_until_ready()
    return time.perf_counter() - t
  return run


def peak(res, matmul_times, n, ndev):
  """Peak TFLOP/s from the median matmul time (measured between the steps) and MFU."""
  med = statistics.median(matmul_times)
  res.update(matmul_n=n, matmul_s=med, peak_tflops=2 * n**3 / med / 1e12)
  res['mfu'] = res['tflops'] / ndev / res['peak_tflops']


class CompileCounter(logging.Handler):
  """Counts 'Finished XLA compilation of jit(<name>)' records (jax_log_compiles)."""

  def __init__(self):
    super().__init__()
    self.compiled = []

  def emit(self, record):
    m = re.search(r'Finished XLA compilation of (\S+)', record.getMessage())
    if m:
      self.compiled.append(m.group(1))

  def count(self, name: str) -> int:
    return sum(1 for c in self.compiled if name in c)


@contextlib.contextmanager
def log_compiles():
  """Turns on jax_log_compiles and captures its records (quietly)."""
  import jax
  logger = logging.getLogger('jax')
  counter = CompileCounter()
  old = (jax.config.jax_log_compiles, logger.propagate, logger.level)
  jax.config.update('jax_log_compiles', True)
  logger.addHandler(counter)
  logger.propagate = False
  logger.setLevel(logging.WARNING)
  try:
    yield counter
  finally:
    logger.removeHandler(counter)
    jax.config.update('jax_log_compiles', old[0])
    logger.propagate, _ = old[1], logger.setLevel(old[2])
