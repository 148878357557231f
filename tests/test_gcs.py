"""`--workdir=gs://…` end to end, against a real fake-gcs-server on 127.0.0.1 (issue 20).

The runs are real `python main.py` processes (tests/subprocess_runs.py: the
small config and the compilation cache shared with test_reliability.py and
test_distributed.py), with every storage client pointed at the session's
server (tests/conftest.py). Their losses are compared with the reference run,
which is the same program on a local workdir: a gs:// run must train exactly
as a local one. One chain of runs on one bucket covers the lifecycle, each
run picking up what the last one left:

  A  new run, SIGTERM: the step is saved, exit 0;
  B  the newest checkpoint corrupted in the bucket: the previous one is
     restored, the bad one moved aside; then the server stops and the run is
     killed (-9) while it is down; the server comes back;
  C  resume from the last complete checkpoint, the server stopped and
     restarted under the running job (its retries carry it over), to the end:
     every step's loss and the final state equal the uninterrupted run's,
     metrics.jsonl holds each step once, keep_checkpoints holds.

Then the tools read that workdir, and two processes write one checkpoint
(stopped by a SIGINT to one of them: the stop-signal save on gs:// with the
other signal).
Kill and signal steps are random, printed, and fixed by MCL_TEST_KILL_STEP /
MCL_TEST_STOP_STEPS as in test_reliability.py.
"""

import pickle
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from mcl_jax import paths
from mcl_jax.testing import gcs_server
from tests import subprocess_runs as runs

# Orbax/TensorStore report failed reads of damaged files from a closed event loop.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

# A gs:// run is the same program as the local reference run: its losses and
# final state equal it up to one final rounding of each value
# (runs.assert_losses_match, runs.same_state_up_to_rounding), as in
# test_reliability.py and test_distributed.py.


