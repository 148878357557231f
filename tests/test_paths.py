"""mcl_jax.paths on local folders and on gs:// (a real fake-gcs-server on 127.0.0.1).

The same assertions run on both: the layer's promise is that callers cannot
tell them apart, except where GCS cannot do what a file system does (rename).
"""

import os
import time

import pytest

from mcl_jax import append_log, paths, storage_checks
from mcl_jax.testing import gcs_server


@pytest.fixture(params=['local', 'gs'])
def root(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path / 'root')
  return request.getfixturevalue('gs_bucket') + '/root'


def test_backends_are_forced_for_production_and_tests():
  """epath (Orbax's directories) and our own calls both run on core gcsfs."""
  from etils import epath
  from etils.epath import backend
  import gcsfs
  from gcsfs import core
  assert os.environ['EPATH_USE_TF'] == '0'
  assert epath.Path('gs://bucket/x')._backend is backend.fsspec_backend  # pylint: disable=protected-access
  assert gcsfs.GCSFileSystem is core.GCSFileSystem
  # One gcsfs instance, without a listing cache: what this module, tensorstore
  # or another host changes in a checkpoint folder, Orbax's next listing sees.
  fs = paths.gcs()  # pylint: disable=protected-access
  assert fs is backend.fsspec_backend.fs('gs://bucket/x')
  assert not fs.dircache.use_listings_cache


def test_write_read_list_remove(root):
  paths.makedirs(root)
  a, b = paths.join(root, 'a.json'), paths.join(root, 'sub', 'b.bin')
  paths.makedirs(paths.dirname(b))
  paths.write_atomic(a, '{"x": 1}\n')
  paths.write_atomic(b, bytes(range(256)) * 3)
  assert paths.read_text(a) == '{"x": 1}\n'
  assert paths.read_bytes(b) == bytes(range(256)) * 3
  assert paths.getsize(b) == 768
  paths.write_atomic(a, 'replaced')
  assert paths.read_text(a) == 'replaced'
  assert paths.exists(a) and paths.isfile(a) and not paths.isdir(a)
  assert paths.isdir(paths.join(root, 'sub')) and paths.exists(paths.join(root, 'sub'))
  assert paths.listdir(root) == ['a.json', 'sub']
  assert paths.glob(paths.join(root, '*.json')) == [a]
  assert not paths.exists(paths.join(root, 'none')) and paths.listdir(paths.join(root, 'x')) == []
  with paths.open(paths.join(root, 'c.txt'), 'w') as f:
    f.write('written through a file object')
  assert paths.read_text(paths.join(root, 'c.txt')) == 'written through a file object'
  paths.remove(a)
  paths.remove(a, missing_ok=True)
  with pytest.raises(FileNotFoundError):
    paths.remove(a)
  paths.rmtree(paths.join(root, 'sub'))
  assert paths.listdir(root) == ['c.txt']


def test_local_write_atomic_leaves_no_temporary_file(tmp_path):
  target = str(tmp_path / 'config.json')
  paths.write_atomic(target, 'x' * 1000)
  assert os.listdir(tmp_path) == ['config.json']
  with open(target, 'rb') as f:
    assert f.read() == b'x' * 1000


def test_append_file_uploads_only_new_bytes(root):
  paths.makedirs(root)
  path = paths.join(root, 'metrics.jsonl')
  log = append_log.AppendFile(path)
  sizes = []
  for chunk in range(4):
    lines = ''.join(f'{{"step": {chunk * 10 + i}}}\n' for i in range(10))
    log.write(lines)
    log.flush()
    sizes.append(len(lines.encode()))
  log.close()
  want = ''.join(f'{{"step": {s}}}\n' for s in range(40))
  assert paths.read_text(path) == want
  if paths.is_cloud(root):
    assert log.uploads == 4 and log.bytes_uploaded == sum(sizes) == len(want)
    # Appending composed the parts in; none is left behind.
    assert paths.listdir(root) == ['metrics.jsonl']
  # Reopening appends after what is there (a resumed run).
  again = append_log.AppendFile(path, binary=True)
  again.write(b'{"step": 40}\n')
  again.close()
  assert paths.read_text(path) == want + '{"step": 40}\n'


