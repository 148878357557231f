"""Benchmark of the MCL train step (`mcl_jax.training.step.make_train_step`).

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
  forward; optimizer + EMA) in rounds with the full step, as a % of the
  step, and a check that the neck runs once per view over all levels'
  regions (its convs and Dense layers are the only conv / dot ops over all
  regions in the online forward's HLO).

Needs only jax, flax, optax and ml_collections (no TensorFlow: the input
pipeline is not imported; `optim.num_steps` is set so that nothing counts
epochs).

With --ab, a baseline and a variant config are both compiled and their steps
alternated in one process (the way to measure an option's saving on a shared
machine). `--ab crop_on=device[,max_side=M]` measures what cutting the crops in
the step (mcl_jax/data/device_crops.py) adds to it. --small-map-convs xla (or --ab small_map_convs=xla) puts the convs
with <= 2x2 outputs back on XLA's convolution instead of resnet.Conv's dense
matmuls, for before/after timings; see docs/PERFORMANCE.md.

Examples:
  python -m benchmarks.train_step --preset tiny --breakdown
  python -m benchmarks.train_step --preset demo --devices 1 --ab small_map_convs=xla
  python -m benchmarks.train_step --preset r50-small --ab neck_regions=used
  python -m benchmarks.train_step --preset r50-small --ab crop_on=device,max_side=160
  python -m benchmarks.train_step --preset r50-small --steps 3 --json /tmp/r50.json
  python -m benchmarks.train_step --preset r50-224 --batch 64 --dtype bfloat16   # GPU
"""

import argparse
import json
import os
import statistics
import time
import warnings

from benchmarks import compiled_stats


