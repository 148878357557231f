"""What the backward pass keeps: the loss's saved residuals, by dtype and model part.

`saved_residuals` is `jax.ad_checkpoint.saved_residuals` with each residual
attributed to the part of the model that produced it (from the Flax module
name stack: backbone, fpn, neck, predictors) or, outside the network, to the
file that produced it (montage assembly and region cutting, the loss).
"""

import collections
import dataclasses
import re
from typing import Callable

from absl import logging
import jax
import jax.extend
import numpy as np

from mcl_jax import config_validation

# Module scopes of MCLNet's submodules, in the order they run.
PARTS = ('backbone', 'fpn', 'neck', 'predictors')
# Files of everything outside the network (checked innermost frame first).
FILE_PARTS = (('montage.py', 'montage'), ('roi_align.py', 'montage'), ('model.py', 'montage'),
              ('losses.py', 'loss'))


@dataclasses.dataclass(frozen=True)
class Residual:
  """One tensor the backward pass keeps."""
  shape: tuple[int, ...]
  dtype: str
  nbytes: int
  part: str  # one of PARTS, 'montage', 'loss', 'argument' or 'other'
  producer: str  # primitive that made it, or 'argument'
  scope: str  # Flax module name stack ('' outside the network)


def _part(eqn) -> str:
  scope = str(eqn.source_info.name_stack)
  for p in PARTS:  # 'backbone/...', or 'jvp(fpn)' inside a lifted transform
    if re.search(rf'(^|[/(]){p}(_\d+)?([/)]|$)', scope):
      return p
  tb = eqn.source_info.traceback
  for frame in (tb.frames if tb is not None else ()):  # innermost frame first
    for fname, part in FILE_PARTS:
      if frame.file_name.endswith('/' + fname):
        return part
  return 'other'


def saved_residuals(fn: Callable, params, *rest) -> list[Residual]:
  """The residuals of `fn`'s VJP with respect to `params` (largest first).

  Args:
    fn: fn(params, *rest) -> scalar or pytree.
    params: the pytree differentiated against.
    *rest: the other arguments (not differentiated).
    Arrays or ShapeDtypeStructs: only traced, nothing is computed.
  """
  closed = jax.make_jaxpr(lambda p, *r: jax.vjp(lambda q: fn(q, *r), p)[1])(params, *rest)
  jaxpr = closed.jaxpr
  # As jax.ad_checkpoint.saved_residuals: look through reduce_precision
  # (jax.checkpoint's marker of a saved value) to the value's producer.
  through = {e.outvars[0]: e.invars[0] for e in jaxpr.eqns
             if e.primitive.name == 'reduce_precision'}
  wanted = {through.get(v, v) for v in jaxpr.outvars if isinstance(v, jax.extend.core.Var)}
  made_by = {v: e for e in jaxpr.eqns for v in e.outvars if v in wanted}
  out = []
  for v in wanted:  # each buffer once, however many times the VJP reads it
    aval = v.aval
    nbytes = int(np.prod(aval.shape, dtype=np.int64)) * aval.dtype.itemsize
    eqn = made_by.get(v)
    if eqn is None:
      out.append(Residual(tuple(aval.shape), str(aval.dtype), nbytes, 'argument', 'argument', ''))
    else:
      out.append(Residual(tuple(aval.shape), str(aval.dtype), nbytes, _part(eqn),
                          eqn.primitive.name, str(eqn.source_info.name_stack)))
  return sorted(out, key=lambda r: -r.nbytes)


def summarize(residuals: list[Residual]) -> dict:
  """Total bytes by dtype, by part, and by (part, dtype)."""
  by_dtype, by_part, by_both = (collections.Counter() for _ in range(3))
  for r in residuals:
    by_dtype[r.dtype] += r.nbytes
    by_part[r.part] += r.nbytes
    by_both[f'{r.part}/{r.dtype}'] += r.nbytes
  return {'total': sum(by_dtype.values()), 'by_dtype': dict(by_dtype),
          'by_part': dict(by_part), 'by_part_dtype': dict(by_both)}


# ---------------------------------------------------------------- preflight --

GIB = 2**30

# Compiled temp memory of the step with these settings, relative to
# model.remat='none', optim.accumulate='none', neck_regions='all' (ResNet-50,
# 224 px, per-device batch 128, bf16, CPU compile: docs/PERFORMANCE.md, "What
# fits where"). Only used to suggest settings: a suggestion is an estimate.
TEMP_FACTORS = (
    ({'model.remat': 'blocks', 'optim.accumulate': 'views'}, 0.283),
    ({'model.remat': 'blocks+neck'}, 0.477),
    ({'optim.accumulate': 'views'}, 0.511),
    ({'model.neck_regions': 'used'}, 0.838),
)