def _corrupt(step_dir: str):
  """Truncates every array object of a checkpoint in the bucket to half its size."""
  fs = paths.gcs()  # pylint: disable=protected-access
  keys = [k for k in fs.find(step_dir[len(paths.GS):]) if '/d/' in k]
  assert keys, step_dir
  for k in keys:
    data = fs.cat_file(k)
    fs.pipe_file(k, data[:len(data) // 2])


def _objects(prefix: str) -> list[str]:
  fs = paths.gcs()  # pylint: disable=protected-access
  root = prefix[len(paths.GS):].rstrip('/') + '/'
  return sorted(k[len(root):] for k in fs.find(root))


def _wait_for_line(r: runs.Run, pattern: str, timeout: float = runs.TIMEOUT_S) -> re.Match:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    m = re.search(pattern, r.output(), re.M)
    if m:
      return m
    if r.proc.poll() is not None:
      raise AssertionError(f'main.py exited ({r.proc.returncode}) before {pattern!r}:\n'
                           f'{r.tail()}')
    time.sleep(0.005)
  raise AssertionError(f'{pattern!r} not printed within {timeout}s:\n{r.tail()}')


@pytest.fixture(scope='module')
def gs_run(gcs):
  """The chain A-C of the module docstring on one bucket; returns its workdir."""
  ref = runs.reference()
  bucket = gcs_server.bucket_name('chain')
  gcs.create_bucket(bucket)
  workdir = f'gs://{bucket}/runs/tiny'
  rng = runs.random_steps_rng()
  j1, j2 = runs.env_steps('MCL_TEST_STOP_STEPS') or (rng.randint(3, 4), rng.randint(6, 8))
  t0 = time.monotonic()

  # A: a new run in the bucket; SIGTERM saves the current step and exits 0.
  r = runs.Run(workdir, '--config.montage_png=True', name='gs-sigterm')
  seen = r.wait_for_step(j1)
  r.signal(signal.SIGTERM)
  assert r.wait() == 0, r.tail()
  out = r.output()
  s1 = max(runs.logged_steps(workdir))
  print(f'\nA: SIGTERM once step {j1} was logged (seen {seen}): stopped after {s1}; '
        f'{runs.checkpoint_entries(workdir)} ({r.seconds:.1f}s)')
  assert 'Starting a new run' in out and f'Stopped after step {s1} (SIGTERM)' in out
  assert f'checkpoint of step {s1} -> {workdir}/checkpoints/{s1}' in out
  assert max(runs.checkpoint_steps(workdir)) == s1
  runs.assert_losses_match(workdir, range(1, s1 + 1), 'A')
  top = _objects(workdir)
  assert {'config.json', 'metrics.jsonl', 'train.log', 'montage.png'} <= set(top), top
  assert any(n.startswith('events.out.tfevents.') for n in top), top
  assert f'Stopped after step {s1} (SIGTERM)' in paths.read_text(workdir + '/train.log')

  # B: the newest checkpoint is damaged in the bucket: the previous one is
  # restored and the bad one moved aside. Then the server goes away and the
  # run is killed (-9) while it is down: the save in flight, if any, never
  # completes.
  _corrupt(f'{workdir}/checkpoints/{s1}')
  previous = max(s for s in runs.checkpoint_steps(workdir) if s < s1)
  r = runs.Run(workdir, name='gs-fallback-outage-kill')
  seen = r.wait_for_step(max(j2, previous + 1))
  gcs.stop()
  try:
    time.sleep(0.5)
    r.proc.send_signal(signal.SIGKILL)
    assert r.wait() == -signal.SIGKILL, r.tail()
  finally:
    gcs.start()
  out = r.output()
  complete = runs.checkpoint_steps(workdir)
  print(f'B: checkpoint {s1} corrupted: resumed from {previous}; server stopped once step '
        f'{j2} was logged (seen {seen}) and the run killed; complete checkpoints {complete}, '
        f'entries {runs.checkpoint_entries(workdir)} ({r.seconds:.1f}s)')
  assert f'Checkpoint of step {s1} is unreadable' in out
  assert f'Resumed from the checkpoint of step {previous}.' in out
  assert f'{s1}.corrupt' in runs.checkpoint_entries(workdir)

  # C: resumes from the last complete checkpoint; the server stops and comes
  # back under it (2 s: gcsfs's and tensorstore's retries wait it out).
  r = runs.Run(workdir, name='gs-resume')
  m = _wait_for_line(r, r'^checkpoint of step (\d+) ->')
  gcs.stop()
  time.sleep(2)
  gcs.start()
  assert r.wait() == 0, r.tail()
  out = r.output()
  print(f'C: resumed from {max(complete)}; server stopped for 2 s after the save of step '
        f'{m.group(1)}; finished ({r.seconds:.1f}s); whole chain {time.monotonic() - t0:.1f}s')
  assert f'Resumed from the checkpoint of step {max(complete)}.' in out, out[-3000:]
  return {'workdir': workdir, 'reference': ref, 'corrupt': s1, 'output': out, 'stopped': s1,
          'resumed': max(complete)}


def test_gs_chain_trains_as_an_uninterrupted_local_run(gs_run):
  workdir = gs_run['workdir']
  # One line per step, each step's loss as the uninterrupted (local) run's.
  assert runs.logged_steps(workdir) == list(range(1, runs.NUM_STEPS + 1))
  runs.assert_losses_match(workdir, range(1, runs.NUM_STEPS + 1), 'whole chain')
  got, _ = runs.load_state(workdir, runs.NUM_STEPS)
  want, _ = runs.load_state(gs_run['reference']['workdir'], runs.NUM_STEPS)
  diff = runs.max_abs_diff(got, want)
  print(f'final TrainState max |gs chain - uninterrupted local| = {diff:.3g}')
  runs.same_state_up_to_rounding(got, want, 'gs chain vs uninterrupted local')
  # keep_checkpoints=2 (configs/test_tiny.py): the two newest complete steps,
  # the corrupt one aside, no step folder without its commit marker, no
  # append parts left over.
  entries = runs.checkpoint_entries(workdir)
  assert entries == sorted(['10', '12', f'{gs_run["corrupt"]}.corrupt']), entries
  assert runs.checkpoint_steps(workdir) == [10, 12]
  top = _objects(workdir)
  assert not [o for o in top if '.append-' in o or '.write_test_' in o], top
  # The TensorBoard files in the bucket are whole records: the points of the
  # runs that closed their writer (A, C) are all there. (B's last 30 s went
  # with the kill, as a local file's last 120 s would.)
  steps = _tensorboard_steps(workdir, 'loss')
  assert set(range(1, gs_run['stopped'] + 1)) <= steps, steps
  assert set(range(gs_run['resumed'] + 1, runs.NUM_STEPS + 1)) <= steps, steps


def _tensorboard_steps(workdir: str, tag: str) -> set[int]:
  """Steps of `tag` in every event file of a gs:// workdir (TFRecord framing checked)."""
  import struct  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  steps = set()
  for name in _objects(workdir):
    if not name.startswith('events.out.tfevents.'):
      continue
    data, pos = paths.read_bytes(f'{workdir}/{name}'), 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + length]
      assert len(record) == length, f'{name}: a record cut short at byte {pos}'
      pos += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      steps.update(event.step for v in event.summary.value if v.tag == tag)
  return steps


def test_gs_tools(gs_run, tmp_path, capsys, monkeypatch):
  """evaluate, dense_eval and export read the gs:// workdir; export and visualize write gs://."""
  from mcl_jax import dense_eval, evaluate, export
  from mcl_jax.eval import dense_probe
  workdir = gs_run['workdir']
  result = evaluate.main(['--workdir', workdir, '--dataset', 'digits', '--max-train', '64',
                          '--batch-size', '32'])
  assert 0.0 <= result['knn_top1'] <= 1.0 and 'online step 12' in capsys.readouterr().out
  monkeypatch.setattr(dense_probe, 'PROBE_STEPS', 20)
  result = dense_eval.main(['--workdir', workdir, '--num-train', '8', '--num-test', '4'])
  assert 0.0 <= result['miou'] <= 1.0
  assert paths.read_bytes(workdir + '/dense_probe.png')[:8] == b'\x89PNG\r\n\x1a\n'
  # export --out=gs://: the same bytes as the export to a local file.
  local = str(tmp_path / 'mcl.pkl')
  for out in (workdir + '/export/mcl.pkl', local):
    assert export.main(['--workdir', workdir, '--format', 'detectron2', '--out', out]) == 0
  with open(local, 'rb') as f:
    assert paths.read_bytes(workdir + '/export/mcl.pkl') == f.read()
  assert 'stem.conv1.weight' in pickle.loads(
      paths.read_bytes(workdir + '/export/mcl.pkl'))['model']
  # visualize's pictures (the run wrote montage.png the same way).
  from mcl_jax.eval import pictures
  pictures.crops_grid_png(np.random.default_rng(0).uniform(size=(2, 4, 8, 8, 3)),
                          workdir + '/crops.png')
  assert paths.read_bytes(workdir + '/crops.png')[:4] == b'\x89PNG'
  assert paths.read_bytes(workdir + '/montage.png')[:4] == b'\x89PNG'


def test_gs_two_processes_write_one_checkpoint(gcs, gs_bucket):
  """--distributed on localhost: both processes' parts in one checkpoint in the bucket."""
  ref = runs.reference()
  workdir = gs_bucket + '/two'
  j = (runs.env_steps('MCL_TEST_STOP_STEPS') or [3])[0]
  port = runs.free_port()
  procs = [runs.Run(workdir, '--distributed', f'--coordinator_address=127.0.0.1:{port}',
                    '--num_processes=2', f'--process_id={i}', devices=1, name=f'gs-dist{i}')
           for i in (0, 1)]
  procs[0].wait_for_step(j)
  # Ctrl-C on one host: forwarded to JAX's preemption sync, both stop after one step.
  procs[0].signal(signal.SIGINT)
  rcs = [p.wait() for p in procs]
  assert rcs == [0, 0], '\n\n'.join(p.tail() for p in procs)
  stops = [re.findall(r'^Stopped after step (\d+)', p.output(), re.M) for p in procs]
  assert 'Stopped after step' in procs[0].output() and '(SIGINT)' in procs[0].output()
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  s = int(stops[0][0])
  print(f'\n2 processes on gs://: stopped together after step {s} ({procs[0].seconds:.1f}s)')
  assert max(runs.checkpoint_steps(workdir)) == s
  parts = _objects(f'{workdir}/checkpoints/{s}')
  assert {'commit_success.txt', 'default/commit_success.txt'} <= set(parts), parts
  for i in (0, 1):  # each process wrote its own part of the one checkpoint
    assert any(o.startswith(f'default/ocdbt.process_{i}/') for o in parts), parts
  assert runs.logged_steps(workdir) == list(range(1, s + 1))  # process 0 alone logs
  runs.assert_losses_match(workdir, range(1, s + 1), '2 processes on gs://')
  top = _objects(workdir)
  assert 'train.log' in top and 'train.1.log' in top, top
  a, _ = runs.load_state(workdir, s)
  b, _ = runs.load_state(ref['workdir'], s)
  runs.same_state_up_to_rounding(a, b, '2 processes on gs:// vs 1 process')


# ---- data.folder in a bucket --------------------------------------------------


def _image_folder(root, n_random: int = 10) -> list[str]:
  """Random JPEGs and PNGs in two class folders, plus odd kinds; their relative names."""
  import io
  from PIL import Image
  rng = np.random.default_rng(0)
  files = {}
  for i in range(n_random):
    im = Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, 'JPEG' if i % 2 else 'PNG', quality=90)
    files[f'c{i % 2}/img{i}.{"jpg" if i % 2 else "png"}'] = buf.getvalue()
  odd = {'c0/cmyk.jpg': ('CMYK', 'JPEG'), 'c1/rgba.png': ('RGBA', 'PNG'),
         'c1/gray.jpg': ('L', 'JPEG'), 'top.jpg': ('RGB', 'JPEG')}
  for name, (mode, fmt) in odd.items():
    buf = io.BytesIO()
    Image.new(mode, (36, 28), (60, 120, 180, 50)[:len(mode)] if mode != 'L' else 77
              ).save(buf, fmt)
    files[name] = buf.getvalue()
  files['c0/cut.jpg'] = files['c1/img1.jpg'][:-300]  # no end-of-image marker: PIL
  files['c1/.hidden.jpg'] = files['top.jpg']
  files['notes.txt'] = b'not an image'
  for name, data in files.items():
    path = paths.join(root, *name.split('/'))
    paths.makedirs(paths.dirname(path))
    paths.write_atomic(path, data)
  return sorted(files)


