"""Benchmark of the MCL train step (`mcl_jax.train.make_train_step`).

Compiles the real jitted step once (ahead of time, reporting the compile
time), feeds it synthetic device-side uint8 crops, and reports:

* the median step time over --steps timed steps after --warmup steps, each
  closed with block_until_ready; unique images/s;
* FLOPs per step from the compiled executable's cost analysis, achieved
  TFLOP/s, and MFU against a peak measured in the same run (a large matmul in
  the model's dtype);
* peak device memory (`device.memory_stats()`) where the backend has it, else
  the compiled executable's memory analysis (argument / output / temp sizes);
* how many times the step compiled (should be once: `jax_log_compiles`
  records are counted, and the jit's cache size), and any buffer-donation
  warnings;
* with --breakdown, each part of the step jitted and timed on its own
  (augmentation; montage assembly + region extraction, forward and the
  regions' backward; online forward + backward with the loss; target
  forward; optimizer + EMA) as a % of the step, and a check that the neck
  runs once per view over all levels' regions (one conv per neck layer in
  the online forward's HLO).

Needs only jax, flax, optax and ml_collections (no TensorFlow: the input
pipeline is not imported; `optim.num_steps` is set so that nothing counts
epochs).

Examples:
  python benchmarks/train_step.py --preset tiny --breakdown
  python benchmarks/train_step.py --preset r50-small --steps 3 --json /tmp/r50.json
  python benchmarks/train_step.py --preset r50-224 --batch 64 --dtype bfloat16   # GPU
"""

import argparse
import contextlib
import json
import logging
import os
import re
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    # configs/test_tiny.py: 32 px, ResNet-18-style (1, 1, 1, 1) trunk of width 8.
    'tiny': dict(base='test_tiny', batch=16, steps=10),
    # ResNet-50 + FPN-256 + full-size neck and predictors at 64 px (CPU-sized).
    'r50-small': dict(base='mcl_100ep', image_size=64, batch=32, group_size=32,
                      dtype='float32', steps=3),
    # The paper's network and canvases: ResNet-50 at 224 px (for GPUs).
    'r50-224': dict(base='mcl_100ep', image_size=224, batch=128, group_size=128,
                    dtype='bfloat16', steps=10),
}


# ------------------------------------------------------------------ config --

def build_config(args):
  """The preset's config with the command line's overrides applied."""
  from configs import mcl_100ep, test_tiny
  preset = dict(PRESETS[args.preset])
  c = {'test_tiny': test_tiny, 'mcl_100ep': mcl_100ep}[preset.pop('base')].get_config()
  preset.pop('steps')
  val = lambda name: getattr(args, name) if getattr(args, name) is not None else preset.get(name)
  if val('depth') is not None:
    c.model.depth = val('depth')
  if val('width') is not None:
    c.model.width = val('width')
  if args.stage_sizes:
    c.model.stage_sizes = tuple(int(x) for x in args.stage_sizes.split(','))
  if val('image_size') is not None:
    c.data.image_size = val('image_size')
  if val('dtype') is not None:
    c.model.dtype = val('dtype')
  if args.neck_regions:
    c.model.neck_regions = args.neck_regions
  if args.region_path:
    c.model.region_path = args.region_path
  if args.target_whole_crops_only is not None:
    c.model.target_whole_crops_only = bool(args.target_whole_crops_only)
  group = val('group_size') or c.montage.group_size
  c.montage.group_size = min(group, val('batch'))
  c.optim.num_steps = 1000  # no epoch counting (that would import TensorFlow)
  return c


# ------------------------------------------------------------------ helpers --

