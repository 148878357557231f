"""Memory: the JAX MCL loss + gradient against the PyTorch oracle's, on the CPU.

`python -m benchmarks.memory_vs_torch`: for ResNet-50 at each --sizes (per
device batch --batch, one montage group, neck_regions 'all', float32 unless
--dtype), the same work on both sides (montage assembly, online forward +
backward of both views, target forward, the loss; no optimizer):

* JAX: the compiled memory analysis of `jax.jit(value_and_grad(loss))`
  (temp = what the step needs beyond its arguments and outputs), for each
  --remat and --accumulate setting; compile only, nothing is allocated.
* PyTorch: the peak-RSS growth of a fresh process over one forward +
  backward of mcl_jax/testing/torch_reference.py's model (`step`), after the model
  and the crops exist.

Prints a table and writes --json.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 2**30


def _config(size: int, batch: int, dtype: str = 'float32', neck_regions: str = 'all'):
  from configs import mcl_100ep
  c = mcl_100ep.get_config()
  c.data.image_size = size
  c.montage.group_size = batch
  c.optim.global_batch = batch
  c.model.dtype = dtype
  c.model.neck_regions = neck_regions
  return c


def jax_side(size: int, batch: int, dtype: str, remat: str, accumulate: str) -> dict:
  """Compiled memory of the loss + gradient (one CPU device)."""
  import jax
  import jax.numpy as jnp
  from mcl_jax.nn import model as model_lib
  from mcl_jax.pretext import montage, objective
  c = _config(size, batch, dtype)
  c.model.remat, c.optim.accumulate = remat, accumulate
  net, layout = model_lib.create_model(c), montage.layout_for(c)
  var = jax.eval_shape(lambda k: model_lib.init_variables(net, layout, k, size),
                       jax.random.key(0))
  target = {k: model_lib.encoder_subtree(var[k]) for k in ('params', 'batch_stats')}
  crops = jax.ShapeDtypeStruct((batch, 8, size, size, 3), jnp.float32)

  def loss_and_grad(params, bs, target, crops, key):
    return jax.value_and_grad(
        lambda p: objective.self_supervised_batch_loss(
            net, p, bs, target, crops, key, layout, tau=c.loss.tau,
            level_weights=c.loss.level_weights, accumulate=accumulate), has_aux=True)(params)
  t = time.perf_counter()
  compiled = jax.jit(loss_and_grad).lower(var['params'], var['batch_stats'], target, crops,
                                          jax.random.key(1)).compile()
  ma = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'side': 'jax', 'size': size, 'batch': batch, 'dtype': dtype, 'remat': remat,
          'accumulate': accumulate, 'temp_bytes': ma.temp_size_in_bytes,
          'argument_bytes': ma.argument_size_in_bytes, 'output_bytes': ma.output_size_in_bytes,
          'flops': float(cost['flops']), 'compile_s': time.perf_counter() - t}


def _rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def torch_side(size: int, batch: int, threads: int) -> dict:
  """Peak-RSS growth over one forward + backward (run in a fresh process)."""
  import numpy as np
  import torch
  from mcl_jax.pretext import montage
  from mcl_jax.testing import torch_reference as tr
  torch.set_num_threads(threads)
  c = _config(size, batch)
  model = tr.MCLTorch.from_config(c)
  model.train()
  rng = np.random.default_rng(0)
  crops = torch.from_numpy(rng.standard_normal((batch, 8, 3, size, size)).astype(np.float32))
  layout = tr.GridLayout.from_jax(montage.layout_for(c))
  before = _rss_bytes()
  peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  t = time.perf_counter()
  tr.step(model, crops, layout, c.loss.tau, c.loss.level_weights, 'all',
          torch.Generator().manual_seed(0))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {'side': 'torch', 'size': size, 'batch': batch, 'threads': threads,
          'peak_growth_bytes': peak - before, 'rss_before_bytes': before, 'peak_bytes': peak,
          'peak_before_step_bytes': peak_before, 'step_s': time.perf_counter() - t}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--sizes', default='64,128')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--remat', default='none', help='comma-separated model.remat settings')
  p.add_argument('--accumulate', default='none', help="comma-separated: 'none', 'views'")
  p.add_argument('--threads', type=int, default=2, help='PyTorch threads')
  p.add_argument('--torch-only', type=int, help=argparse.SUPPRESS)  # the subprocess
  p.add_argument('--json')
  args = p.parse_args(argv)
  if args.torch_only:
    print(json.dumps(torch_side(args.torch_only, args.batch, args.threads)))
    return None
  rows = []
  for size in (int(s) for s in args.sizes.split(',')):
    out = subprocess.run(
        [sys.executable, '-m', 'benchmarks.memory_vs_torch', '--torch-only', str(size),
         '--batch', str(args.batch), '--threads', str(args.threads)],
        capture_output=True, text=True, check=True)
    t = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append(t)
    for remat in args.remat.split(','):
      for accumulate in args.accumulate.split(','):
        j = jax_side(size, args.batch, args.dtype, remat, accumulate)
        j['over_torch'] = j['temp_bytes'] / t['peak_growth_bytes']
        rows.append(j)
        print(f"{size} px, batch {args.batch}: JAX ({args.dtype}, remat={remat}, "
              f"accumulate={accumulate}) temp {j['temp_bytes'] / GIB:.2f} GiB vs PyTorch "
              f"peak-RSS growth {t['peak_growth_bytes'] / GIB:.2f} GiB: "
              f"x{j['over_torch']:.2f}", flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == '__main__':
  main()
