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


# The keys of model.REMAT (kept here so that validation imports no JAX).
REMAT_SETTINGS = ('none', 'blocks', 'blocks+neck', 'stages+neck')


class ConfigError(ValueError):
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
  o, m, mo, d, l = config.optim, config.model, config.montage, config.data, config.loss
  for field, value in (('optim.global_batch', o.global_batch),
                       ('montage.group_size', mo.group_size),
                       ('data.image_size', d.image_size), ('data.num_crops', d.num_crops)):
    _require(_is_int(value), field, value, 'must be an integer')
  for field, value in (('optim.base_lr', o.base_lr), ('optim.momentum', o.momentum),
                       ('optim.ema_base_momentum', o.ema_base_momentum),
                       ('optim.weight_decay', o.weight_decay), ('loss.tau', l.tau)):
    _require(_is_real(value), field, value, 'must be a finite number')
  _require(config.objective in ('self_supervised', 'supervised'), 'objective',
           config.objective, "must be 'self_supervised' or 'supervised'")
  _require(o.global_batch > 0 and o.global_batch % num_devices == 0, 'optim.global_batch',
           o.global_batch, f'must be a positive multiple of the device count ({num_devices})')
  _require(o.global_batch % num_processes == 0, 'optim.global_batch', o.global_batch,
           f'must be divisible by the process count ({num_processes})')
  per_device = o.global_batch // num_devices
  _require(mo.group_size > 0 and per_device % mo.group_size == 0, 'montage.group_size',
           mo.group_size, f'must divide the per-device batch ({per_device} = '
           f'global_batch {o.global_batch} / {num_devices} devices): each device '
           'assembles whole montage groups')
  levels = len(l.level_weights)
  _require(1 <= levels <= 4, 'loss.level_weights', tuple(l.level_weights),
           'needs 1 to 4 levels (FPN P5..P2)')
  _require(all(_is_real(w) and w >= 0 for w in l.level_weights) and sum(l.level_weights) > 0,
           'loss.level_weights', tuple(l.level_weights),
           'weights must be finite, >= 0 and not all 0')
  _require(len(mo.grids) >= levels, 'montage.grids', tuple(mo.grids),
           f'needs one grid per level ({levels} level weights)')
  _require(tuple(mo.grids[:levels]) == tuple(2**i for i in range(levels)), 'montage.grids',
           tuple(mo.grids), 'level i must use a 2**i grid so that its tiles map to P(5-i)')
  if mo.layout == 'grid':
    _require(len(mo.canvas_divisors) >= levels, 'montage.canvas_divisors',
             tuple(mo.canvas_divisors), f'needs one divisor per level ({levels} level weights)')
    for i in range(1, levels):
      div = mo.canvas_divisors[i]
      _require(_is_int(div) and div > 0, f'montage.canvas_divisors[{i}]', div,
               'must be a positive integer')
      _require(mo.group_size % div == 0 and mo.group_size // div >= 1,
               f'montage.canvas_divisors[{i}]', div,
               f'group_size {mo.group_size} must be a multiple of it so that level {i} '
               'gets at least one canvas')
  elif mo.layout == 'mixed':
    _require(levels == 4, 'montage.layout', mo.layout, 'the mixed layout needs 4 levels')
    _require(_is_int(mo.mixed_canvases_divisor) and mo.mixed_canvases_divisor > 0
             and mo.group_size % mo.mixed_canvases_divisor == 0,
             'montage.mixed_canvases_divisor', mo.mixed_canvases_divisor,
             f'must be a positive divisor of group_size {mo.group_size} (at least one '
             'mixed canvas per group)')
    _require(m.region_path == 'roi_align' and m.neck_regions == 'used', 'montage.layout',
             mo.layout, "mixed canvases need model.region_path='roi_align' and "
             "model.neck_regions='used'")
  else:
    _require(False, 'montage.layout', mo.layout, "must be 'grid' or 'mixed'")
  _require(mo.downsample in ('nearest', 'antialias'), 'montage.downsample', mo.downsample,
           "must be 'nearest' or 'antialias'")
  _require(d.image_size >= 32 and d.image_size % 32 == 0, 'data.image_size', d.image_size,
           'must be a positive multiple of 32: P5 has stride 32 and an 8x8 grid '
           'tile must span whole P2 pixels')
  _require(d.num_crops >= 2 * levels and d.num_crops % 2 == 0, 'data.num_crops',
           d.num_crops, f'needs an even count >= 2 x {levels} levels (one crop per '
           'level and view)')
  _require(d.crop_on in ('host', 'device'), 'data.crop_on', d.crop_on,
           "must be 'host' or 'device'")
  _require(_is_int(d.max_side) and d.max_side >= d.image_size, 'data.max_side', d.max_side,
           f'must be an integer >= data.image_size ({d.image_size}): the device cuts '
           'crops from a buffer of this side, and a smaller one would upsample every crop')
  _require(m.region_path in ('reshape', 'roi_align'), 'model.region_path', m.region_path,
           "must be 'reshape' or 'roi_align'")
  _require(m.neck_regions in ('all', 'used'), 'model.neck_regions', m.neck_regions,
           "must be 'all' or 'used'")
  if m.region_path == 'reshape' and m.region_size is not None:
    _require(m.region_size == d.image_size // 32, 'model.region_size', m.region_size,
             f"the reshape path cuts image_size/32 = {d.image_size // 32} pixel regions; "
             "use region_path='roi_align' for another size")
  _require(m.block in (None, 'basic', 'bottleneck'), 'model.block', m.block,
           "must be 'basic', 'bottleneck' or None (from model.depth)")
  _require(m.stage_sizes is None or (len(m.stage_sizes) == 4 and all(
      _is_int(n) and n >= 1 for n in m.stage_sizes)), 'model.stage_sizes', m.stage_sizes,
           'must be 4 positive block counts, or None (from model.depth)')
  _require(m.dtype in ('float32', 'bfloat16', 'float16'), 'model.dtype', m.dtype,
           "must be 'float32', 'bfloat16' or 'float16'")
  _require(m.remat in REMAT_SETTINGS, 'model.remat', m.remat,
           f'must be one of {REMAT_SETTINGS} (model.REMAT)')
  _require(o.accumulate in ('none', 'views'), 'optim.accumulate', o.accumulate,
           "must be 'none' or 'views'")
  _require(o.accumulate == 'none' or config.objective == 'self_supervised',
           'optim.accumulate', o.accumulate, "'views' is implemented for the "
           "self-supervised objective only")
  _require(o.base_lr > 0, 'optim.base_lr', o.base_lr, 'must be > 0')
  _require(0 <= o.momentum < 1, 'optim.momentum', o.momentum, 'must be in [0, 1)')
  _require(0 <= o.ema_base_momentum < 1, 'optim.ema_base_momentum', o.ema_base_momentum,
           'must be in [0, 1)')
  _require(o.weight_decay >= 0, 'optim.weight_decay', o.weight_decay, 'must be >= 0')
  _require(o.warmup_steps >= 0, 'optim.warmup_steps', o.warmup_steps, 'must be >= 0')
  _require(o.lr_warmup in ('reference', 'optax'), 'optim.lr_warmup', o.lr_warmup,
           "must be 'reference' or 'optax'")
  _require(o.lars_trust_ratio in ('reference', 'optax'), 'optim.lars_trust_ratio',
           o.lars_trust_ratio, "must be 'reference' or 'optax'")
  _require(o.num_steps is None or o.num_steps > 0, 'optim.num_steps', o.num_steps,
           'must be > 0 (or None to use num_epochs)')
  _require(o.num_steps is not None or o.num_epochs > 0, 'optim.num_epochs', o.num_epochs,
           'must be > 0')
  _require(l.tau > 0, 'loss.tau', l.tau, 'must be > 0')
  _require(config.keep_checkpoints >= 1, 'keep_checkpoints', config.keep_checkpoints,
           'must be >= 1: a run always keeps its last good checkpoint')
  _require(config.checkpoint_every >= 1, 'checkpoint_every', config.checkpoint_every,
           'must be >= 1')
  _require(config.log_every >= 1, 'log_every', config.log_every, 'must be >= 1')
  _require(not config.eval_dense_at_end or d.source == 'digits', 'eval_dense_at_end',
           config.eval_dense_at_end, "the end-of-run dense probe uses digit scenes: needs "
           "data.source='digits' (probe other runs with python -m mcl_jax.dense_eval)")
