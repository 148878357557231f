"""Checks a config before anything is compiled; every error names field, value and rule.

`validate` is the first thing `mcl_jax.training.loop.train_and_evaluate`
does, with the real device and process counts, and the only place a run's
config is checked: an impossible setting fails at once with
`config.<field>=<value>: <rule>` instead of minutes into compilation or deep
inside XLA.
"""

import math
import numbers
from typing import Any

from mcl_jax import errors


# The keys of model.REMAT (kept here so that validation imports no JAX).
REMAT_SETTINGS = ('none', 'blocks', 'blocks+neck', 'stages+neck')


class ConfigError(errors.UsageError, ValueError):
  """An impossible configuration."""


def _require(ok: bool, field: str, value: Any, rule: str):
  if not ok:
    raise ConfigError(f'config.{field}={value!r}: {rule}')


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def validate(config, num_devices: int = 1, num_processes: int = 1):
  """Raises ConfigError on the first impossible setting."""
  optim, model, montage = config.optim, config.model, config.montage
  data, loss = config.data, config.loss
  for field, value in (('optim.global_batch', optim.global_batch),
                       ('montage.group_size', montage.group_size),
                       ('data.image_size', data.image_size), ('data.num_crops', data.num_crops)):
    _require(_is_int(value), field, value, 'must be an integer')
  for field, value in (('optim.base_lr', optim.base_lr), ('optim.momentum', optim.momentum),
                       ('optim.ema_base_momentum', optim.ema_base_momentum),
                       ('optim.weight_decay', optim.weight_decay), ('loss.tau', loss.tau)):
    _require(_is_real(value), field, value, 'must be a finite number')
  _require(config.objective in ('self_supervised', 'supervised'), 'objective',
           config.objective, "must be 'self_supervised' or 'supervised'")
  _require(optim.global_batch > 0 and optim.global_batch % num_devices == 0, 'optim.global_batch',
           optim.global_batch, f'must be a positive multiple of the device count ({num_devices})')
  _require(optim.global_batch % num_processes == 0, 'optim.global_batch', optim.global_batch,
           f'must be divisible by the process count ({num_processes})')
  per_device = optim.global_batch // num_devices
  _require(montage.group_size > 0 and per_device % montage.group_size == 0, 'montage.group_size',
           montage.group_size, f'must divide the per-device batch ({per_device} = '
           f'global_batch {optim.global_batch} / {num_devices} devices): each device '
           'assembles whole montage groups')
  levels = len(loss.level_weights)
  _require(1 <= levels <= 4, 'loss.level_weights', tuple(loss.level_weights),
           'needs 1 to 4 levels (FPN P5..P2)')
  _require(all(_is_real(w) and w >= 0 for w in loss.level_weights) and sum(loss.level_weights) > 0,
           'loss.level_weights', tuple(loss.level_weights),
           'weights must be finite, >= 0 and not all 0')
  _require(len(montage.grids) >= levels, 'montage.grids', tuple(montage.grids),
           f'needs one grid per level ({levels} level weights)')
  _require(tuple(montage.grids[:levels]) == tuple(2**i for i in range(levels)), 'montage.grids',
           tuple(montage.grids), 'level i must use a 2**i grid so that its tiles map to P(5-i)')
  if montage.layout == 'grid':
    _require(len(montage.canvas_divisors) >= levels, 'montage.canvas_divisors',
             tuple(montage.canvas_divisors),
             f'needs one divisor per level ({levels} level weights)')
    for i in range(1, levels):
      div = montage.canvas_divisors[i]
      _require(_is_int(div) and div > 0, f'montage.canvas_divisors[{i}]', div,
               'must be a positive integer')
      _require(montage.group_size % div == 0 and montage.group_size // div >= 1,
               f'montage.canvas_divisors[{i}]', div,
               f'group_size {montage.group_size} must be a multiple of it so that level {i} '
               'gets at least one canvas')
  elif montage.layout == 'mixed':
    _require(levels == 4, 'montage.layout', montage.layout, 'the mixed layout needs 4 levels')
    _require(_is_int(montage.mixed_canvases_divisor) and montage.mixed_canvases_divisor > 0
             and montage.group_size % montage.mixed_canvases_divisor == 0,
             'montage.mixed_canvases_divisor', montage.mixed_canvases_divisor,
             f'must be a positive divisor of group_size {montage.group_size} (at least one '
             'mixed canvas per group)')
    _require(model.region_path == 'roi_align' and model.neck_regions == 'used', 'montage.layout',
             montage.layout, "mixed canvases need model.region_path='roi_align' and "
             "model.neck_regions='used'")
  else:
    _require(False, 'montage.layout', montage.layout, "must be 'grid' or 'mixed'")
  _require(montage.downsample in ('nearest', 'antialias'), 'montage.downsample', montage.downsample,
           "must be 'nearest' or 'antialias'")
  _require(data.image_size >= 32 and data.image_size % 32 == 0, 'data.image_size', data.image_size,
           'must be a positive multiple of 32: P5 has stride 32 and an 8x8 grid '
           'tile must span whole P2 pixels')
  _require(data.num_crops >= 2 * levels and data.num_crops % 2 == 0, 'data.num_crops',
           data.num_crops, f'needs an even count >= 2 x {levels} levels (one crop per '
           'level and view)')
  _require(data.crop_on in ('host', 'device'), 'data.crop_on', data.crop_on,
           "must be 'host' or 'device'")
  _require(_is_int(data.max_side) and data.max_side >= data.image_size, 'data.max_side',
           data.max_side,
           f'must be an integer >= data.image_size ({data.image_size}): the device cuts '
           'crops from a buffer of this side, and a smaller one would upsample every crop')
  _require(model.region_path in ('reshape', 'roi_align'), 'model.region_path', model.region_path,
           "must be 'reshape' or 'roi_align'")
  _require(model.neck_regions in ('all', 'used'), 'model.neck_regions', model.neck_regions,
           "must be 'all' or 'used'")
  if model.region_path == 'reshape' and model.region_size is not None:
    _require(model.region_size == data.image_size // 32, 'model.region_size', model.region_size,
             f"the reshape path cuts image_size/32 = {data.image_size // 32} pixel regions; "
             "use region_path='roi_align' for another size")
  _require(model.block in (None, 'basic', 'bottleneck'), 'model.block', model.block,
           "must be 'basic', 'bottleneck' or None (from model.depth)")
  _require(model.stage_sizes is None or (len(model.stage_sizes) == 4 and all(
      _is_int(n) and n >= 1 for n in model.stage_sizes)), 'model.stage_sizes', model.stage_sizes,
           'must be 4 positive block counts, or None (from model.depth)')
  _require(model.dtype in ('float32', 'bfloat16', 'float16'), 'model.dtype', model.dtype,
           "must be 'float32', 'bfloat16' or 'float16'")
  _require(model.remat in REMAT_SETTINGS, 'model.remat', model.remat,
           f'must be one of {REMAT_SETTINGS} (model.REMAT)')
  _require(optim.accumulate in ('none', 'views'), 'optim.accumulate', optim.accumulate,
           "must be 'none' or 'views'")
  _require(optim.accumulate == 'none' or config.objective == 'self_supervised',
           'optim.accumulate', optim.accumulate, "'views' is implemented for the "
           "self-supervised objective only")
  _require(optim.base_lr > 0, 'optim.base_lr', optim.base_lr, 'must be > 0')
  _require(0 <= optim.momentum < 1, 'optim.momentum', optim.momentum, 'must be in [0, 1)')
  _require(0 <= optim.ema_base_momentum < 1, 'optim.ema_base_momentum', optim.ema_base_momentum,
           'must be in [0, 1)')
  _require(optim.weight_decay >= 0, 'optim.weight_decay', optim.weight_decay, 'must be >= 0')
  _require(optim.warmup_steps >= 0, 'optim.warmup_steps', optim.warmup_steps, 'must be >= 0')
  _require(optim.lr_warmup in ('reference', 'optax'), 'optim.lr_warmup', optim.lr_warmup,
           "must be 'reference' or 'optax'")
  _require(optim.lars_trust_ratio in ('reference', 'optax'), 'optim.lars_trust_ratio',
           optim.lars_trust_ratio, "must be 'reference' or 'optax'")
  _require(optim.num_steps is None or optim.num_steps > 0, 'optim.num_steps', optim.num_steps,
           'must be > 0 (or None to use num_epochs)')
  _require(optim.num_steps is not None or optim.num_epochs > 0, 'optim.num_epochs',
           optim.num_epochs, 'must be > 0')
  _require(loss.tau > 0, 'loss.tau', loss.tau, 'must be > 0')
  _require(config.keep_checkpoints >= 1, 'keep_checkpoints', config.keep_checkpoints,
           'must be >= 1: a run always keeps its last good checkpoint')
  _require(config.checkpoint_every >= 1, 'checkpoint_every', config.checkpoint_every,
           'must be >= 1')
  _require(config.log_every >= 1, 'log_every', config.log_every, 'must be >= 1')
  _require(not config.eval_dense_at_end or data.source == 'digits', 'eval_dense_at_end',
           config.eval_dense_at_end, "the end-of-run dense probe uses digit scenes: needs "
           "data.source='digits' (probe other runs with python -m mcl_jax.dense_eval)")