@pytest.mark.parametrize('crop_on', ['host', 'device'])
def test_gs_folder_reads_as_the_local_folder(gs_bucket, tmp_path, monkeypatch, crop_on):
  """data.folder=gs://: the same index, batches and eval arrays as the same folder on disk,
  from one listing of the bucket and no second storage client."""
  from configs import test_tiny
  from mcl_jax.data import folder
  from mcl_jax.data import input_pipeline as ip
  local, cloud = str(tmp_path / 'imgs'), gs_bucket + '/imgs'
  _image_folder(local)
  _image_folder(cloud)
  listings, reads = [], []
  find, read_bytes = paths.find, paths.read_bytes
  monkeypatch.setattr(paths, 'find', lambda p: listings.append(p) or find(p))
  monkeypatch.setattr(paths, 'read_bytes', lambda p: reads.append(p) or read_bytes(p))
  tf = folder._tf()  # pylint: disable=protected-access
  tf_reads, tf_read_file = [], tf.io.read_file  # TensorFlow's own GCS client: local only
  monkeypatch.setattr(tf.io, 'read_file', lambda *a, **k: tf_reads.append(a) or tf_read_file(
      *a, **k))

  def data(root):
    cfg = test_tiny.get_config().data
    cfg.source, cfg.folder, cfg.image_size, cfg.num_crops = 'folder', root, 8, 2
    cfg.max_side, cfg.crop_on, cfg.shuffle_buffer = 32, crop_on, 16
    return cfg

  want = folder.scan_folder(ip.DataSpec.from_config(data(local)), 'train')
  got = folder.scan_folder(ip.DataSpec.from_config(data(cloud)), 'train')
  assert [p[len(cloud):] for p in got.paths] == [p[len(local):] for p in want.paths]
  assert got.class_names == want.class_names == ('c0', 'c1')
  np.testing.assert_array_equal(got.labels, want.labels)
  for process in (0, 1):  # 2 hosts: each reads its own half of every batch
    its = []
    for root in (local, cloud):
      traced = len(tf_reads)
      its.append(ip.open_source(data(root)).train_iterator(
          global_batch=4, seed=3, process_index=process, process_count=2, include_index=True))
      assert (len(tf_reads) > traced) == (root == local)
    for _ in range(5):
      a, b = next(its[0]), next(its[1])
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert its[1].stats.failed_decodes == 0
  assert listings == [cloud]  # one listing per process, whatever asks
  assert reads and all(r.startswith(cloud + '/') for r in reads)
  (xa, ya), (xb, yb) = (ip.open_source(data(r)).eval_arrays('validation')
                        for r in (local, cloud))
  np.testing.assert_array_equal(xa, xb)
  np.testing.assert_array_equal(ya, yb)


