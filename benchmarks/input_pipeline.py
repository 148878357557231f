"""Input pipeline throughput: host decode + crops, and device augmentation.

Host: the 'folder' source on synthetic JPEGs (500x375, like an average
ImageNet image) in a temp dir, 224 px, the config's crops per image, timed
with tf.data limited to one thread (the per-core figure) and with all cores.
The images are smooth random fields plus noise, so they compress to roughly
natural-image JPEG sizes; pure noise would make decoding unrealistically slow.

Device: `augment_crops` under jit on whatever JAX backend is present, median
wall time per batch after a warm-up call, with block_until_ready.

Usage:
  python -m benchmarks.input_pipeline [--json out.json]
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image

from configs.mcl_100ep import get_config
from mcl_jax import augment
from mcl_jax import input_pipeline


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


def host_throughput(data_cfg, batch: int, seconds: float,
                    num_threads) -> dict:
  """Images/s and crops/s of the train iterator after a warm-up."""
  cfg = data_cfg.copy_and_resolve_references()
  cfg.num_threads = num_threads
  it = input_pipeline.create_train_iterator(
      cfg, global_batch=batch, seed=0, process_index=0, process_count=1)
  for _ in range(2):  # warm-up: thread pools, autotuning, page cache
    next(it)
  n, start = 0, time.perf_counter()
  while n < 3 or time.perf_counter() - start < seconds:
    next(it)
    n += 1
  elapsed = time.perf_counter() - start
  images = n * batch / elapsed
  return {'threads': num_threads or os.cpu_count(), 'images_per_s': images,
          'crops_per_s': images * cfg.num_crops, 'batches': n}


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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=256)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seconds', type=float, default=10.0,
                      help='timed seconds per host measurement')
  parser.add_argument('--aug_batch', type=int, default=32)
  parser.add_argument('--aug_sizes', default='224,64')
  parser.add_argument('--aug_iters', type=int, default=5)
  parser.add_argument('--json', default=None, help='also write results here')
  args = parser.parse_args()

  config = get_config()
  data_cfg = config.data
  results = {'host': [], 'device': [], 'cpu_count': os.cpu_count(),
             'jax_device': str(jax.devices()[0].device_kind),
             'image_size': data_cfg.image_size,
             'num_crops': data_cfg.num_crops}
  with tempfile.TemporaryDirectory() as root:
    kb = make_jpeg_folder(root, args.num_images)
    results['mean_jpeg_kb'] = kb
    data_cfg.source = 'folder'
    data_cfg.folder = root
    data_cfg.shuffle_buffer = args.num_images
    for threads in (1, None):
      results['host'].append(
          host_throughput(data_cfg, args.batch, args.seconds, threads))

  for size in (int(s) for s in args.aug_sizes.split(',')):
    results['device'].append(device_augment_ms(
        config.augment, args.aug_batch, data_cfg.num_crops, size,
        args.aug_iters))

  print(f'\nHost pipeline: folder of {args.num_images} synthetic 500x375 '
        f'JPEGs (~{kb:.0f} KB), {data_cfg.image_size} px, '
        f'{data_cfg.num_crops} crops/image, batch {args.batch}, '
        f'{os.cpu_count()} cores')
  print(f'{"tf.data threads":>22} | {"images/s":>9} | {"crops/s":>9}')
  for row, label in zip(results['host'], ('1 (per core)', 'all (total)')):
    print(f'{label + " = " + str(row["threads"]):>22} | '
          f'{row["images_per_s"]:9.1f} | {row["crops_per_s"]:9.1f}')
  print(f'\nDevice augmentation: augment_crops, jit, batch {args.aug_batch} '
        f'x {data_cfg.num_crops} crops, median of {args.aug_iters}, on '
        f'{results["jax_device"]}')
  print(f'{"size":>6} | {"ms/batch":>9} | {"crops/s":>9} | {"1st call s":>10}')
  for row in results['device']:
    print(f'{row["size"]:6d} | {row["ms_per_batch"]:9.1f} | '
          f'{row["crops_per_s"]:9.1f} | {row["first_call_s"]:10.1f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
