"""RoIAlign in pure JAX, following torchvision's `roi_align(..., aligned=True)`.

Vectorised over boxes (gathers, no Python loop over boxes) and differentiable
with respect to the features. Boxes are (x1, y1, x2, y2) in input-image
pixels; `spatial_scale` maps them onto the feature map.
"""

from typing import Sequence

import jax.numpy as jnp


def _sample_coords(start, size, bins: int, sampling_ratio: int, length: int):
  """Sample positions along one axis and whether each is on the map.

  Sample k of m = bins x sampling_ratio lies at start + size (2k + 1) / 2m
  (torchvision's start + b bin + (s + 1/2) bin / sampling_ratio). The test
  "within one pixel of the map", -1 <= y <= length, is made on 2m y =
  2m start + (2k + 1) size, which has no division: a division, even by a
  runtime value, comes out of XLA as a multiplication by a reciprocal
  (21 / 7 -> 21 x 0.14285715 = 3.0000002), which would move a sample that
  lies exactly on -1 or `length` just outside the map, to read 0 instead of
  the border value. The position itself is continuous there, so its
  division's last-bit error only perturbs the interpolation.

  Returns:
    positions [R, m] and the on-map mask [R, m].
  """
  m2 = 2 * bins * sampling_ratio
  odd = (2 * jnp.arange(bins * sampling_ratio) + 1).astype(start.dtype)
  scaled = m2 * start[:, None] + odd * size[:, None]  # exact for integer boxes
  valid = (scaled >= -m2) & (scaled <= m2 * length)
  return scaled / m2, valid


def _interp_weights(coord, length: int):
  """torchvision bilinear_interpolate along one axis: low/high indices and weights."""
  c = jnp.maximum(coord, 0.0)
  low = jnp.floor(c).astype(jnp.int32)
  at_edge = low >= length - 1
  low = jnp.where(at_edge, length - 1, low)
  high = jnp.where(at_edge, length - 1, low + 1)
  c = jnp.where(at_edge, low.astype(c.dtype), c)
  frac = c - low
  return low, high, 1.0 - frac, frac


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
  ys, y_ok = _sample_coords(y1, rh, ph, sampling_ratio, h)  # [R, ph*s]
  xs, x_ok = _sample_coords(x1, rw, pw, sampling_ratio, w)  # [R, pw*s]
  y_lo, y_hi, wy_lo, wy_hi = _interp_weights(ys, h)
  x_lo, x_hi, wx_lo, wx_hi = _interp_weights(xs, w)

  flat = features.reshape(n * h * w, c)
  base = (box_indices.astype(jnp.int32) * h * w)[:, None, None]

  def gather(yi, xi):
    return flat[base + yi[:, :, None] * w + xi[:, None, :]]  # [R, P, Q, C]

  wy_lo, wy_hi = wy_lo[:, :, None, None], wy_hi[:, :, None, None]
  wx_lo, wx_hi = wx_lo[:, None, :, None], wx_hi[:, None, :, None]
  out = (gather(y_lo, x_lo) * (wy_lo * wx_lo) + gather(y_lo, x_hi) * (wy_lo * wx_hi)
         + gather(y_hi, x_lo) * (wy_hi * wx_lo) + gather(y_hi, x_hi) * (wy_hi * wx_hi))
  # Samples further than one pixel outside the map contribute zero.
  ok = (y_ok[:, :, None] & x_ok[:, None, :])[..., None]
  out = jnp.where(ok, out, 0.0)
  r = boxes.shape[0]
  out = out.reshape(r, ph, sampling_ratio, pw, sampling_ratio, c).mean(axis=(2, 4))
  return out.astype(features.dtype)

