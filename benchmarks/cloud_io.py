"""Workdir I/O, local against gs://, side by side: checkpoints and log flushes.

For one config's real TrainState (its shapes, random values), in one
process, alternating between a local workdir and a gs:// one (so that both
see the same machine load; medians over the rounds):

* checkpoint save through mcl_jax.training.checkpointing (Orbax, async, as
  the training loop saves): the time `save()` blocks the loop, the time
  until the checkpoint is complete (committed), its files and bytes;
* restore of the newest checkpoint (a new manager, as a resumed run);
* the log flushes of a long simulated run (the metric keys of a real run,
  one line per step): what the loop's flush before each checkpoint uploads
  (metrics.jsonl) and what each TensorBoard flush uploads, at the first and
  the last checkpoint, against what rewriting the whole file would upload.

Without --bucket, a fake-gcs-server on 127.0.0.1 (mcl_jax.testing.gcs_server,
installed by requirements-test.txt) stands in for GCS: its figures are of
the client's work and this machine, not of a network. With
--bucket=gs://BUCKET/prefix (credentials needed) the same runs go to a real
bucket.

Usage:
  python -m benchmarks.cloud_io [--config test_tiny] [--rounds 5]
      [--log_steps 20000] [--checkpoint_every 1000] [--bucket gs://B/prefix] [--json out.json]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='test_tiny', help='a module of configs/ (its TrainState)')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--log_steps', type=int, default=20000, help='steps of the simulated log')
  p.add_argument('--checkpoint_every', type=int, default=1000,
                 help='simulated run: a metrics flush every this many steps')
  p.add_argument('--bucket', default=None, help='a real gs://BUCKET/prefix instead of the '
                 'fake server')
  p.add_argument('--json', default=None)
  return p.parse_args()


def _start_fake_server():
  """fake-gcs-server on 127.0.0.1, the environment pointed at it; returns (server, gs root)."""
  from mcl_jax.testing import gcs_server  # pylint: disable=import-outside-toplevel
  port = gcs_server.free_port()
  scratch = tempfile.mkdtemp(prefix='cloud_io_')
  gcs_server.configure_environment(port, os.path.join(scratch, 'gcloud'))
  server = gcs_server.GcsServer(port, backend='filesystem')
  server.start()
  server.create_bucket('bench')
  return server, 'gs://bench/cloud_io'


def _state(config_name: str):
  import importlib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import optim, state as state_lib  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f'configs.{config_name}').get_config()
  tx = optim.create_optimizer(config, 10)
  abstract = state_lib.abstract_train_state(config, tx)
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda s: (rng.normal(size=s.shape).astype(s.dtype)
                 if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype)),
      abstract)
  # On the device, as the loop's state is: a save then copies it to the host.
  return config, abstract, jax.block_until_ready(jax.device_put(state))


def _checkpoints(roots, abstract, state, rounds):
  from mcl_jax import paths  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  out = {}
  # Every round kept: no deletion of an old step runs inside a timed save.
  managers = {k: checkpointing.make_manager(w, rounds + 1) for k, w in roots.items()}
  times = {k: {'block': [], 'complete': [], 'restore': []} for k in roots}
  for step in range(1, rounds + 1):
    for kind, manager in managers.items():  # alternating: the same load for both
      t0 = time.perf_counter()
      checkpointing.save(manager, step, state, force=True)
      t1 = time.perf_counter()
      manager.wait_until_finished()
      times[kind]['block'].append(t1 - t0)
      times[kind]['complete'].append(time.perf_counter() - t0)
  for kind, manager in managers.items():
    manager.close()
  for _ in range(rounds):
    for kind, workdir in roots.items():
      manager = checkpointing.make_manager(workdir, 2, create=False)
      t0 = time.perf_counter()
      _, step = checkpointing.restore_latest(manager, abstract)
      times[kind]['restore'].append(time.perf_counter() - t0)
      manager.close()
  for kind, workdir in roots.items():
    files, size = paths.disk_usage(paths.join(checkpointing.checkpoint_dir(workdir),
                                              str(rounds)))
    out[kind] = {k: statistics.median(v) for k, v in times[kind].items()}
    out[kind].update(files=files, bytes=size)
  return out


METRIC_KEYS = ('loss', 'loss_level0', 'loss_level1', 'loss_level2', 'loss_level3', 'lr',
               'target_momentum', 'grad_norm', 'param_norm', 'update_norm', 'images_per_sec')


def _count_requests(server, workdir, state):
  """HTTP requests to the bucket while save() blocks, until complete, and per metrics flush.

  Through a counting proxy in front of the fake server (both gcsfs and
  tensorstore read their endpoint from the environment at each request or
  store they open), once: counts do not depend on the machine's load.
  """
  import threading  # pylint: disable=import-outside-toplevel
  from mcl_jax.testing import gcs_server  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import checkpointing, logs  # pylint: disable=import-outside-toplevel
  seen, lock = [], threading.Lock()

  def count(method, path):
    with lock:
      seen.append((method, path.split('?')[0]))
    return None

  proxy = gcs_server.RefusingProxy(server.url, count)
  saved = {k: os.environ[k] for k in ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL')}
  os.environ.update({k: proxy.url for k in saved})
  try:
    manager = checkpointing.make_manager(workdir, 2)
    checkpointing.save(manager, 1, state, force=True)  # the first save also makes folders
    manager.wait_until_finished()
    n0 = len(seen)
    checkpointing.save(manager, 2, state, force=True)
    n_block = len(seen) - n0
    manager.wait_until_finished()
    n_total = len(seen) - n0
    manager.close()
    writer = logs.MetricWriter(workdir + '/logs', 10, 4096)
    writer.write(1, {k: 1.0 for k in METRIC_KEYS}, console=False)
    writer.flush()
    n1 = len(seen)
    writer.write(2, {k: 1.0 for k in METRIC_KEYS}, console=False)
    writer.flush()
    n_flush = len(seen) - n1
    writer.close()
  finally:
    os.environ.update(saved)
    proxy.close()
  return {'save_blocking': n_block, 'save_total': n_total, 'metrics_flush': n_flush}


def _log_flushes(roots, steps, every):
  """A simulated run's logs: bytes and time of each flush at a checkpoint."""
  from mcl_jax import paths  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import logs  # pylint: disable=import-outside-toplevel
  out = {}
  for kind, workdir in roots.items():
    paths.makedirs(workdir)
    writer = logs.MetricWriter(workdir, steps, 4096)
    tb = logs._TENSORBOARD_FILES[-1].file if paths.is_cloud(workdir) else None  # pylint: disable=protected-access
    jsonl = writer._jsonl  # pylint: disable=protected-access
    flushes = []
    prev = (0, 0)
    for step in range(1, steps + 1):
      writer.write(step, {k: 1.0 / step + i for i, k in enumerate(METRIC_KEYS)}, console=False)
      if step % every == 0:
        t0 = time.perf_counter()
        writer.flush()  # what the loop does before each checkpoint
        t_metrics = time.perf_counter() - t0
        t0 = time.perf_counter()
        writer._tb.flush()  # pylint: disable=protected-access
        t_tb = time.perf_counter() - t0
        if tb is not None:
          sent = (jsonl.bytes_uploaded - prev[0], tb.bytes_uploaded - prev[1])
          prev = (jsonl.bytes_uploaded, tb.bytes_uploaded)
          sizes = (jsonl.bytes_uploaded, tb.bytes_uploaded)
        else:
          sizes = (paths.getsize(paths.join(workdir, logs.METRICS_FILE)),
                   paths.getsize(paths.glob(paths.join(workdir, 'events.out.tfevents.*'))[-1]))
          sent = (sizes[0] - prev[0], sizes[1] - prev[1])
          prev = sizes
        flushes.append({'step': step, 'metrics_s': t_metrics, 'tensorboard_s': t_tb,
                        'metrics_bytes': sent[0], 'tensorboard_bytes': sent[1],
                        'metrics_file': sizes[0], 'tensorboard_file': sizes[1]})
    writer.close()
    out[kind] = flushes
  return out


