"""What the backward pass keeps: the loss's saved residuals, by dtype and model part.

`saved_residuals` is `jax.ad_checkpoint.saved_residuals` with each residual
attributed to the part of the model that produced it (from the Flax module
name stack: backbone, fpn, neck, predictors) or, outside the network, to the
file that produced it (montage assembly and region cutting, the loss).
"""

import collections
import dataclasses
from typing import Callable

import jax
import jax.extend
import numpy as np
from jax._src import source_info_util

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
  for p in PARTS:
    if f'/{p}' in f'/{scope}':
      return p
  where = source_info_util.summarize(eqn.source_info, num_frames=12)
  for line in reversed(where.splitlines()):  # innermost frame first
    for fname, part in FILE_PARTS:
      if fname in line:
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
  wanted = {v for v in jaxpr.outvars if isinstance(v, jax.extend.core.Var)}
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