class DoesNotFitError(config_validation.ConfigError):
  """The compiled train step needs more memory than the device has."""


def device_bytes_limit(device) -> int | None:
  """The device's memory for buffers (`memory_stats()['bytes_limit']`), or None."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without statistics)
    return None
  return int(stats['bytes_limit']) if stats and stats.get('bytes_limit') else None


def compiled_bytes(compiled) -> dict:
  """Per-device bytes of a compiled step: arguments, outputs, aliased, temp, total."""
  ma = compiled.memory_analysis()
  out = {'arguments': ma.argument_size_in_bytes, 'outputs': ma.output_size_in_bytes,
         'aliased': ma.alias_size_in_bytes, 'temp': ma.temp_size_in_bytes}
  out['total'] = out['arguments'] + out['outputs'] - out['aliased'] + out['temp']
  return out


def _fitting_batch(per_device: int, group: int, need: dict, limit: int) -> int:
  """The largest smaller per-device batch whose estimate fits (temp ~ batch).

  Whole montage groups below the current batch, then (one group per device)
  halved groups.
  """
  fixed = need['total'] - need['temp']  # state and batch: the batch part is small
  candidates = list(range(per_device - group, 0, -group))
  b = min(group, per_device) // 2
  while b >= 1:
    candidates.append(b)
    b //= 2
  for b in candidates:
    if fixed + need['temp'] * b / per_device <= limit:
      return b
  return 0


def check_fits(compiled, config, num_devices: int, bytes_limit: int | None) -> dict:
  """Raises DoesNotFitError (one line) when the compiled step cannot fit the device.

  Args:
    compiled: the compiled train step.
    config: its config (for the settings to suggest).
    num_devices: devices of the mesh (the per-device batch).
    bytes_limit: the device's memory (`device_bytes_limit`); None skips the check.

  Returns:
    `compiled_bytes(compiled)`.
  """
  need = compiled_bytes(compiled)
  if bytes_limit is None or need['total'] <= bytes_limit:
    return need
  per_device = config.optim.global_batch // num_devices
  fits = []
  current = {'model.remat': config.model.remat, 'optim.accumulate': config.optim.accumulate,
             'model.neck_regions': config.model.neck_regions}
  defaults = current['model.remat'] == 'none' and current['optim.accumulate'] == 'none'
  for overrides, factor in TEMP_FACTORS:
    # The factors are relative to no remat and no accumulation.
    if any(current[k] == v for k, v in overrides.items()) or (
        not defaults and 'model.neck_regions' not in overrides):
      continue
    estimate = need['total'] - need['temp'] * (1 - factor)
    if estimate <= bytes_limit:
      settings = ', '.join(f"{k}='{v}'" for k, v in overrides.items())
      fits.append(f'{settings} (about {estimate / GIB:.1f} GiB)')
  group = config.montage.group_size
  batch = _fitting_batch(per_device, group, need, bytes_limit)
  if batch:
    regroup = f', montage.group_size={batch}' if batch < group else ''
    fits.append(f'per-device batch {batch} (optim.global_batch={batch * num_devices}{regroup}, '
                f'about {(need["total"] - need["temp"] * (1 - batch / per_device)) / GIB:.1f}'
                ' GiB)')
  hint = ('settings that would fit (estimates): ' + '; '.join(fits)) if fits else (
      'no single setting would fit: combine model.remat, optim.accumulate, '
      "model.neck_regions='used' and a smaller per-device batch")
  raise DoesNotFitError(
      f'the train step needs {need["total"] / GIB:.2f} GiB per device at per-device batch '
      f'{per_device} (arguments {need["arguments"] / GIB:.2f} + temporaries '
      f'{need["temp"] / GIB:.2f} GiB), the device has {bytes_limit / GIB:.2f} GiB: {hint}; '
      'see docs/PERFORMANCE.md, "What fits where"')


def check_step_fits(compiled, config, mesh):
  """The train loop's preflight: `check_fits` against the first local device's memory."""
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  limit = device_bytes_limit(device)
  need = check_fits(compiled, config, mesh.devices.size, limit)
  logging.info('Train step memory per device: %.2f GiB (arguments %.2f, temporaries %.2f)%s',
               need['total'] / GIB, need['arguments'] / GIB, need['temp'] / GIB,
               '' if limit is None else f' of {limit / GIB:.2f} GiB')
  return need