def _table(rows, header):
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
  return '\n'.join(lines)


def main():
  args = _parse()
  server = None
  if args.bucket:
    gs_root = args.bucket.rstrip('/') + f'/cloud_io_{uuid.uuid4().hex[:8]}'
  else:
    server, gs_root = _start_fake_server()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  local_root = tempfile.mkdtemp(prefix='cloud_io_local_')
  from mcl_jax import paths  # pylint: disable=import-outside-toplevel
  try:
    config, abstract, state = _state(args.config)
    roots = {'local': os.path.join(local_root, 'ckpt'), 'gs://': gs_root + '/ckpt'}
    ckpt = _checkpoints(roots, abstract, state, args.rounds)
    roots = {'local': os.path.join(local_root, 'logs'), 'gs://': gs_root + '/logs'}
    logs_ = _log_flushes(roots, args.log_steps, args.checkpoint_every)
    requests = (_count_requests(server, gs_root + '/count', state) if server is not None
                else None)
  finally:
    shutil.rmtree(local_root, ignore_errors=True)
    if server is not None:
      server.close()
    elif args.bucket:
      paths.rmtree(gs_root)
  where = args.bucket or 'fake-gcs-server on 127.0.0.1'
  print(f'\nconfig {args.config}, {args.rounds} rounds, gs:// = {where}; '
        f'load {os.getloadavg()[0]:.1f}\n')
  print(_table([[k, f'{v["block"] * 1e3:.0f}', f'{v["complete"] * 1e3:.0f}',
                 f'{v["restore"] * 1e3:.0f}', v['files'], f'{v["bytes"] / 2**20:.2f}']
                for k, v in ckpt.items()],
               ['workdir', 'save blocks the loop (ms)', 'save complete (ms)', 'restore (ms)',
                'files / objects', 'MiB per checkpoint']))
  print(f'\nlogs of a {args.log_steps}-step run, flushed every {args.checkpoint_every} '
        'steps (bytes sent per flush; in brackets what rewriting the whole file would send)\n')
  rows = []
  for kind, flushes in logs_.items():
    med = {k: statistics.median(f[k] for f in flushes) * 1e3
           for k in ('metrics_s', 'tensorboard_s')}
    for f in (flushes[0], flushes[-1]):
      rows.append([kind, f['step'], f'{f["metrics_bytes"]} [{f["metrics_file"]}]',
                   f'{f["tensorboard_bytes"]} [{f["tensorboard_file"]}]',
                   f'{med["metrics_s"]:.1f}', f'{med["tensorboard_s"]:.1f}'])
  print(_table(rows, ['workdir', 'flush at step', 'metrics.jsonl bytes', 'events bytes',
                      'metrics flush, median (ms)', 'events flush, median (ms)']))
  if requests:
    print(f'\nrequests to the bucket: {requests["save_blocking"]} while save() blocks the '
          f'loop, {requests["save_total"]} until the checkpoint is complete; '
          f'{requests["metrics_flush"]} per metrics flush')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'checkpoints': ckpt, 'logs': logs_, 'config': args.config,
                 'where': where, 'requests': requests}, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
