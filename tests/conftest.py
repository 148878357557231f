"""Test setup, before jax is imported anywhere: 8 simulated CPU devices, LLVM
optimisation off; xdist groups.

XLA_FLAGS from the environment are kept (scripts/float_paths.py sets some);
each of these two is added only where the environment does not set it:

* --xla_force_host_platform_device_count=8: the sharded tests' 8 devices.
* --xla_backend_optimization_level=0: LLVM's optimisation of the compiled
  kernels. The suite is bound by compile time (most programs run a step or
  two), which this cuts by about a third; the HLO, and so the arithmetic,
  is the same (tests/subprocess_runs.py's main.py runs always used it).

Under pytest-xdist (`-n 2 --dist loadgroup`, the README's test command),
every test runs on the worker of its file (module fixtures, compiled once
per file), and the files that start main.py and share its reference run
(tests/subprocess_runs.py) run on one worker together.
"""

import os

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

# Files whose tests start main.py and share tests/subprocess_runs.reference().
MAIN_PY_FILES = ('test_cli.py', 'test_device_crops.py', 'test_distributed.py',
                 'test_imagenet_tfds.py', 'test_reliability.py')


def pytest_configure(config):
  # pytest-xdist registers it too; this keeps a run without xdist warning-free.
  config.addinivalue_line('markers', 'xdist_group(name): run on one xdist worker together')


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.get_closest_marker('xdist_group'):
      continue
    name = os.path.basename(str(item.fspath))
    item.add_marker(pytest.mark.xdist_group('main_py' if name in MAIN_PY_FILES else name))
