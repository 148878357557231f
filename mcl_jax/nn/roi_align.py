"""RoIAlign in pure JAX, following torchvision's `roi_align(..., aligned=True)`.

Vectorised over boxes (gathers, no Python loop over boxes) and differentiable
with respect to the features. Boxes are (x1, y1, x2, y2) in input-image
pixels; `spatial_scale` maps them onto the feature map.

Sample positions are those of torchvision's CPU kernel (x86-64 build: every
float32 operation rounded on its own, left to right), bit for bit:
whether a sample is on the map (-1 <= y <= H, -1 <= x <= W) is decided on
them, so a sample that torchvision's rounding puts exactly on -1, H or W is
kept as it keeps it, for integer and non-integer boxes alike. Two compiler
rewrites stand in the way of writing that arithmetic down directly: XLA turns
a division by a constant into a product with its rounded reciprocal
(21 / 7 -> 3.0000002), and on CPU it fuses a product with the addition that
consumes it into one FMA, which skips the product's rounding. `_rounded` and
`_div` below undo each.
"""

from typing import Sequence

import jax.numpy as jnp
from jax import lax

# float32 bit masks (as int32): sign and exponent; those and the top 11
# stored mantissa bits (12 significant bits); sign, exponent, low 12 bits.
_SIGN_EXP = -0x800000      # 0xFF800000
_HIGH = -0x1000            # 0xFFFFF000
_LOW = _SIGN_EXP | 0xFFF   # 0xFF800FFF
_MAX_DIVISOR = 1 << 12     # _div's remainder is exact below this


def _split(a):
  """a = hi + lo exactly, each with at most 12 significant bits, read from a's bits."""
  bits = lax.bitcast_convert_type(a, jnp.int32)
  as_float = lambda i: lax.bitcast_convert_type(i, jnp.float32)
  hi = as_float(bits & _HIGH)
  # 2^e (1 + low bits) - 2^e: the low mantissa bits at their weight, exactly.
  lo = as_float(bits & _LOW) - as_float(bits & _SIGN_EXP)
  return hi, lo


def _rounded(v):
  """v rounded to float32, in a form that no compiler fuses into an addition.

  A product read through its bits is a rounded float32; hi + lo rebuilds it
  exactly, and an addition that consumes this sum cannot become an FMA.
  """
  hi, lo = _split(v)
  return hi + lo


def _div(a, d: int):
  """float32 a / d correctly rounded, for a static integer 1 <= d <= 2^12.

  XLA computes a / d as a (1 / d) (exact when d is a power of two), less
  than 1.5 ulps from the quotient, so the correctly rounded quotient is that
  float or a neighbour: of the floats up to two ulps away, the one whose
  exact remainder |a - q d| is smallest.
  The remainder is exact: q = hi + lo (12 bits each) makes hi d and lo d
  exact, a - hi d is exact as hi d lies within a factor 2 of a, and the
  remainder, a few ulps of q times d, is a float. There are no ties: a
  float32 a is never d times the midpoint of two floats.
  """
  if d & (d - 1) == 0:
    return a / d
  base = lax.bitcast_convert_type(a / d, jnp.int32) & ~1
  # The floats from two below to three above the approximation.
  near = lax.bitcast_convert_type(base[..., None] + jnp.arange(-2, 4, dtype=jnp.int32),
                                  jnp.float32)
  hi, lo = _split(near)
  rem = jnp.abs((a[..., None] - hi * d) - lo * d)
  rem = jnp.where(jnp.isnan(rem), jnp.inf, rem)  # next to 0 some neighbours are NaNs
  best = jnp.argmin(rem, axis=-1)
  return jnp.take_along_axis(near, best[..., None], axis=-1)[..., 0]


def _sample_coords(start, size, bins: int, sampling_ratio: int):
  """torchvision's float32 sample positions along one axis: [R, bins * sampling_ratio].

  Sample s of bin b: start + b * bin + (s + 1/2) * bin / sampling_ratio with
  bin = size / bins, each operation rounded to float32, left to right.
  """
  bin_size = _div(size, bins)[:, None]
  k = jnp.arange(bins * sampling_ratio)
  b = (k // sampling_ratio).astype(jnp.float32)
  t = (k % sampling_ratio).astype(jnp.float32) + 0.5
  return (start[:, None] + _rounded(b * bin_size)
          + _div(_rounded(t * bin_size), sampling_ratio))


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


def sample_positions(boxes, output_size: int | Sequence[int] = 7,
                     spatial_scale: float = 1.0, sampling_ratio: int = 1,
                     aligned: bool = True):
  """torchvision's float32 sample positions on the feature map, bit for bit.

  Args:
    boxes, output_size, spatial_scale, sampling_ratio, aligned: as in
      `roi_align`.

  Returns:
    ys [R, ph * sampling_ratio] and xs [R, pw * sampling_ratio] (float32):
    sample s of bin b is column b * sampling_ratio + s.
  """
  if sampling_ratio <= 0:
    raise ValueError(f'sampling_ratio={sampling_ratio}: must be a static int > 0')
  ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
  if max(ph, pw, sampling_ratio) > _MAX_DIVISOR:
    raise ValueError(f'output_size={output_size}, sampling_ratio={sampling_ratio}: '
                     f'at most {_MAX_DIVISOR} bins and samples per bin')
  boxes = jnp.asarray(boxes, jnp.float32)
  offset = 0.5 if aligned else 0.0
  # start = x1 * scale - offset; size = (x2 * scale - offset) - start.
  x1, y1, x2, y2 = (_rounded(boxes[:, i] * spatial_scale) - offset for i in range(4))
  rw, rh = x2 - x1, y2 - y1
  if not aligned:  # torchvision forces at least 1x1 boxes in legacy mode
    rw, rh = jnp.maximum(rw, 1.0), jnp.maximum(rh, 1.0)
  return (_sample_coords(y1, rh, ph, sampling_ratio),
          _sample_coords(x1, rw, pw, sampling_ratio))


def roi_align(features, boxes, box_indices, output_size: int | Sequence[int] = 7,
              spatial_scale: float = 1.0, sampling_ratio: int = 1,
              aligned: bool = True):
  """RoIAlign of `boxes` on NHWC `features`.

  Differentiable with respect to the features; like torchvision's, not with
  respect to the boxes.

  Args:
    features: [N, H, W, C].
    boxes: [R, 4] (x1, y1, x2, y2) in input-image pixels.
    box_indices: [R] int, the image of each box.
    output_size: int or (ph, pw), at most 4096 each.
    spatial_scale: feature-map pixels per input pixel (1 / stride).
    sampling_ratio: samples per bin along each axis; static, 1 to 4096
      (torchvision's adaptive 0 needs data-dependent shapes).
    aligned: subtract half a pixel (torchvision aligned=True).

  Returns:
    [R, ph, pw, C] in the features' dtype.
  """
  ys, xs = sample_positions(boxes, output_size, spatial_scale, sampling_ratio, aligned)
  n, h, w, c = features.shape
  r, ph, pw = ys.shape[0], ys.shape[1] // sampling_ratio, xs.shape[1] // sampling_ratio
  # Samples further than one pixel outside the map contribute zero.
  y_ok = (ys >= -1.0) & (ys <= h)
  x_ok = (xs >= -1.0) & (xs <= w)
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
  ok = (y_ok[:, :, None] & x_ok[:, None, :])[..., None]
  out = jnp.where(ok, out, 0.0)
  out = out.reshape(r, ph, sampling_ratio, pw, sampling_ratio, c).mean(axis=(2, 4))
  return out.astype(features.dtype)
