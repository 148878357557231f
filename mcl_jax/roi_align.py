"""RoIAlign in pure JAX, following torchvision's `roi_align(..., aligned=True)`.

Vectorised over boxes (gathers, no Python loop over boxes) and differentiable
with respect to the features. Boxes are (x1, y1, x2, y2) in input-image
pixels; `spatial_scale` maps them onto the feature map.
"""

from typing import Sequence

import jax
import jax.numpy as jnp


def _sample_coords(start, size, bins: int, sampling_ratio: int):
  """Sample positions along one axis: [R, bins * sampling_ratio]."""
  bin_size = size / bins
  idx = jnp.arange(bins * sampling_ratio)
  b, s = idx // sampling_ratio, idx % sampling_ratio
  return start[:, None] + (b * bin_size[:, None]
                           + (s + 0.5) * bin_size[:, None] / sampling_ratio)


def _interp_weights(coord, length: int):
  """torchvision bilinear_interpolate along one axis.

  Returns low/high indices, their weights, and a validity mask (samples
  further than one pixel outside the map contribute zero).
  """
  valid = (coord >= -1.0) & (coord <= length)
  c = jnp.maximum(coord, 0.0)
  low = jnp.floor(c).astype(jnp.int32)
  at_edge = low >= length - 1
  low = jnp.where(at_edge, length - 1, low)
  high = jnp.where(at_edge, length - 1, low + 1)
  c = jnp.where(at_edge, low.astype(c.dtype), c)
  frac = c - low
  return low, high, 1.0 - frac, frac, valid


def roi_align(features, boxes, box_indices, output_size: int | Sequence[int] = 7,
              spatial_scale: float = 1.0, sampling_ratio: int = 1,
              aligned: bool = True):
  """RoIAlign of `boxes` on NHWC `features`.

  Args:
    features: [N, H, W, C].
    boxes: [R, 4] (x1, y1, x2, y2) in input-image pixels.
    box_indices: [R] int, the image of each box.
    output_size: int or (ph, pw).
    spatial_scale: feature-map pixels per input pixel (1 / stride).
    sampling_ratio: samples per bin along each axis; static and > 0
      (torchvision's adaptive 0 needs data-dependent shapes).
    aligned: subtract half a pixel (torchvision aligned=True).

  Returns:
    [R, ph, pw, C] in the features' dtype.
  """
  if sampling_ratio <= 0:
    raise ValueError(f'sampling_ratio={sampling_ratio}: must be a static int > 0')
  ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
  n, h, w, c = features.shape
  boxes = boxes.astype(jnp.float32)
  offset = 0.5 if aligned else 0.0
  x1 = boxes[:, 0] * spatial_scale - offset
  y1 = boxes[:, 1] * spatial_scale - offset
  rw = boxes[:, 2] * spatial_scale - offset - x1
  rh = boxes[:, 3] * spatial_scale - offset - y1
  if not aligned:  # torchvision forces at least 1x1 boxes in legacy mode
    rw, rh = jnp.maximum(rw, 1.0), jnp.maximum(rh, 1.0)
  ys = _sample_coords(y1, rh, ph, sampling_ratio)  # [R, ph*s]
  xs = _sample_coords(x1, rw, pw, sampling_ratio)  # [R, pw*s]
  y_lo, y_hi, wy_lo, wy_hi, y_ok = _interp_weights(ys, h)
  x_lo, x_hi, wx_lo, wx_hi, x_ok = _interp_weights(xs, w)

  flat = features.reshape(n * h * w, c)
  base = (box_indices.astype(jnp.int32) * h * w)[:, None, None]

  def gather(yi, xi):
    return flat[base + yi[:, :, None] * w + xi[:, None, :]]  # [R, P, Q, C]

  wy_lo, wy_hi = wy_lo[:, :, None, None], wy_hi[:, :, None, None]
  wx_lo, wx_hi = wx_lo[:, None, :, None], wx_hi[:, None, :, None]
  out = (gather(y_lo, x_lo) * (wy_lo * wx_lo) + gather(y_lo, x_hi) * (wy_lo * wx_hi)
         + gather(y_hi, x_lo) * (wy_hi * wx_lo) + gather(y_hi, x_hi) * (wy_hi * wx_hi))
  ok = (y_ok[:, :, None] & x_ok[:, None, :])[..., None]
  out = jnp.where(ok, out, 0.0)
  r = boxes.shape[0]
  out = out.reshape(r, ph, sampling_ratio, pw, sampling_ratio, c).mean(axis=(2, 4))
  return out.astype(features.dtype)


def fpn_levels(boxes, canonical_scale: float = 224.0, canonical_level: int = 4,
               min_level: int = 2, max_level: int = 5):
  """The FPN rule: level = floor(canonical_level + log2(sqrt(area) / scale)).

  Clamped to [min_level, max_level] (FPN paper eq. 1; detectron2's
  `assign_boxes_to_levels`).
  """
  size = jnp.sqrt(jnp.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-8))
  level = jnp.floor(canonical_level + jnp.log2(size / canonical_scale + 1e-8))
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(features: dict[str, jax.Array], boxes, box_indices,
                         levels=None, output_size: int = 7, sampling_ratio: int = 1,
                         canonical_scale: float = 224.0, canonical_level: int = 4):
  """RoIAlign over an FPN: each box reads the level given, or the FPN rule's.

  Args:
    features: {'P2': [N, H/4, W/4, C], ..., 'P5': [N, H/32, W/32, C]}.
    boxes, box_indices: as in `roi_align`.
    levels: [R] int FPN level per box (2..5); None assigns by `fpn_levels`.
    output_size, sampling_ratio: as in `roi_align`.
    canonical_scale, canonical_level: the FPN rule's constants.

  Returns:
    [R, output_size, output_size, C].

  Every level is evaluated for every box and the right one is selected: this
  keeps shapes static under jit. Where the levels are known statically (the
  montage), call `roi_align` per level on that level's boxes instead.
  """
  names = sorted(features, key=lambda k: int(k[1:]))
  lo, hi = int(names[0][1:]), int(names[-1][1:])
  if levels is None:
    levels = fpn_levels(boxes, canonical_scale, canonical_level, lo, hi)
  out = None
  for name in names:
    level = int(name[1:])
    stride = 2**level
    pooled = roi_align(features[name], boxes, box_indices, output_size,
                       1.0 / stride, sampling_ratio)
    sel = (levels == level)[:, None, None, None]
    out = jnp.where(sel, pooled, 0.0 if out is None else out)
  return out