def test_append_file_uploads_in_the_background(gs_bucket):
  path = gs_bucket + '/train.log'
  log = append_log.AppendFile(path, background_s=0.05)
  log.write('one\n')
  deadline = time.monotonic() + 10
  while log.pending and time.monotonic() < deadline:
    time.sleep(0.01)
  assert log.pending == 0 and paths.read_text(path) == 'one\n'
  log.write('two\n')
  log.close()  # stops the thread, uploads the rest
  assert paths.read_text(path) == 'one\ntwo\n'


def test_append_file_keeps_bytes_when_the_server_is_down(gcs, gs_bucket, monkeypatch):
  path = gs_bucket + '/train.log'
  errors = []
  log = append_log.AppendFile(path, background_s=0.05, on_error=errors.append)
  log.write('first\n')
  log.flush()
  gcs_server.fast_gcsfs_retries(monkeypatch)
  gcs.stop()
  try:
    log.write('second\n')
    with pytest.raises(paths.StorageError, match='kept for the next flush'):
      log.flush()
    assert log.pending == len('second\n')
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
      time.sleep(0.01)
    assert len(errors) == 1  # the background thread says it once
  finally:
    gcs.start()
  log.write('third\n')
  log.close()
  assert paths.read_text(path) == 'first\nsecond\nthird\n'


def test_append_file_keeps_bytes_when_the_server_answers_503(gcs, gs_bucket, monkeypatch):
  """A 5xx once gcsfs's retries are spent (its HttpError, not an OSError) keeps them too."""
  path = gs_bucket + '/train.log'
  log = append_log.AppendFile(path)
  log.write('first\n')
  log.flush()
  gcs_server.fast_gcsfs_retries(monkeypatch)
  proxy = gcs_server.RefusingProxy(gcs.url, lambda method, path: 503)
  try:
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
    monkeypatch.setattr(paths, '_FS', None)
    log.write('second\n')
    with pytest.raises(paths.StorageError, match=r'HttpError 503: .*kept for the next flush'):
      log.flush()
    assert log.pending == len('second\n')
  finally:
    proxy.close()
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', gcs.url)
    monkeypatch.setattr(paths, '_FS', None)
  log.write('third\n')
  log.close()
  assert paths.read_text(path) == 'first\nsecond\nthird\n'


def test_move_tree_copies_then_deletes_the_commit_marker_first(root):
  src, dst = paths.join(root, '4'), paths.join(root, '4.corrupt')
  paths.makedirs(paths.join(src, 'default'))
  for name in (paths.COMMIT_FILE, 'default/_METADATA', 'default/d/abc'):
    paths.makedirs(paths.dirname(paths.join(src, name)))
    paths.write_atomic(paths.join(src, name), name)
  paths.move_tree(src, dst)
  assert paths.listdir(root) == ['4.corrupt']
  assert paths.read_text(paths.join(dst, 'default/d/abc')) == 'default/d/abc'
  assert paths.exists(paths.join(dst, paths.COMMIT_FILE))


def test_rename_is_refused_on_gcs(gs_bucket):
  with pytest.raises(paths.StorageError, match='cannot be renamed'):
    paths.rename(gs_bucket + '/a', gs_bucket + '/b')


def test_makedirs_never_creates_a_bucket(gcs):
  paths.makedirs('gs://no-such-bucket-mkdir/run/checkpoints')
  assert 'no-such-bucket-mkdir' not in gcs.buckets()


def test_check_writable(gcs, gs_bucket, tmp_path):
  storage_checks.check_writable(gs_bucket + '/run')
  assert paths.listdir(gs_bucket) == []  # the probe is removed
  storage_checks.check_writable(str(tmp_path / 'new' / 'run'))
  assert os.listdir(tmp_path / 'new' / 'run') == []
  with pytest.raises(paths.StorageError,
                     match=r'^bucket gs://no-such-bucket-x does not exist .*gcloud storage '
                           r'buckets create gs://no-such-bucket-x'):
    storage_checks.check_writable('gs://no-such-bucket-x/run')
  assert 'no-such-bucket-x' not in gcs.buckets()
  with pytest.raises(paths.PathSyntaxError, match=r's3:// paths are not supported'):
    storage_checks.check_writable('s3://bucket/run')


