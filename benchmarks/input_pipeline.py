"""Input pipeline throughput: decode, host crops, device crops, augmentation.

On the same JPEG folders and one tf.data thread (the per-core figure), timed
side by side (rounds alternate between the pipelines, so each sees the same
machine load; medians of the rounds):

* decode only: read + full JPEG decode, nothing else (the physical limit);
* host path (data.crop_on='host'): decode of the windows' union + 8
  antialiased resizes, batched crops;
* device path, host side (data.crop_on='device'): decode of the windows'
  union, downscale to max_side if longer, batched into padded buffers +
  windows;

each also as a ratio to decode only. Then the device side of the device path:
`device_crops.crop_batch` under jit on whatever JAX backend is present
(median ms per batch, block_until_ready), its FLOPs per image, and the bytes
per image each path sends to the device. Finally `augment_crops` (jit) as
before.

Images: synthetic 500x375 JPEGs (like an average ImageNet image; smooth
random fields plus noise, so they compress to natural-image sizes) and
scikit-image's bundled photos (300x451 to 872x1000) saved as JPEG q90, cycled
to the same count.

Usage:
  python -m benchmarks.input_pipeline [--rounds 5] [--seconds 3] [--max_side 512] [--json out.json]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image

from configs.mcl_100ep import get_config
from mcl_jax.data import augment, device_crops
from mcl_jax.data import input_pipeline
from mcl_jax.data import stream
from mcl_jax.data.lazy_tf import tf as _tf
from mcl_jax.data.spec import DataSpec
from benchmarks import compiled_stats

PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'immunohistochemistry',
          'hubble_deep_field')


def make_jpeg_folder(root: str, num_images: int, width: int = 500,
                     height: int = 375, seed: int = 0) -> float:
  """Writes num_images synthetic JPEGs into root/cls/; returns mean KB."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'cls'), exist_ok=True)
  sizes = []
  for i in range(num_images):
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                       Image.BICUBIC))
    noisy = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255)
    path = os.path.join(root, 'cls', f'{i:05d}.jpg')
    Image.fromarray(noisy.astype(np.uint8)).save(path, 'JPEG', quality=90)
    sizes.append(os.path.getsize(path))
  return float(np.mean(sizes)) / 1024