def _median_time(fn, reps: int, warmup: int = 1):
  """Median wall time of fn() (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def _memory(compiled, device) -> dict:
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


def peak_matmul_tflops(dtype, n: int, reps: int = 5) -> dict:
  """Peak of this device in `dtype`: a large n x n x n matmul, median time."""
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: a @ b)
  med, _ = _median_time(lambda: f(a, b).block_until_ready(), reps, warmup=2)
  return {'matmul_n': n, 'matmul_s': med, 'peak_tflops': 2 * n**3 / med / 1e12}


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


# -------------------------------------------------------------------- bench --

def setup(config, num_devices):
  """Mesh, initial state, the jitted step, synthetic uint8 crops on device."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mcl_jax import train
  mesh = train.make_mesh(num_devices)
  rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  num_steps = config.optim.num_steps
  state = jax.jit(lambda k: train.create_train_state(config, k, num_steps),
                  out_shardings=rep)(jax.random.key(0))
  b, s = config.optim.global_batch, config.data.image_size
  crops = jax.jit(
      lambda k: jax.random.randint(k, (b, config.data.num_crops, s, s, 3), 0, 256,
                                   jnp.int32).astype(jnp.uint8),
      out_shardings=shard)(jax.random.key(1))
  labels = jax.device_put(jnp.zeros((b,), jnp.int32), shard)
  step = train.make_train_step(config, mesh, num_steps)
  return mesh, state, crops, labels, step


def bench_step(config, args) -> dict:
  import jax
  from mcl_jax import config_validation
  ndev = args.devices or jax.local_device_count()
  config.optim.global_batch = args.batch_value * ndev
  config_validation.validate(config, ndev)
  device = jax.local_devices()[0]
  res = {'preset': args.preset, 'backend': jax.default_backend(),
         'device_kind': device.device_kind, 'devices': ndev,
         'cpu_cores': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
         else os.cpu_count(),
         'depth': config.model.depth, 'width': config.model.width,
         'stage_sizes': list(config.model.stage_sizes) if config.model.get('stage_sizes')
         else None,
         'image_size': config.data.image_size, 'per_device_batch': args.batch_value,
         'global_batch': config.optim.global_batch, 'group_size': config.montage.group_size,
         'dtype': config.model.dtype, 'neck_regions': config.model.neck_regions,
         'region_path': config.model.region_path,
         'target_whole_crops_only': bool(config.model.target_whole_crops_only)}
  print('config:', json.dumps(res), flush=True)
  mesh, state, crops, labels, step = setup(config, ndev)
  with log_compiles() as counter, warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    t0 = time.perf_counter()
    lowered = step.lower(state, crops, labels)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    res.update(lower_s=t1 - t0, compile_s=t2 - t1)
    res['flops_per_step'] = _flops(compiled)  # per device (the SPMD module)
    res['memory'] = _memory(compiled, device)
    aot_compiles = counter.count('step_fn')
    if not args.compile_only:
      times = []
      for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, metrics = step(state, crops, labels)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
          times.append(time.perf_counter() - t)
      res['step_times_s'] = times
      res['step_s'] = statistics.median(times)
      res['loss'] = float(metrics['loss'])
      res['memory'] = _memory(compiled, device)  # peak after running
    res['compiles_of_step'] = counter.count('step_fn')
    res['compiles_after_aot'] = counter.count('step_fn') - aot_compiles
    res['jit_cache_size'] = step._cache_size()
  res['donation_warnings'] = [str(w.message)[:200] for w in caught
                              if 'donat' in str(w.message).lower()]
  if not args.compile_only:
    res['images_per_s'] = config.optim.global_batch / res['step_s']
    res['tflops'] = res['flops_per_step'] * ndev / res['step_s'] / 1e12
    if args.matmul_size:
      dt = {'float32': jax.numpy.float32, 'bfloat16': jax.numpy.bfloat16,
            'float16': jax.numpy.float16}[config.model.dtype]
      res.update(peak_matmul_tflops(dt, args.matmul_size))
      res['mfu'] = res['tflops'] / ndev / res['peak_tflops']
  if args.breakdown:
    res['breakdown'] = breakdown(config, mesh, state, crops, res.get('step_s'), args)
  return res