def test_gs_folder_run_trains(gcs, gs_bucket, tmp_path):
  """main.py with data.folder=gs://bucket/imgs trains its steps reading from the bucket."""
  _image_folder(gs_bucket + '/imgs', n_random=40)
  workdir = str(tmp_path / 'run')
  p = subprocess.run(runs.command(workdir, '--config.data.source=folder',
                                  f'--config.data.folder={gs_bucket}/imgs'),
                     cwd=runs.REPO, env=runs.env(2), capture_output=True, text=True,
                     timeout=runs.TIMEOUT_S)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert runs.logged_steps(workdir) == list(range(1, runs.NUM_STEPS + 1))
  assert f'"folder": "{gs_bucket}/imgs"' in paths.read_text(workdir + '/config.json')


def _error_line(p) -> str:
  lines = [l for l in p.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, p.stdout + p.stderr
  return lines[0]


def test_gs_workdir_errors_are_one_line_before_compiling(gcs, gs_bucket):
  """A missing bucket and refused writes: one line each, exit 1, nothing compiled."""
  proxy = gcs_server.RefusingProxy(gcs.url, gcs_server.refuse_uploads)
  try:
    cmds = {'missing': (runs.command('gs://no-such-bucket-run/x'), runs.env(2)),
            'refused': (runs.command(gs_bucket + '/x'),
                        runs.env(2, STORAGE_EMULATOR_HOST=proxy.url))}
    procs = {k: subprocess.Popen(cmd, cwd=runs.REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
             for k, (cmd, env) in cmds.items()}
    done = {}
    for k, p in procs.items():
      out, err = p.communicate(timeout=300)
      done[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
  finally:
    proxy.close()
  for k, p in done.items():
    print(f'\n{k}: {_error_line(p)}')
    assert p.returncode == 1 and 'Compiling' not in p.stdout, p.stdout + p.stderr
  assert re.match(r'error: bucket gs://no-such-bucket-run does not exist \(workdir '
                  r'gs://no-such-bucket-run/x\): create it \(gcloud storage buckets create '
                  r'gs://no-such-bucket-run\)', _error_line(done['missing']))
  assert 'no-such-bucket-run' not in gcs.buckets()  # never created by anyone
  assert re.match(rf'error: workdir {gs_bucket}/x is not writable: permission denied '
                  r'.*Storage Object User', _error_line(done['refused']))


def test_gs_no_credentials_is_one_line(monkeypatch):
  """Without credentials (and no emulator) the run stops before any request."""
  from configs import test_tiny
  from mcl_jax import cli
  from mcl_jax.training import loop
  monkeypatch.delenv('STORAGE_EMULATOR_HOST')
  monkeypatch.setattr(paths, '_FS', None)
  monkeypatch.setattr(paths, 'gcs', lambda: pytest.fail('a request was attempted'))
  monkeypatch.setattr(loop, 'make_train_step', lambda *a: pytest.fail('compiled'))
  config = test_tiny.get_config()
  config.optim.global_batch = 64  # 8 in-process devices
  with pytest.raises(Exception) as e:
    loop.train_and_evaluate(config, 'gs://some-bucket/run')
  line, status = cli.error_report(e.value)
  print(f'\nerror: {line}')
  assert status == 1 and line == (
      'workdir gs://some-bucket/run: no Google Cloud credentials found: run `gcloud auth '
      'application-default login` (or point GOOGLE_APPLICATION_CREDENTIALS at a '
      "service-account key; on a Cloud TPU or Compute Engine VM the VM's service account "
      'is used)')