# Each malformed form, and what the message must name.
MALFORMED = {
    'gs:/bucket/run': 'a malformed gs:// URL',
    'gs:bucket/run': 'a malformed gs:// URL',
    'GS://bucket/run': 'a malformed gs:// URL',
    'Gs://bucket': 'a malformed gs:// URL',
    'gs:': 'a malformed gs:// URL',
    'gs://': 'has no bucket name',
    'gs:///run': 'has no bucket name',
    'gs://My_Bucket/run': "'My_Bucket' is not a valid bucket name",
    'gs://ab/run': "'ab' is not a valid bucket name",
    's3://bucket/run': 's3:// paths are not supported',
    'gcs://bucket/run': 'gcs:// is another name of gs://: write gs://',
    'http://host/x': 'http:// paths are not supported',
    'file:///tmp/x': 'file:// paths are not supported',
}


@pytest.mark.parametrize('path', sorted(MALFORMED))
def test_check_user_path_refuses_malformed_urls(path):
  with pytest.raises(paths.PathSyntaxError) as e:
    paths.check_user_path(path, '--workdir')
  message = str(e.value)
  assert message.startswith(f'--workdir={path}: ') and MALFORMED[path] in message
  assert message.endswith('expected gs://BUCKET/path for a Cloud Storage bucket, or a local '
                          'path') and '\n' not in message
  assert e.value.exit_status == 2  # a bad command line


@pytest.mark.parametrize('path', ['gs://bucket', 'gs://bucket/', 'gs://my-bucket_1.x/a/b',
                                  'runs/demo', '/tmp/gs/x', 'gsx/run', 'a:b', './gs:x',
                                  None, ''])
def test_check_user_path_passes_good_paths(path):
  assert paths.check_user_path(path, '--workdir') == path


def test_find_lists_every_file_once(root):
  assert paths.find(root) == []
  for name in ('a.jpg', 'cls/b.png', 'cls/deep/c.jpg', '.hidden/d.jpg'):
    paths.makedirs(paths.dirname(paths.join(root, name)))
    paths.write_atomic(paths.join(root, name), b'x')
  assert paths.find(root) == ['.hidden/d.jpg', 'a.jpg', 'cls/b.png', 'cls/deep/c.jpg']


def _proxy_on_port_with(digits: str, upstream: str, refuse):
  """A RefusingProxy on the first free port whose number contains `digits`."""
  for port in range(int(digits) * 100, int(digits) * 100 + 100):
    try:
      return gcs_server.RefusingProxy(upstream, refuse, port=port)
    except OSError:  # in use
      continue
  pytest.skip(f'no free port {digits}xx on 127.0.0.1')


@pytest.mark.parametrize('status, other, says', [
    (403, '401', r'permission denied .*Storage Object User role'),
    (401, '403', r'the credentials were refused .*gcloud auth application-default login'),
])
def test_check_writable_says_when_writes_or_credentials_are_refused(gcs, gs_bucket, monkeypatch,
                                                                   status, other, says):
  """Told apart by the status, not the URL: the proxy's port holds the other status's digits."""
  gcs_server.fast_gcsfs_retries(monkeypatch)  # gcsfs retries a 401 before it gives up
  proxy = _proxy_on_port_with(
      other, gcs.url, lambda method, path: gcs_server.refuse_uploads(method, path) and status)
  try:
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
    monkeypatch.setattr(paths, '_FS', None)
    with pytest.raises(paths.StorageError, match=rf'/run is not writable: {says}'):
      storage_checks.check_writable(gs_bucket + '/run')
  finally:
    proxy.close()


def test_no_credentials_names_the_login_command(monkeypatch):
  """Without an emulator and without credentials: stop before any request."""
  monkeypatch.delenv('STORAGE_EMULATOR_HOST')
  monkeypatch.setattr(paths, '_FS', None)
  monkeypatch.setattr(paths, 'gcs', lambda: pytest.fail('a request was attempted'))
  with pytest.raises(paths.StorageError,
                     match=r'no Google Cloud credentials found: run `gcloud auth '
                           r'application-default login`'):
    storage_checks.check_writable('gs://some-bucket/run')