# ---------------------------------------------------------------- breakdown --

def breakdown(config, mesh, state, crops_u8, step_s, args) -> dict:
  """Each part of the step jitted on its own; median seconds and % of the step."""
  import jax
  import jax.numpy as jnp
  import optax
  from mcl_jax import augment, losses, model as model_lib, train
  net = model_lib.create_model(config)
  layout = train.layout_for(config)
  num_steps = config.optim.num_steps
  tx = train.create_optimizer(config, num_steps)
  levels = tuple(range(layout.num_levels))
  k = config.model.region_size or layout.image_size // 32
  reps = args.breakdown_reps
  key = jax.random.key(7)
  out = {}

  def timed(name, fn, *a):
    f = jax.jit(fn)
    t = time.perf_counter()
    c = f.lower(*a).compile()
    compile_s = time.perf_counter() - t
    med, _ = _median_time(lambda: jax.block_until_ready(c(*a)), reps)
    out[name] = {'s': med, 'compile_s': compile_s, 'flops': _flops(c)}
    print(f'  breakdown {name}: {med * 1e3:.1f} ms (compile {compile_s:.1f} s)', flush=True)
    return c(*a)

  # 1. Augmentation (uint8 crops -> normalised float crops).
  crops = timed('augmentation',
                lambda c, k: augment.augment_crops(c, k, config.augment, config.data.num_crops),
                crops_u8, key)

  # 2. Montage assembly of both views + region extraction (forward, and the
  # regions' backward: the cotangent scattered back onto the FPN maps).
  fshape = jax.eval_shape(
      lambda c: net.apply({'params': state.params, 'batch_stats': state.batch_stats}, c,
                          train=True, method=model_lib.MCLNet.features, mutable=['batch_stats']),
      jax.ShapeDtypeStruct((crops.shape[0] // layout.group_size * layout.num_canvases,
                            layout.image_size, layout.image_size, 3), jnp.float32))[0]
  pshape = {n: v for n, v in fshape.items() if n.startswith('P')}
  feats = [{n: jax.random.normal(jax.random.fold_in(key, 10 * v + i), s.shape, s.dtype)
            for i, (n, s) in enumerate(sorted(pshape.items()))} for v in (0, 1)]
  mode, path = config.model.neck_regions, config.model.region_path

  def montage_regions(crops, key, feats):
    res = []
    for view in (0, 1):
      canv, lab = model_lib.view_canvases(crops, view, layout, key, mesh,
                                          config.montage.downsample)
      cut = lambda f: model_lib.cut_regions(f, layout, levels, mode, path, k)[0]
      regions, vjp = jax.vjp(cut, feats[view])
      (dfeats,) = vjp(regions)
      target_regions = model_lib.cut_regions(feats[view], layout, (0,), mode, path, k)[0]
      res.append((canv, lab, regions.sum(), target_regions.sum(),
                  sum(x.sum() for x in dfeats.values())))
    return res
  views = timed('montage_and_regions', montage_regions, crops, key, feats)
  canvases = [v[0] for v in views]
  labels = [v[1] for v in views]

  # 3. Target forward (both views).
  tvars = {'params': state.target_params, 'batch_stats': state.target_batch_stats}

  def target_fwd(tvars, canvases):
    bs, ts = tvars['batch_stats'], []
    for c in canvases:
      t, bs = model_lib.target_embeddings(net, {'params': tvars['params'], 'batch_stats': bs},
                                          c, layout, config.model.target_whole_crops_only)
      ts.append(t)
    return ts, bs
  targets, _ = timed('target_forward', target_fwd, tvars, canvases)

  # 4. Online forward + backward, with the loss (targets given).
  def online(params, batch_stats, canvases, labels, targets):
    def lf(p):
      bs, preds = batch_stats, []
      for c in canvases:
        pr, st = net.apply({'params': p, 'batch_stats': bs}, c, layout, train=True,
                           mutable=['batch_stats'])
        bs = st['batch_stats']
        preds.append(pr)
      loss, _ = losses.mcl_loss(preds[0], preds[1], labels[0], labels[1], targets[0],
                                targets[1], config.loss.tau, config.loss.level_weights)
      return loss, bs
    return jax.value_and_grad(lf, has_aux=True)(params)
  (_, _), grads = timed('online_forward_backward', online, state.params, state.batch_stats,
                        canvases, labels, targets)

  # 5. Optimizer (clip + LARS) + EMA of the target.
  def opt_ema(params, opt_state, target_params, grads, step):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    m = train.ema_momentum(step, num_steps, config.optim.ema_base_momentum)
    tp = optax.incremental_update(model_lib.encoder_subtree(params), target_params, 1.0 - m)
    return params, opt_state, tp
  timed('optimizer_ema', opt_ema, state.params, state.opt_state, state.target_params, grads,
        state.step)

  # The neck runs once per view over all levels' regions: one convolution
  # per neck layer, over the total region count, in the online forward.
  regions_shape = jax.eval_shape(
      lambda f: model_lib.cut_regions(f, layout, levels, mode, path, k)[0], pshape)
  r_total = regions_shape.shape[0]
  hlo = jax.jit(lambda p, bs, c: net.apply({'params': p, 'batch_stats': bs}, c, layout,
                                           train=True, mutable=['batch_stats'])).lower(
      state.params, state.batch_stats, canvases[0]).as_text()
  convs = [l for l in hlo.splitlines() if 'stablehlo.convolution' in l]
  neck_convs = [l for l in convs if re.search(rf'tensor<{r_total}x{k}x{k}x', l)]
  total_parts = sum(v['s'] for v in out.values())
  for v in out.values():
    v['pct_of_step'] = 100 * v['s'] / step_s if step_s else None
    v['pct_of_parts'] = 100 * v['s'] / total_parts
  return {
      'parts': out, 'sum_of_parts_s': total_parts, 'step_s': step_s,
      'neck_regions_per_view': r_total,
      'neck_conv_calls_per_view_forward': len(neck_convs),
      'neck_convs_configured': config.model.neck_convs,
      'neck_runs_once_over_all_levels': len(neck_convs) == config.model.neck_convs,
  }