def make_photo_folder(root: str, num_images: int) -> float:
  """scikit-image's photos as JPEG q90, cycled to num_images files; mean KB."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(root, 'cls'), exist_ok=True)
  encoded = []
  for name in PHOTOS:
    buf = os.path.join(root, f'{name}.tmp')
    Image.fromarray(getattr(data, name)()).save(buf, 'JPEG', quality=90)
    with open(buf, 'rb') as f:
      encoded.append(f.read())
    os.remove(buf)
  for i in range(num_images):
    with open(os.path.join(root, 'cls', f'{i:05d}.jpg'), 'wb') as f:
      f.write(encoded[i % len(encoded)])
  return float(np.mean([len(e) for e in encoded])) / 1024


def decode_only_batches(root: str, batch: int, spec: DataSpec):
  """Endless batches of full JPEG decodes (only the shapes leave tf.data)."""
  tf = _tf()
  paths = sorted(os.path.join(root, 'cls', f)
                 for f in os.listdir(os.path.join(root, 'cls')))
  ds = tf.data.Dataset.from_tensor_slices(paths).repeat()
  ds = ds.map(lambda p: tf.shape(tf.io.decode_jpeg(tf.io.read_file(p),
                                                   channels=3)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch).prefetch(spec.prefetch)
  return iter(ds.with_options(stream.dataset_options(spec)).as_numpy_iterator())


def pipelines(data_cfg, root: str, batch: int) -> dict:
  """The three host pipelines on root, one tf.data thread each."""
  cfg = data_cfg.copy_and_resolve_references()
  cfg.folder = root
  cfg.num_threads = 1
  out = {'decode only': decode_only_batches(root, batch, DataSpec.from_config(cfg))}
  for crop_on, name in (('host', 'host path'), ('device', 'device path, host side')):
    cfg.crop_on = crop_on
    out[name] = input_pipeline.open_source(cfg.copy_and_resolve_references()).train_iterator(
        global_batch=batch, seed=0, process_index=0, process_count=1)
  return out


def alternate(iters: dict, batch: int, rounds: int, seconds: float) -> dict:
  """Images/s of each iterator: rounds of `seconds` each, in turn; medians."""
  for it in iters.values():  # warm-up: thread pools, page cache, buffers
    for _ in range(2):
      next(it)
  rates = {name: [] for name in iters}
  names = list(iters)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      it = iters[name]
      n, start = 0, time.perf_counter()
      while n < 2 or time.perf_counter() - start < seconds:
        next(it)
        n += 1
      rates[name].append(n * batch / (time.perf_counter() - start))
  return {name: {'images_per_s': statistics.median(v), 'rounds': v}
          for name, v in rates.items()}


def device_crop_ms(batch: int, num_crops: int, size: int, max_side: int,
                   iters: int, seed: int = 0) -> dict:
  """Median ms per `crop_batch` call under jit on 500x375-like buffers."""
  rng = np.random.default_rng(seed)
  h, w = min(max_side, 375), min(max_side, 500)
  image = rng.integers(0, 256, (batch, max_side, max_side, 3), dtype=np.uint8)
  sizes = np.tile(np.array([[h, w]], np.int32), (batch, 1))
  # RandomResizedCrop-like windows: 20-100% of the area, aspect 3/4..4/3.
  area = rng.uniform(0.2, 1.0, (batch, num_crops)) * h * w
  aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), (batch, num_crops)))
  cw = np.minimum(np.round(np.sqrt(area * aspect)), w)
  ch = np.minimum(np.round(np.sqrt(area / aspect)), h)
  y = np.floor(rng.uniform(0, 1, ch.shape) * (h - ch + 1))
  x = np.floor(rng.uniform(0, 1, cw.shape) * (w - cw + 1))
  windows = np.stack([y, x, ch, cw], -1).astype(np.float32)
  args = [jax.device_put(a) for a in (image, sizes, windows)]
  fn = jax.jit(device_crops.crop_batch, static_argnums=3)
  t0 = time.perf_counter()
  compiled = fn.lower(*args, size).compile()
  compile_s = time.perf_counter() - t0
  compiled(*args).block_until_ready()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    compiled(*args).block_until_ready()
    times.append(time.perf_counter() - t0)
  ms = 1000 * statistics.median(times)
  return {'batch': batch, 'max_side': max_side, 'size': size,
          'ms_per_batch': ms, 'images_per_s': batch / ms * 1000,
          'gflop_per_image': compiled_stats.flops(compiled) / batch / 1e9,
          'compile_s': compile_s, 'iters': iters}


def device_augment_ms(aug_cfg, batch: int, num_crops: int, size: int,
                      iters: int) -> dict:
  """Median ms per augment_crops call (jit, after warm-up)."""
  crops = jax.device_put(np.random.default_rng(0).integers(
      0, 256, (batch, num_crops, size, size, 3), dtype=np.uint8))
  key = jax.random.key(0)
  t0 = time.perf_counter()
  augment.augment_crops(crops, key, aug_cfg, num_crops).block_until_ready()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(iters):
    k = jax.random.fold_in(key, i)
    t0 = time.perf_counter()
    augment.augment_crops(crops, k, aug_cfg, num_crops).block_until_ready()
    times.append(time.perf_counter() - t0)
  ms = 1000 * float(np.median(times))
  return {'size': size, 'batch': batch, 'num_crops': num_crops,
          'ms_per_batch': ms, 'crops_per_s': batch * num_crops / ms * 1000,
          'first_call_s': compile_s, 'iters': iters}


def transfer_bytes(data_cfg) -> dict:
  """Bytes per image sent to the device by each path (nothing comes back)."""
  n, s, m = data_cfg.num_crops, data_cfg.image_size, data_cfg.max_side
  return {'host': n * s * s * 3 + 4,  # crops + label
          'device': m * m * 3 + 2 * 4 + n * 4 * 4 + 4}  # buffer, size, windows, label


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=192)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--seconds', type=float, default=3.0,
                      help='timed seconds per pipeline and round')
  parser.add_argument('--crop_batch', type=int, default=32)
  parser.add_argument('--crop_iters', type=int, default=5)
  parser.add_argument('--aug_batch', type=int, default=32)
  parser.add_argument('--aug_sizes', default='224',
                      help="comma-separated crop sides for augment_crops ('' skips)")
  parser.add_argument('--aug_iters', type=int, default=5)
  parser.add_argument('--max_side', type=int, default=None,
                      help='data.max_side of the device path (default: the config\'s)')
  parser.add_argument('--json', default=None, help='also write results here')
  args = parser.parse_args()

  config = get_config()
  data_cfg = config.data
  data_cfg.source = 'folder'
  data_cfg.shuffle_buffer = args.num_images
  if args.max_side:
    data_cfg.max_side = args.max_side
  results = {'cpu_count': os.cpu_count(), 'load_before': os.getloadavg(),
             'jax_device': str(jax.devices()[0].device_kind),
             'image_size': data_cfg.image_size, 'num_crops': data_cfg.num_crops,
             'max_side': data_cfg.max_side, 'host': {}, 'kb': {}}
  makers = {'synthetic 500x375': make_jpeg_folder, 'scikit-image photos': make_photo_folder}
  for label, make in makers.items():
    with tempfile.TemporaryDirectory() as root:
      results['kb'][label] = make(root, args.num_images)
      results['host'][label] = alternate(pipelines(data_cfg, root, args.batch),
                                         args.batch, args.rounds, args.seconds)
  results['load_after_host'] = os.getloadavg()
  results['device_crops'] = device_crop_ms(
      args.crop_batch, data_cfg.num_crops, data_cfg.image_size, data_cfg.max_side,
      args.crop_iters)
  results['transfer_bytes_per_image'] = transfer_bytes(data_cfg)
  results['augment'] = [
      device_augment_ms(config.augment, args.aug_batch, data_cfg.num_crops, int(s),
                        args.aug_iters) for s in args.aug_sizes.split(',') if s]

  load = results['load_before']
  print(f'\nHost pipelines, one tf.data thread (per core), {data_cfg.image_size} px, '
        f'{data_cfg.num_crops} crops/image, batch {args.batch}, max_side '
        f'{data_cfg.max_side}; medians of {args.rounds} alternating rounds of '
        f'{args.seconds:g} s; {os.cpu_count()} cores, load {load[0]:.1f} before, '
        f'{results["load_after_host"][0]:.1f} after')
  labels = list(makers)
  heads = [f"{l} (~{results['kb'][l]:.0f} KB)" for l in labels]
  print(f'{"":26}' + ''.join(f' | {h:>32}' for h in heads))
  print(f'{"images/s per core":26}' + ''.join(f' | {"images/s":>12} {"x decode-only":>19}'
                                              for _ in labels))
  for name in ('decode only', 'host path', 'device path, host side'):
    row = f'{name:26}'
    for l in labels:
      r = results['host'][l]
      rate = r[name]['images_per_s']
      r[name]['ratio_to_decode'] = rate / r['decode only']['images_per_s']
      row += f' | {rate:12.1f} {r[name]["ratio_to_decode"]:19.2f}'
    print(row)
  d = results['device_crops']
  dec = results['host'][labels[0]]['decode only']['images_per_s']
  d['ratio_to_decode'] = d['images_per_s'] / dec
  print(f'\nDevice side of the device path: crop_batch under jit on '
        f'{results["jax_device"]}, batch {d["batch"]} x {data_cfg.num_crops} crops, '
        f'{d["max_side"]}^2 buffers -> {d["size"]} px: {d["ms_per_batch"]:.1f} ms/batch '
        f'(median of {d["iters"]}), {d["images_per_s"]:.0f} images/s '
        f'({d["ratio_to_decode"]:.2f} x decode-only on synthetic), '
        f'{d["gflop_per_image"]:.2f} GFLOP/image')
  t = results['transfer_bytes_per_image']
  print(f'Bytes per image to the device: host path {t["host"]:,} (crops), device path '
        f'{t["device"]:,} (buffer + size + windows) = {t["device"] / t["host"]:.2f} x; '
        'back to the host: none (metrics only)')
  if results['augment']:
    print(f'\nDevice augmentation: augment_crops, jit, batch {args.aug_batch} '
          f'x {data_cfg.num_crops} crops, median of {args.aug_iters}')
    print(f'{"size":>6} | {"ms/batch":>9} | {"crops/s":>9} | {"1st call s":>10}')
    for row in results['augment']:
      print(f'{row["size"]:6d} | {row["ms_per_batch"]:9.1f} | '
            f'{row["crops_per_s"]:9.1f} | {row["first_call_s"]:10.1f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
