"""mcl_jax.training.loop: the run opens its data source once, the final evaluation included.

The loop's fault tolerance (resume, signals, non-finite steps, workdirs) is
tests/test_reliability.py's; its step is tests/test_train.py's.
"""

import jax
import numpy as np
import pytest

from mcl_jax.data import input_pipeline
from mcl_jax.training import loop, optim
from mcl_jax.training import state as state_lib
from tests.tiny_config import tiny_config


def test_final_evaluation_reads_the_runs_source(monkeypatch):
  """`_final_eval` evaluates on the DataSource the run opened, never a second one."""
  config = tiny_config(**{'eval_knn_at_end': True})
  source = input_pipeline.open_source(config.data)
  read = []
  real_eval_arrays = input_pipeline.DataSource.eval_arrays

  def eval_arrays(self, split, max_examples=None):
    read.append((self is source, split))
    return real_eval_arrays(self, split, max_examples)

  monkeypatch.setattr(input_pipeline.DataSource, 'eval_arrays', eval_arrays)
  monkeypatch.setattr(input_pipeline, 'open_source',
                      lambda *a, **k: pytest.fail('the data source was opened again'))
  state = state_lib.create_train_state(config, jax.random.key(0),
                                       optim.create_optimizer(config, 6))
  out = loop._final_eval(config, state, source)  # pylint: disable=protected-access
  assert read == [(True, 'train'), (True, 'heldout')]
  for key in ('eval_knn_top1', 'eval_linear_top1', 'eval_random_knn_top1'):
    assert 0.0 <= out[key] <= 1.0
  assert out['eval_num_train'] == 1438 and out['eval_num_test'] == 359
  assert np.isfinite(out['eval_random_linear_top1'])