PRESETS = {
    # configs/test_tiny.py as it is: 32 px, ResNet-18-style (1, 1, 1, 1) trunk of width 8.
    'tiny': dict(base='test_tiny', batch=16, steps=10),
    # configs/demo.py as it is: the digits demo's step (64 px, width 16, batch 64).
    'demo': dict(base='demo', batch=64, steps=10),
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
  from configs import demo, mcl_100ep, test_tiny
  preset = dict(PRESETS[args.preset])
  bases = {'test_tiny': test_tiny, 'demo': demo, 'mcl_100ep': mcl_100ep}
  c = bases[preset.pop('base')].get_config()
  # The step alone, fed its crops (comparable across presets and with the
  # figures in docs/PERFORMANCE.md); --ab crop_on=device measures the crops.
  c.data.crop_on = 'host'
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
  if args.remat:
    c.model.remat = args.remat
  if args.accumulate:
    c.optim.accumulate = args.accumulate
  group = val('group_size') or c.montage.group_size
  c.montage.group_size = min(group, val('batch'))
  c.optim.num_steps = 1000  # no epoch counting (that would import TensorFlow)
  return c


# ------------------------------------------------------------------ helpers --

def set_small_map_convs(mode: str):
  """'dense' (the library default) or 'xla': every conv on XLA's convolution.

  `resnet.Conv` computes convs with <= 2 x 2 output pixels (ResNet layer3/4,
  FPN P4/P5 and the neck's regions on <= 64 px canvases) as dense matmuls;
  'xla' turns that off, to measure the difference in one process.
  """
  from mcl_jax.nn import resnet
  resnet.DENSE_MAX_OUTPUT_PIXELS = {'dense': 4, 'xla': 0}[mode]


# -------------------------------------------------------------------- bench --

def synthetic_images(config, key):
  """The step's images argument: uint8 crops, or with data.crop_on='device' the
  padded buffers (500x375 valid, capped at data.max_side) with 0.2-1 area,
  3/4-4/3 aspect windows."""
  import jax
  import jax.numpy as jnp
  b, s, n = config.optim.global_batch, config.data.image_size, config.data.num_crops
  if config.data.crop_on != 'device':
    return jax.random.randint(key, (b, n, s, s, 3), 0, 256, jnp.int32).astype(jnp.uint8)
  m = config.data.max_side
  h, w = round(375 * min(1.0, m / 500)), min(m, 500)
  k_img, k_area, k_ratio, k_y, k_x = jax.random.split(key, 5)
  area = jax.random.uniform(k_area, (b, n), minval=0.2, maxval=1.0) * h * w
  aspect = jnp.exp(jax.random.uniform(k_ratio, (b, n), minval=jnp.log(3 / 4),
                                      maxval=jnp.log(4 / 3)))
  cw = jnp.minimum(jnp.round(jnp.sqrt(area * aspect)), w)
  ch = jnp.minimum(jnp.round(jnp.sqrt(area / aspect)), h)
  y = jnp.floor(jax.random.uniform(k_y, (b, n)) * (h - ch + 1))
  x = jnp.floor(jax.random.uniform(k_x, (b, n)) * (w - cw + 1))
  image = jax.random.randint(k_img, (b, m, m, 3), 0, 256, jnp.int32).astype(jnp.uint8)
  return {'image': image, 'size': jnp.tile(jnp.array([[h, w]], jnp.int32), (b, 1)),
          'windows': jnp.stack([y, x, ch, cw], -1)}


def setup(config, num_devices, abstract: bool = False):
  """Mesh, initial state, the jitted step, synthetic images on device (uint8
  crops, or buffers + windows with data.crop_on='device'). With `abstract`,
  state and images are ShapeDtypeStructs (for compiling only)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mcl_jax.training import state as state_lib, step as step_lib
  from mcl_jax.training import optim
  mesh = state_lib.make_mesh(num_devices)
  rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  num_steps = config.optim.num_steps
  tx = optim.create_optimizer(config, num_steps)
  b = config.optim.global_batch
  make_state = lambda k: state_lib.create_train_state(config, k, tx)
  make_crops = lambda k: synthetic_images(config, k)
  if abstract:
    spec = lambda tree, sharding: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    state = spec(jax.eval_shape(make_state, jax.random.key(0)), rep)
    crops = spec(jax.eval_shape(make_crops, jax.random.key(1)), shard)
    labels = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=shard)
    return mesh, state, crops, labels, step_lib.make_train_step(config, mesh, tx, num_steps)
  state = jax.jit(make_state, out_shardings=rep)(jax.random.key(0))
  crops = jax.jit(make_crops, out_shardings=shard)(jax.random.key(1))
  labels = jax.device_put(jnp.zeros((b,), jnp.int32), shard)
  step = step_lib.make_train_step(config, mesh, tx, num_steps)
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
         'target_whole_crops_only': bool(config.model.target_whole_crops_only),
         'small_map_convs': args.small_map_convs}
  print('config:', json.dumps(res), flush=True)
  mesh, state, crops, labels, step = setup(config, ndev)
  with compiled_stats.log_compiles() as counter, warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    t0 = time.perf_counter()
    lowered = step.lower(state, crops, labels)
    t1 = time.perf_counter()
    print(f'traced + lowered in {t1 - t0:.1f} s; compiling ...', flush=True)
    compiled = lowered.compile()
    t2 = time.perf_counter()
    print(f'compiled in {t2 - t1:.1f} s', flush=True)
    res.update(lower_s=t1 - t0, compile_s=t2 - t1)
    res['flops_per_step'] = compiled_stats.flops(compiled)  # per device (the SPMD module)
    res['memory'] = compiled_stats.memory(compiled, device)
    aot_compiles = counter.count('step_fn')
    if not args.compile_only:
      # Each timed step is followed by one peak matmul (same load conditions).
      matmul = (compiled_stats.make_matmul(config.model.dtype, args.matmul_size)
                if args.matmul_size else None)
      times, mm_times = [], []
      for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, metrics = step(state, crops, labels)
        jax.block_until_ready((state, metrics))
        dt = time.perf_counter() - t
        print(f'step {i}: {dt:.3f} s' + (' (warm-up)' if i < args.warmup else ''), flush=True)
        if i >= args.warmup:
          times.append(dt)
          if matmul:
            mm_times.append(matmul())
      res['step_times_s'] = times
      res['step_s'] = statistics.median(times)
      res['loss'] = float(metrics['loss'])
      res['memory'] = compiled_stats.memory(compiled, device)  # peak after running
    res['compiles_of_step'] = counter.count('step_fn')
    res['compiles_after_aot'] = counter.count('step_fn') - aot_compiles
    res['jit_cache_size'] = step._cache_size()
  res['donation_warnings'] = [str(w.message)[:200] for w in caught
                              if 'donat' in str(w.message).lower()]
  if not args.compile_only:
    res['images_per_s'] = config.optim.global_batch / res['step_s']
    res['tflops'] = res['flops_per_step'] * ndev / res['step_s'] / 1e12
    if args.matmul_size:
      compiled_stats.peak(res, mm_times, args.matmul_size, ndev)
  if args.breakdown:
    from benchmarks import step_breakdown  # pylint: disable=import-outside-toplevel
    res['breakdown'] = step_breakdown.breakdown(config, mesh, state, crops, labels, step, args)
  return res


# -------------------------------------------------------------------- sweep --

def sweep(config, args) -> list:
  """Compile-only memory / FLOPs / compile time of the step for each setting.

  Every combination of --sweep (per-device batches), --sweep-regions,
  --sweep-remat, --sweep-accumulate and --sweep-dtypes; the montage group is
  min(group, batch). Compiles run one at a time; rows are printed as they come.
  """
  import itertools
  import jax
  from mcl_jax import config_validation
  ndev = args.devices or jax.local_device_count()
  group = config.montage.group_size
  rows = []
  print(f"{'batch':>5} {'regions':<7} {'remat':<12} {'accumulate':<10} {'dtype':<9} "
        f"{'args GiB':>8} {'temp GiB':>8} {'args+temp':>9} {'TFLOP':>7} {'compile s':>9}")
  for batch, regions, remat, accumulate, dtype in itertools.product(
      [int(b) for b in args.sweep.split(',')], args.sweep_regions.split(','),
      args.sweep_remat.split(','), args.sweep_accumulate.split(','),
      args.sweep_dtypes.split(',')):
    c = config.copy_and_resolve_references()
    c.optim.global_batch = batch * ndev
    c.montage.group_size = min(group, batch)
    c.model.neck_regions, c.model.remat, c.optim.accumulate = regions, remat, accumulate
    c.model.dtype = dtype
    config_validation.validate(c, ndev)
    _, state, crops, labels, step = setup(c, ndev, abstract=True)
    t = time.perf_counter()
    compiled = step.lower(state, crops, labels).compile()
    m = compiled_stats.memory(compiled, jax.local_devices()[0])
    row = {'per_device_batch': batch, 'neck_regions': regions, 'remat': remat,
           'accumulate': accumulate, 'dtype': dtype, 'compile_s': time.perf_counter() - t,
           'flops_per_step': compiled_stats.flops(compiled), 'memory': m,
           'args_plus_temp_bytes': m['argument_size_in_bytes'] + m['temp_size_in_bytes']}
    rows.append(row)
    g = 2**30
    print(f"{batch:>5} {regions:<7} {remat:<12} {accumulate:<10} {dtype:<9} "
          f"{m['argument_size_in_bytes'] / g:>8.2f} {m['temp_size_in_bytes'] / g:>8.2f} "
          f"{row['args_plus_temp_bytes'] / g:>9.2f} {row['flops_per_step'] / 1e12:>7.2f} "
          f"{row['compile_s']:>9.1f}", flush=True)
  return rows


# ---------------------------------------------------------------------- A/B --

AB_FIELDS = {'neck_regions': str, 'target_whole_crops_only': lambda v: bool(int(v)),
             'dtype': str, 'region_path': str, 'small_map_convs': str,
             'crop_on': str, 'max_side': int, 'remat': str, 'accumulate': str}
DATA_FIELDS = ('crop_on', 'max_side')  # --ab fields of config.data
OPTIM_FIELDS = ('accumulate',)  # --ab fields of config.optim


def parse_ab(spec: str) -> dict:
  """'neck_regions=used,dtype=bfloat16' -> {'neck_regions': 'used', ...}."""
  out = {}
  for item in spec.split(','):
    k, v = item.split('=')
    if k not in AB_FIELDS:
      raise SystemExit(f'--ab: {k} is not one of {sorted(AB_FIELDS)}')
    out[k] = AB_FIELDS[k](v)
  return out


def ab_compare(config, args) -> dict:
  """Baseline vs variant, both compiled in this process, steps alternated.

  Each round runs one step of each (the order alternates between rounds), so
  both see the same machine load; reports per-side medians, the ratio of the
  medians and the median of the per-round ratios (variant / baseline).
  """
  import jax
  from mcl_jax import config_validation
  ndev = args.devices or jax.local_device_count()
  config.optim.global_batch = args.batch_value * ndev
  overrides = parse_ab(args.ab)
  variant = config.copy_and_resolve_references()
  for k, v in overrides.items():
    if k == 'dtype':
      variant.model.dtype = v
    elif k in DATA_FIELDS:
      setattr(variant.data, k, v)
    elif k in OPTIM_FIELDS:
      setattr(variant.optim, k, v)
    elif k != 'small_map_convs':
      setattr(variant.model, k, v)
  sides = {}
  for name, cfg in (('baseline', config), ('variant', variant)):
    config_validation.validate(cfg, ndev)
    mode = args.small_map_convs if name == 'baseline' else overrides.get(
        'small_map_convs', args.small_map_convs)
    set_small_map_convs(mode)
    try:
      mesh, state, crops, labels, step = setup(cfg, ndev)
      t = time.perf_counter()
      compiled = step.lower(state, crops, labels).compile()
      compile_s = time.perf_counter() - t
    finally:
      set_small_map_convs(args.small_map_convs)
    print(f'{name}: compiled in {compile_s:.1f} s', flush=True)
    sides[name] = {'compiled': compiled, 'state': state, 'crops': crops, 'labels': labels,
                   'compile_s': compile_s, 'flops': compiled_stats.flops(compiled),
                   'memory': compiled_stats.memory(compiled, jax.local_devices()[0]), 'times': [],
                   'options': {'neck_regions': cfg.model.neck_regions,
                               'target_whole_crops_only': bool(cfg.model.target_whole_crops_only),
                               'dtype': cfg.model.dtype, 'region_path': cfg.model.region_path,
                               'small_map_convs': mode, 'crop_on': cfg.data.crop_on,
                               'max_side': cfg.data.max_side, 'remat': cfg.model.remat,
                               'accumulate': cfg.optim.accumulate}}
  for r in range(0 if args.compile_only else args.warmup + args.steps):
    order = ('baseline', 'variant') if r % 2 == 0 else ('variant', 'baseline')
    this_round = {}
    for name in order:
      sd = sides[name]
      t = time.perf_counter()
      sd['state'], m = sd['compiled'](sd['state'], sd['crops'], sd['labels'])
      jax.block_until_ready((sd['state'], m))
      dt = time.perf_counter() - t
      this_round[name] = dt
      if r >= args.warmup:
        sd['times'].append(dt)
    print(f'round {r}' + (' (warm-up)' if r < args.warmup else '') + ': '
          + ', '.join(f'{n} {this_round[n]:.3f} s' for n in ('baseline', 'variant')),
          flush=True)
  res = {'preset': args.preset, 'ab': args.ab, 'backend': jax.default_backend(),
         'devices': ndev, 'image_size': config.data.image_size,
         'per_device_batch': args.batch_value, 'group_size': config.montage.group_size,
         'depth': config.model.depth, 'width': config.model.width}
  for name, sd in sides.items():
    res[name] = {'options': sd['options'], 'compile_s': sd['compile_s'],
                 'flops_per_step': sd['flops'], 'memory': sd['memory'],
                 'step_times_s': sd['times'],
                 'step_s': statistics.median(sd['times']) if sd['times'] else None}
  a, b = res['baseline'], res['variant']
  if not args.compile_only:
    res['time_ratio_variant_over_baseline'] = b['step_s'] / a['step_s']
    res['median_round_ratio'] = statistics.median(
        [y / x for x, y in zip(a['step_times_s'], b['step_times_s'])])
    # The fastest step of each side: the least disturbed by other load.
    res['min_ratio'] = min(b['step_times_s']) / min(a['step_times_s'])
  res['flops_ratio_variant_over_baseline'] = b['flops_per_step'] / a['flops_per_step']
  return res


def print_ab(res: dict):
  print(f"A/B on {res['preset']} ({res['image_size']} px, ResNet-{res['depth']} "
        f"w{res['width']}, batch {res['per_device_batch']}/device, group "
        f"{res['group_size']}): variant = baseline with {res['ab']}")
  print(f"{'side':<9} {'options':<96} {'step s':>8} {'GFLOP':>8} {'temp MiB':>9}")
  for name in ('baseline', 'variant'):
    r = res[name]
    opts = ', '.join(f'{k}={v}' for k, v in r['options'].items())
    temp = r['memory'].get('temp_size_in_bytes')
    step_s = 'n/a' if r['step_s'] is None else f"{r['step_s']:.3f}"
    print(f"{name:<9} {opts:<96} {step_s:>8} {r['flops_per_step'] / 1e9:>8.1f} "
          f"{'n/a' if temp is None else f'{temp / 2**20:.0f}':>9}")
  timing = ('' if 'time_ratio_variant_over_baseline' not in res else
            f"time {res['time_ratio_variant_over_baseline']:.3f} (median of per-round ratios "
            f"{res['median_round_ratio']:.3f}, ratio of the fastest steps "
            f"{res['min_ratio']:.3f}), ")
  print(f"variant / baseline: {timing}FLOPs {res['flops_ratio_variant_over_baseline']:.3f}")


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
                  f"target_whole_crops_only={res['target_whole_crops_only']}, "
                  f"small_map_convs={res['small_map_convs']}"),
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
    print(f"\nbreakdown: {b['rounds']} rounds of (full step, each part); medians")
    print(f"{'part':<26} {'ms':>9} {'% step':>7} {'% parts':>8} {'GFLOP':>8}")
    print(f"{'full step':<26} {b['step_s'] * 1e3:>9.1f} {100.0:>7.1f} {'':>8} "
          f"{res['flops_per_step'] / 1e9:>8.2f}")
    for name, v in b['parts'].items():
      print(f"{name:<26} {v['s'] * 1e3:>9.1f} {v['pct_of_step']:>7.1f} "
            f"{v['pct_of_parts']:>8.1f} {v['flops'] / 1e9:>8.2f}")
    print(f"{'sum of parts':<26} {b['sum_of_parts_s'] * 1e3:>9.1f} "
          f"{100 * b['sum_of_parts_s'] / b['step_s']:>7.1f}")
    print(f"neck: {b['neck_matmul_ops_over_all_regions']} conv/dot ops over all "
          f"{b['neck_regions_per_view']} regions of a view in the online forward "
          f"(expected {b['neck_matmul_ops_expected']}: its convs + 2 Dense): runs once over "
          f"all levels = {b['neck_runs_once_over_all_levels']}")


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
  p.add_argument('--remat', help="model.remat: 'none', 'blocks', 'blocks+neck', 'stages+neck'")
  p.add_argument('--accumulate', choices=('none', 'views'), help='optim.accumulate')
  p.add_argument('--sweep', help='compile only, one per setting, a table: comma-separated '
                 "per-device batches, e.g. 32,64,128 (with --sweep-regions, --sweep-remat, "
                 '--sweep-accumulate, --sweep-dtypes)')
  p.add_argument('--sweep-regions', default='all,used')
  p.add_argument('--sweep-remat', default='none,blocks,blocks+neck,stages+neck')
  p.add_argument('--sweep-accumulate', default='none,views')
  p.add_argument('--sweep-dtypes', default='float32,bfloat16')
  p.add_argument('--small-map-convs', choices=('dense', 'xla'), default='dense',
                 help="'dense' (library default): convs with <= 2x2 outputs as dense "
                      "matmuls (resnet.Conv); 'xla': all on XLA's convolution")
  p.add_argument('--devices', type=int, help='devices of the mesh (default: all local)')
  p.add_argument('--steps', type=int, help='timed steps (preset default)')
  p.add_argument('--warmup', type=int, default=1, help='untimed steps after the compile')
  p.add_argument('--matmul-size', type=int, default=None,
                 help='n of the peak matmul (default 2048 on CPU, 8192 otherwise; 0: skip)')
  p.add_argument('--compile-only', action='store_true',
                 help='compile and report FLOPs / memory, do not run')
  p.add_argument('--breakdown', action='store_true', help='time the parts of the step')
  p.add_argument('--breakdown-reps', type=int, default=3)
  p.add_argument('--ab', help='A/B: variant = the config with these overrides, e.g. '
                 'neck_regions=used or target_whole_crops_only=1 or small_map_convs=xla or '
                 'dtype=bfloat16; both compiled here, steps alternated')
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
  if args.sweep:
    res = sweep(config, args)
  elif args.ab:
    res = ab_compare(config, args)
    print()
    print_ab(res)
  else:
    set_small_map_convs(args.small_map_convs)
    res = bench_step(config, args)
    print()
    print_table(res)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == '__main__':
  main()
