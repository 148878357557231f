"""A `data.folder` run's input pipeline, images/s: the folder in a bucket beside it on disk.

The same synthetic 500x375 JPEG folder (benchmarks/input_pipeline.py's) is
written to local disk and to a bucket, and the training pipeline of the
'folder' source (configs/mcl_100ep.py's data settings, host crops) reads
each in turn: rounds alternate between the two, so that both see the same
machine load; medians of the rounds. The gs:// pipeline reads every file
through mcl_jax.paths (the project's one gcsfs client); the local one with
tf.io.read_file. Also timed: the scan of each (on gs://, one listing).

Without --bucket, a fake-gcs-server on 127.0.0.1 (mcl_jax.testing.gcs_server,
from requirements-test.txt) stands in for GCS: its figures are of the
client's work on this machine, not of a network. With --bucket=gs://B/prefix
(credentials needed) the folder is uploaded there.

Usage:
  python -m benchmarks.folder_io [--num_images 256] [--batch 32] [--rounds 5] [--seconds 4]
      [--num_threads N] [--bucket gs://B/prefix] [--json out.json]
"""

import argparse
import gc
import json
import os
import shutil
import tempfile
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--num_images', type=int, default=256)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--seconds', type=float, default=4.0, help='timed seconds per round')
  p.add_argument('--num_threads', type=int, default=None,
                 help="data.num_threads (default: the config's, i.e. tf.data's choice)")
  p.add_argument('--bucket', default=None, help='a real gs://BUCKET/prefix instead of the '
                 'fake server')
  p.add_argument('--json', default=None)
  return p.parse_args()


def _upload(local: str, cloud: str):
  from mcl_jax import paths  # pylint: disable=import-outside-toplevel
  for rel in paths.find(local):
    paths.write_atomic(paths.join(cloud, rel), paths.read_bytes(os.path.join(local, rel)))


def main():
  args = _parse()
  server = None
  if args.bucket:
    cloud_root = args.bucket.rstrip('/') + '/folder_io'
  else:
    from benchmarks import cloud_io  # pylint: disable=import-outside-toplevel
    server, cloud_root = cloud_io._start_fake_server()  # pylint: disable=protected-access
  # pylint: disable=import-outside-toplevel
  from benchmarks import input_pipeline as bench
  from configs.mcl_100ep import get_config
  from mcl_jax import paths
  from mcl_jax.data import folder, input_pipeline
  # pylint: enable=import-outside-toplevel
  local_root = tempfile.mkdtemp(prefix='folder_io_')
  cloud_root = f'{cloud_root}/{int(time.time())}'
  try:
    kb = bench.make_jpeg_folder(local_root, args.num_images)
    _upload(local_root, cloud_root)
    data_cfg = get_config().data
    data_cfg.source, data_cfg.crop_on = 'folder', 'host'
    data_cfg.shuffle_buffer = args.num_images
    if args.num_threads:
      data_cfg.num_threads = args.num_threads
    results = {'cpu_count': os.cpu_count(), 'load_before': os.getloadavg(), 'kb': kb,
               'num_images': args.num_images, 'batch': args.batch,
               'image_size': data_cfg.image_size, 'num_crops': data_cfg.num_crops,
               'server': args.bucket or 'fake-gcs-server on 127.0.0.1', 'scan_s': {}}
    iters = {}
    for name, root in (('local disk', local_root), ('gs:// bucket', cloud_root)):
      cfg = data_cfg.copy_and_resolve_references()
      cfg.folder = root
      start = time.perf_counter()
      folder.scan_folder(input_pipeline.DataSpec.from_config(cfg), cfg.train_split)
      results['scan_s'][name] = time.perf_counter() - start
      iters[name] = input_pipeline.open_source(cfg).train_iterator(
          global_batch=args.batch, seed=0, process_index=0, process_count=1)
    results['rates'] = bench.alternate(iters, args.batch, args.rounds, args.seconds)
    results['load_after'] = os.getloadavg()
  finally:
    # Stop the pipelines' prefetching before their files and the server go.
    iters = None
    gc.collect()
    shutil.rmtree(local_root, ignore_errors=True)
    if paths.is_cloud(cloud_root):
      paths.rmtree(cloud_root)
    if server is not None:
      server.close()

  print(f'\ndata.folder training pipeline (host crops, {results["image_size"]} px, '
        f'{results["num_crops"]} crops/image), {args.num_images} JPEGs of ~{kb:.0f} KB, '
        f'batch {args.batch}, data.num_threads {args.num_threads or "default"}; medians of '
        f'{args.rounds} alternating rounds of {args.seconds:g} s; bucket: {results["server"]}; '
        f'{os.cpu_count()} cores, load {results["load_before"][0]:.1f} before, '
        f'{results["load_after"][0]:.1f} after')
  local = results['rates']['local disk']['images_per_s']
  print(f'{"":14} | {"images/s":>9} | {"x local":>7} | {"scan s":>7}')
  for name, r in results['rates'].items():
    print(f'{name:14} | {r["images_per_s"]:9.1f} | {r["images_per_s"] / local:7.2f} | '
          f'{results["scan_s"][name]:7.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
