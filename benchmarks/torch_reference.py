"""Speed ratio: the JAX MCL step against the PyTorch oracle's step on the CPU.

`python -m benchmarks.torch_reference`: JAX step time over PyTorch step time
for identical work (montage assembly, online forward + backward of both
views, target forward of both views, the loss; no optimizer), float32 on the
CPU, measured as paired alternating runs in one process with
`torch.set_num_threads` equal to the cores JAX uses. The PyTorch side is
mcl_jax/testing/torch_reference.py, the oracle of tests/test_torch_reference.py.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from mcl_jax.testing import torch_reference as tr


# ------------------------------------------------------------ speed ratio --

def _config(name: str):
  """'tiny' (configs/test_tiny.py) or 'r50-64' (ResNet-50 at 64 px, batch 32)."""
  from configs import mcl_100ep, test_tiny
  if name == 'tiny':
    c = test_tiny.get_config()
    c.optim.global_batch = c.montage.group_size * 2  # 16 images, 2 groups
  elif name == 'r50-64':
    c = mcl_100ep.get_config()
    c.data.image_size = 64
    c.montage.group_size = 32
    c.optim.global_batch = 32
  else:
    raise ValueError(name)
  c.model.dtype = 'float32'
  return c


def speed_ratio(name: str, pairs: int, warmup: int, neck_regions: str | None = None,
                channels_last: bool = False, seed: int = 0) -> dict:
  """Paired alternating JAX / PyTorch timings of the same step on the CPU."""
  import jax
  import jax.numpy as jnp
  from mcl_jax.nn import model as model_lib
  from mcl_jax.nn import resnet
  from mcl_jax.pretext import montage, objective
  from mcl_jax.training import state as state_lib
  from mcl_jax.training import optim

  config = _config(name)
  if neck_regions:
    config.model.neck_regions = neck_regions
  layout = montage.layout_for(config)
  net = model_lib.create_model(config)
  b, s = config.optim.global_batch, config.data.image_size
  tx = optim.create_optimizer(config, 1)
  state = jax.jit(lambda k: state_lib.create_train_state(config, k, tx))(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  crops = rng.standard_normal((b, 8, s, s, 3)).astype(np.float32)
  kw = dict(tau=config.loss.tau, level_weights=tuple(config.loss.level_weights),
            downsample=config.montage.downsample)

  def loss_and_grad(params, batch_stats, target_vars, crops, key):
    return jax.value_and_grad(
        lambda p: objective.self_supervised_batch_loss(
            net, p, batch_stats, target_vars, crops, key, layout, **kw), has_aux=True)(params)

  jfn = jax.jit(loss_and_grad)
  tv = {'params': state.target_params, 'batch_stats': state.target_batch_stats}
  jcrops = jnp.asarray(crops)
  t0 = time.perf_counter()
  compiled = jfn.lower(state.params, state.batch_stats, tv, jcrops, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) if cost else float('nan')

  tmodel = tr.MCLTorch.from_config(config)
  tr.load_from_flax(tmodel, state.params, state.batch_stats, state.target_params,
                 state.target_batch_stats)
  tmodel.train()
  tcrops = torch.from_numpy(crops.transpose(0, 1, 4, 2, 3).copy())
  if channels_last:
    tmodel = tmodel.to(memory_format=torch.channels_last)
  tlayout = tr.GridLayout.from_jax(layout)
  gen = torch.Generator().manual_seed(seed)

  def run_jax(i):
    t = time.perf_counter()
    out = compiled(state.params, state.batch_stats, tv, jcrops, jax.random.key(i))
    jax.block_until_ready(out)
    return time.perf_counter() - t

  def run_torch(i):
    del i
    t = time.perf_counter()
    tr.step(tmodel, tcrops, tlayout, config.loss.tau, config.loss.level_weights,
         config.model.neck_regions, gen)
    return time.perf_counter() - t

  for i in range(warmup):
    run_jax(i)
    run_torch(i)
  tj, tt = [], []
  for i in range(pairs):
    # Alternate which side goes first, so slow drift in the shared machine's
    # load does not favour one side.
    if i % 2 == 0:
      tj.append(run_jax(i))
      tt.append(run_torch(i))
    else:
      tt.append(run_torch(i))
      tj.append(run_jax(i))
  ratios = [a / b for a, b in zip(tj, tt)]
  mj, mt = statistics.median(tj), statistics.median(tt)
  return {
      'config': name, 'image_size': s, 'batch': b, 'group_size': layout.group_size,
      'depth': config.model.depth, 'width': config.model.width,
      'neck_regions': config.model.neck_regions, 'channels_last': channels_last,
      'pairs': pairs, 'jax_median_s': mj, 'torch_median_s': mt,
      'ratio_of_medians': mj / mt, 'median_pair_ratio': statistics.median(ratios),
      'jax_min_s': min(tj), 'torch_min_s': min(tt), 'ratio_of_minimums': min(tj) / min(tt),
      'pair_ratios': ratios, 'jax_times_s': tj, 'torch_times_s': tt,
      'jax_compile_s': compile_s, 'jax_flops_per_step': flops,
      'jax_tflops': flops / mj / 1e12, 'torch_tflops_same_flops': flops / mt / 1e12,
      'torch_threads': torch.get_num_threads(),
      'jax_small_map_convs': 'dense' if resnet.DENSE_MAX_OUTPUT_PIXELS else 'xla',
  }


def _jax_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover
    return os.cpu_count() or 1


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--configs', default='tiny,r50-64',
                 help='comma-separated: tiny (test_tiny, 32 px), r50-64 (ResNet-50, 64 px, '
                      'batch 32, group 32)')
  p.add_argument('--pairs', type=int, default=5, help='timed JAX/torch pairs per config')
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--neck-regions', choices=('all', 'used'), default=None,
                 help="override model.neck_regions (default: the config's, 'all')")
  p.add_argument('--channels-last', action='store_true', help='torch channels_last')
  p.add_argument('--threads', type=int, default=None,
                 help='torch threads (default: the cores JAX uses)')
  p.add_argument('--jax-small-map-convs', choices=('dense', 'xla'), default='dense',
                 help="'dense' (library default): JAX convs with <= 2x2 outputs as dense "
                      "matmuls (resnet.Conv); 'xla': all on XLA's convolution")
  p.add_argument('--json', default=None, help='write the results here')
  args = p.parse_args(argv)
  from benchmarks import train_step  # pylint: disable=import-outside-toplevel
  train_step.set_small_map_convs(args.jax_small_map_convs)

  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  torch.set_num_threads(args.threads or _jax_cores())
  import jax
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'torch {torch.__version__} with {torch.get_num_threads()} threads, '
        f'{_jax_cores()} cores', flush=True)
  results = []
  for name in args.configs.split(','):
    r = speed_ratio(name, args.pairs, args.warmup, args.neck_regions, args.channels_last)
    results.append(r)
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}), flush=True)
  hdr = (f"{'config':8} {'px':>4} {'B':>4} {'neck':>5} {'JAX s':>8} {'torch s':>8} "
         f"{'JAX/torch':>9} {'pair med':>8} {'of mins':>8} {'GFLOP':>8} {'JAX TF/s':>8}")
  print(hdr)
  print('-' * len(hdr))
  for r in results:
    print(f"{r['config']:8} {r['image_size']:>4} {r['batch']:>4} {r['neck_regions']:>5} "
          f"{r['jax_median_s']:>8.3f} {r['torch_median_s']:>8.3f} "
          f"{r['ratio_of_medians']:>9.2f} {r['median_pair_ratio']:>8.2f} "
          f"{r['ratio_of_minimums']:>8.2f} "
          f"{r['jax_flops_per_step'] / 1e9:>8.1f} {r['jax_tflops']:>8.3f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'machine': f'{_jax_cores()}-core CPU (shared)', 'results': results}, f,
                indent=1)
  return results


if __name__ == '__main__':
  main()