# --------------------------------------------------------------------- main --

def _fmt_bytes(n):
  return 'n/a' if n is None else f'{n / 2**20:.1f} MiB'


def print_table(res: dict):
  rows = [
      ('device', f"{res['device_kind']} x{res['devices']} ({res['backend']}, "
                 f"{res['cpu_cores']} host cores)"),
      ('model', f"ResNet-{res['depth']} w{res['width']}"
                + (f" stages {res['stage_sizes']}" if res['stage_sizes'] else '')
                + f", {res['image_size']} px, {res['dtype']}"),
      ('batch', f"{res['per_device_batch']}/device, global {res['global_batch']}, "
                f"group {res['group_size']}"),
      ('options', f"neck_regions={res['neck_regions']}, region_path={res['region_path']}, "
                  f"target_whole_crops_only={res['target_whole_crops_only']}"),
      ('compile', f"{res['lower_s']:.1f} s trace+lower, {res['compile_s']:.1f} s compile"),
      ('FLOPs/step', f"{res['flops_per_step'] / 1e9:.2f} GFLOP per device (cost analysis)"),
  ]
  if 'step_s' in res:
    rows += [
        ('step time', f"{res['step_s'] * 1e3:.1f} ms median of {len(res['step_times_s'])}"),
        ('throughput', f"{res['images_per_s']:.1f} unique images/s"),
        ('achieved', f"{res['tflops']:.4f} TFLOP/s"),
    ]
    if 'peak_tflops' in res:
      rows += [('peak (matmul)', f"{res['peak_tflops']:.4f} TFLOP/s ({res['matmul_n']}^3, "
                                 f"{res['dtype']})"),
               ('MFU', f"{100 * res['mfu']:.1f} %")]
  m = res['memory']
  rows += [
      ('peak memory', _fmt_bytes(m.get('peak_bytes_in_use'))
       + f" (compiled: args {_fmt_bytes(m.get('argument_size_in_bytes'))}, "
         f"temp {_fmt_bytes(m.get('temp_size_in_bytes'))}, "
         f"out {_fmt_bytes(m.get('output_size_in_bytes'))}, "
         f"aliased {_fmt_bytes(m.get('alias_size_in_bytes'))})"),
      ('compiles', f"{res['compiles_of_step']} of the step ({res['compiles_after_aot']} after "
                   f"the AOT compile), jit cache size {res['jit_cache_size']}"),
      ('donation', 'no warnings' if not res['donation_warnings']
       else '; '.join(res['donation_warnings'])),
  ]
  w = max(len(r[0]) for r in rows)
  for k, v in rows:
    print(f'{k:<{w}}  {v}')
  if 'breakdown' in res:
    b = res['breakdown']
    print(f"\n{'part':<26} {'ms':>9} {'% step':>7} {'% parts':>8} {'GFLOP':>8}")
    for name, v in b['parts'].items():
      pct = '' if v['pct_of_step'] is None else f"{v['pct_of_step']:.1f}"
      print(f"{name:<26} {v['s'] * 1e3:>9.1f} {pct:>7} {v['pct_of_parts']:>8.1f} "
            f"{v['flops'] / 1e9:>8.2f}")
    print(f"{'sum of parts':<26} {b['sum_of_parts_s'] * 1e3:>9.1f}"
          + (f" {100 * b['sum_of_parts_s'] / b['step_s']:>7.1f}" if b['step_s'] else ''))
    print(f"neck: {b['neck_conv_calls_per_view_forward']} conv calls over "
          f"{b['neck_regions_per_view']} regions per view forward "
          f"({b['neck_convs_configured']} layers): runs once over all levels = "
          f"{b['neck_runs_once_over_all_levels']}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', choices=sorted(PRESETS), default='tiny')
  p.add_argument('--depth', type=int)
  p.add_argument('--width', type=int)
  p.add_argument('--stage-sizes', help='e.g. 1,1,1,1')
  p.add_argument('--image-size', type=int)
  p.add_argument('--batch', type=int, help='per-device batch of unique images')
  p.add_argument('--group-size', type=int, help='montage group (<= per-device batch)')
  p.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'))
  p.add_argument('--neck-regions', choices=('all', 'used'))
  p.add_argument('--region-path', choices=('reshape', 'roi_align'))
  p.add_argument('--target-whole-crops-only', type=int, choices=(0, 1))
  p.add_argument('--devices', type=int, help='devices of the mesh (default: all local)')
  p.add_argument('--steps', type=int, help='timed steps (preset default)')
  p.add_argument('--warmup', type=int, default=1, help='untimed steps after the compile')
  p.add_argument('--matmul-size', type=int, default=None,
                 help='n of the peak matmul (default 2048 on CPU, 8192 otherwise; 0: skip)')
  p.add_argument('--compile-only', action='store_true',
                 help='compile and report FLOPs / memory, do not run')
  p.add_argument('--breakdown', action='store_true', help='time the parts of the step')
  p.add_argument('--breakdown-reps', type=int, default=3)
  p.add_argument('--json', help='write the results here')
  args = p.parse_args(argv)
  import jax
  preset = PRESETS[args.preset]
  args.batch_value = args.batch or preset['batch']
  if args.steps is None:
    args.steps = preset['steps']
  if args.matmul_size is None:
    args.matmul_size = 2048 if jax.default_backend() == 'cpu' else 8192
  config = build_config(args)
  res = bench_step(config, args)
  print()
  print_table(res)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == '__main__':
  main()
