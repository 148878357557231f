"""mcl_jax.errors and `cli.error_report`: a user-facing error's exit status comes from its type."""

import argparse
import importlib
import inspect
import pkgutil

import pytest

import mcl_jax
from mcl_jax import cli, errors

# The command modules define absl flags on import and no error classes;
# mcl_jax.testing is the tests' oracle (PyTorch).
_SKIPPED = ('mcl_jax.evaluate', 'mcl_jax.dense_eval', 'mcl_jax.export', 'mcl_jax.visualize',
            'mcl_jax.testing')


def _project_error_classes():
  found = {}
  for info in pkgutil.walk_packages(mcl_jax.__path__, 'mcl_jax.'):
    if info.name.startswith(_SKIPPED):
      continue
    module = importlib.import_module(info.name)
    for name, obj in vars(module).items():
      if (inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == info.name):
        found[f'{info.name}.{name}'] = obj
  return found


def test_every_project_error_has_a_user_facing_base():
  classes = _project_error_classes()
  # The ones the commands raise, at least (a rename here must be deliberate).
  for name in ('mcl_jax.config_validation.ConfigError', 'mcl_jax.paths.StorageError',
               'mcl_jax.training.checkpointing.CheckpointError',
               'mcl_jax.training.loop.NonFiniteError', 'mcl_jax.data.spec.DatasetNotFoundError',
               'mcl_jax.eval.exporters.ExportError', 'mcl_jax.eval.dense_probe.DenseEvalError',
               'mcl_jax.cli.MissingDependencyError', 'mcl_jax.training.memory.DoesNotFitError'):
    assert name in classes, sorted(classes)
  orphans = [n for n, c in classes.items()
             if c not in (errors.UsageError, errors.RunError)
             and not issubclass(c, (errors.UsageError, errors.RunError))]
  assert not orphans, f'errors without a UsageError / RunError base: {orphans}'


def test_the_status_comes_from_the_type_not_the_name():
  class NewRunProblem(errors.RunError):
    pass

  class NewFlagProblem(errors.UsageError):
    pass

  class ConfigError(Exception):  # the name of a usage error, but no such base
    pass

  assert cli.error_report(NewRunProblem('missing data; add it')) == ('missing data; add it', 1)
  assert cli.error_report(NewFlagProblem('--x: bad\n  value')) == ('--x: bad value', 2)
  assert cli.error_report(argparse.ArgumentError(None, 'bad flag')) == ('bad flag', 2)
  line, status = cli.error_report(ConfigError('boom'))
  assert status == 1 and line.startswith('ConfigError: boom (unexpected')
  assert cli.error_report(KeyboardInterrupt())[1] == cli.EXIT_INTERRUPTED
  assert cli.UsageError is errors.UsageError


@pytest.mark.parametrize('base, other, status', [
    (errors.RunError, RuntimeError, 1), (errors.UsageError, ValueError, 2)])
def test_existing_except_clauses_still_catch(base, other, status):
  """Each error keeps its former base too: `except ValueError` code is unchanged."""
  cls = type('Mixed', (base, other), {})
  with pytest.raises(other):
    raise cls('x')
  assert cli.error_report(cls('x'))[1] == status
