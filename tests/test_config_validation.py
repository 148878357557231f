"""mcl_jax.config_validation: every impossible setting names its field, value and rule.

That `train_and_evaluate` validates before anything else is
tests/test_reliability.py's (it needs the run).
"""

import pytest

from configs import test_tiny
from mcl_jax import config_validation
from tests.tiny_config import tiny_config


@pytest.mark.parametrize('overrides, devices, field', [
    ({'optim.global_batch': 12}, 8, 'optim.global_batch'),           # not a multiple of 8 devices
    ({'optim.global_batch': 0}, 1, 'optim.global_batch'),
    ({'optim.global_batch': 32}, 8, 'montage.group_size'),           # 4 per device < group of 8
    ({'montage.canvas_divisors': (1, 4, 16, 8)}, 1, r'montage.canvas_divisors\[2\]'),  # 8/16 = 0 canvases
    ({'montage.canvas_divisors': (1, 0, 8, 8)}, 1, r'montage.canvas_divisors\[1\]'),
    ({'montage.canvas_divisors': (1, 4)}, 1, 'montage.canvas_divisors'),
    ({'data.image_size': 48}, 1, 'data.image_size'),                 # P5 stride 32 / 8x8 tiles
    ({'data.image_size': 16}, 1, 'data.image_size'),
    ({'loss.level_weights': (0.5, 0.25, 0.125, 0.1, 0.025)}, 1, 'loss.level_weights'),
    ({'loss.level_weights': ()}, 1, 'loss.level_weights'),
    ({'loss.level_weights': (0.5, -0.5)}, 1, 'loss.level_weights'),
    ({'montage.grids': (1, 2, 4)}, 1, 'montage.grids'),              # 4 weights, 3 grids
    ({'data.num_crops': 6}, 1, 'data.num_crops'),                    # 4 levels need 8 crops
    ({'optim.base_lr': 0.0}, 1, 'optim.base_lr'),
    ({'optim.base_lr': -1.0}, 1, 'optim.base_lr'),
    ({'optim.base_lr': float('nan')}, 1, 'optim.base_lr'),
    ({'optim.momentum': 1.0}, 1, 'optim.momentum'),
    ({'optim.momentum': -0.1}, 1, 'optim.momentum'),
    ({'keep_checkpoints': 0}, 1, 'keep_checkpoints'),
    ({'checkpoint_every': 0}, 1, 'checkpoint_every'),
])
def test_config_validation_names_field_value_and_rule(overrides, devices, field):
  config = tiny_config(**overrides)
  with pytest.raises(config_validation.ConfigError, match=field) as e:
    config_validation.validate(config, devices)
  msg = str(e.value)
  value = next(iter(overrides.values()))
  assert msg.startswith('config.') and ': ' in msg, msg
  if not isinstance(value, tuple):
    assert repr(value) in msg or str(value) in msg, msg


def test_reference_configs_are_valid():
  from configs import demo, mcl_100ep
  config_validation.validate(mcl_100ep.get_config(), 32, 4)
  config_validation.validate(demo.get_config(), 2)
  config_validation.validate(test_tiny.get_config(), 2, 2)
  config_validation.validate(tiny_config(**{'optim.global_batch': 24}), 3)  # 8 per device
