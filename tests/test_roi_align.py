"""RoIAlign against a loop-based NumPy port of torchvision's roi_align(aligned=True).

The reference below follows torchvision's CPU kernel (roi_align_kernel.cpp)
line by line: per box, per output bin, per sample point, bilinear
interpolation with its border rules (a sample with y < -1 or y > H, or the
same for x, contributes zero; negative coordinates clamp to 0; at or past
the last row / column the sample snaps to H - 1 / W - 1). It returns the
sparse weights of every output value, so it gives both the forward result
(weights @ features) and the exact gradient (weights^T @ cotangent).

Tolerances: forward and gradient, max abs error <= 1e-5 (float32 features
of unit scale). Measured: up to ~5e-6, dominated by the float32 sample
coordinates (~1e-6 px at coordinates ~10, times neighbouring-pixel
differences of ~3), which torchvision's float kernel shares. Whether a sample
lies within one pixel of the map is decided exactly for integer boxes (see
test_roi_align_samples_exactly_on_the_border).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mcl_jax.nn import roi_align as ra

TOL = 1e-5

# One compile per static configuration instead of op-by-op dispatch.
_roi = jax.jit(ra.roi_align, static_argnums=(3, 4, 5, 6))


def _bilinear_taps(h, w, y, x):
  """torchvision bilinear_interpolate, as [(row, col, weight)] taps."""
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return []
  y = max(y, 0.0)
  x = max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_high = y_low = h - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_high = x_low = w - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx),
          (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]


def reference_weights(shape, boxes, box_indices, output_size, spatial_scale,
                      sampling_ratio, aligned=True):
  """Dense matrix A [R*ph*pw, N*H*W] with out[r, i, j, :] = A @ features."""
  n, h, w, _ = shape
  ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
  a = np.zeros((len(boxes) * ph * pw, n * h * w), np.float64)
  offset = 0.5 if aligned else 0.0
  for r, (box, b) in enumerate(zip(boxes, box_indices)):
    start_w = float(box[0]) * spatial_scale - offset
    start_h = float(box[1]) * spatial_scale - offset
    end_w = float(box[2]) * spatial_scale - offset
    end_h = float(box[3]) * spatial_scale - offset
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not aligned:
      roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    count = sampling_ratio * sampling_ratio
    for i in range(ph):
      for j in range(pw):
        row = (r * ph + i) * pw + j
        for iy in range(sampling_ratio):
          y = start_h + i * bin_h + (iy + 0.5) * bin_h / sampling_ratio
          for ix in range(sampling_ratio):
            x = start_w + j * bin_w + (ix + 0.5) * bin_w / sampling_ratio
            for yy, xx, wt in _bilinear_taps(h, w, y, x):
              a[row, (b * h + yy) * w + xx] += wt / count
  return a


def reference_roi_align(features, boxes, box_indices, output_size, spatial_scale,
                        sampling_ratio):
  ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
  a = reference_weights(features.shape, boxes, box_indices, output_size,
                        spatial_scale, sampling_ratio)
  c = features.shape[-1]
  out = a @ np.asarray(features, np.float64).reshape(-1, c)
  return out.reshape(len(boxes), ph, pw, c)


def random_boxes(rng, num, image_h, image_w, num_images):
  """Mixed boxes (image pixels): inside, partly / fully outside, sub-pixel."""
  kinds = []
  # Ordinary boxes inside the image.
  x1 = rng.uniform(0, image_w * 0.7, num)
  y1 = rng.uniform(0, image_h * 0.7, num)
  kinds.append(np.stack([x1, y1, x1 + rng.uniform(4, image_w * 0.5, num),
                         y1 + rng.uniform(4, image_h * 0.5, num)], 1))
  # Partly outside on any side (some samples beyond -1 / H: zero there).
  x1 = rng.uniform(-image_w * 0.4, image_w * 0.9, num)
  y1 = rng.uniform(-image_h * 0.4, image_h * 0.9, num)
  kinds.append(np.stack([x1, y1, x1 + rng.uniform(8, image_w * 0.8, num),
                         y1 + rng.uniform(8, image_h * 0.8, num)], 1))
  # Sub-pixel boxes (smaller than one feature-map pixel at stride 4 or 8).
  x1 = rng.uniform(-2, image_w + 2, num)
  y1 = rng.uniform(-2, image_h + 2, num)
  kinds.append(np.stack([x1, y1, x1 + rng.uniform(0.05, 3, num),
                         y1 + rng.uniform(0.05, 3, num)], 1))
  # Boxes covering the far edge, where the last row / column is clamped.
  x2 = rng.uniform(image_w - 6, image_w + 10, num)
  y2 = rng.uniform(image_h - 6, image_h + 10, num)
  kinds.append(np.stack([x2 - rng.uniform(5, 30, num), y2 - rng.uniform(5, 30, num),
                         x2, y2], 1))
  boxes = np.concatenate(kinds).astype(np.float32)
  idx = rng.integers(0, num_images, len(boxes)).astype(np.int32)
  return boxes, idx


@pytest.mark.parametrize('spatial_scale,sampling_ratio,output_size', list(
    itertools.product([1 / 4, 1 / 8], [1, 2], [7, (3, 5)])))
def test_roi_align_matches_torchvision_reference(spatial_scale, sampling_ratio, output_size):
  rng = np.random.default_rng(int(1 / spatial_scale) * 10 + sampling_ratio)
  n, h, w, c = 3, 13, 11, 4
  stride = int(round(1 / spatial_scale))
  feats = rng.standard_normal((n, h, w, c)).astype(np.float32)
  boxes, idx = random_boxes(rng, 6, h * stride, w * stride, n)
  got = np.asarray(_roi(jnp.asarray(feats), jnp.asarray(boxes), jnp.asarray(idx),
                                output_size, spatial_scale, sampling_ratio))
  want = reference_roi_align(feats, boxes, idx, output_size, spatial_scale, sampling_ratio)
  ph, pw = (output_size,) * 2 if isinstance(output_size, int) else output_size
  assert got.shape == (len(boxes), ph, pw, c)
  assert got.dtype == np.float32
  err = np.abs(got - want).max()
  print(f'roi_align scale={spatial_scale} sr={sampling_ratio} out={output_size}: '
        f'max abs err {err:.2e} (tol {TOL})')
  assert err <= TOL
  # The box mix must exercise the zero region and non-trivial values.
  # The box mix must reach the all-samples-outside case and non-trivial values.
  assert (want == 0).any() and np.abs(want).max() > 0.1


def test_roi_align_torch_cross_check():
  """Same reference computed in torch with vectorised gather (an independent path)."""
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(7)
  n, h, w, c = 2, 9, 10, 3
  feats = rng.standard_normal((n, h, w, c)).astype(np.float32)
  boxes, idx = random_boxes(rng, 4, h * 8, w * 8, n)
  sr, ph, pw = 2, 3, 5
  f = torch.from_numpy(feats).double()
  b = torch.from_numpy(boxes).double()
  off = 0.5
  x1, y1 = b[:, 0] / 8 - off, b[:, 1] / 8 - off
  rw, rh = b[:, 2] / 8 - off - x1, b[:, 3] / 8 - off - y1
  ys = y1[:, None] + (torch.arange(ph * sr) // sr)[None] * (rh / ph)[:, None] + (
      (torch.arange(ph * sr) % sr)[None] + 0.5) * (rh / ph / sr)[:, None]
  xs = x1[:, None] + (torch.arange(pw * sr) // sr)[None] * (rw / pw)[:, None] + (
      (torch.arange(pw * sr) % sr)[None] + 0.5) * (rw / pw / sr)[:, None]

  def axis(cd, length):
    ok = (cd >= -1) & (cd <= length)
    cd = cd.clamp(min=0)
    lo = cd.floor().long()
    edge = lo >= length - 1
    lo = torch.where(edge, torch.full_like(lo, length - 1), lo)
    hi = torch.where(edge, lo, lo + 1)
    cd = torch.where(edge, lo.double(), cd)
    fr = cd - lo
    return lo, hi, 1 - fr, fr, ok

  yl, yh, wyl, wyh, yok = axis(ys, h)
  xl, xh, wxl, wxh, xok = axis(xs, w)
  bi = torch.from_numpy(idx).long()[:, None, None]
  out = 0
  for yi, wy in ((yl, wyl), (yh, wyh)):
    for xi, wx in ((xl, wxl), (xh, wxh)):
      out = out + f[bi, yi[:, :, None], xi[:, None, :]] * (wy[:, :, None] * wx[:, None, :])[..., None]
  out = out * (yok[:, :, None] & xok[:, None, :])[..., None]
  out = out.reshape(len(boxes), ph, sr, pw, sr, c).mean((2, 4)).numpy()
  got = np.asarray(_roi(jnp.asarray(feats), jnp.asarray(boxes), jnp.asarray(idx),
                                (ph, pw), 1 / 8, sr))
  ref = reference_roi_align(feats, boxes, idx, (ph, pw), 1 / 8, sr)
  err_t, err_ref = np.abs(got - out).max(), np.abs(ref - out).max()
  print(f'roi_align vs torch: max abs err {err_t:.2e}; numpy ref vs torch {err_ref:.2e} (tol {TOL})')
  assert err_t <= TOL and err_ref <= 1e-9


def test_roi_align_gradient_matches_reference_adjoint():
  """d<roi_align(f), g>/df equals A^T g from the reference (float32, tol 1e-5)."""
  rng = np.random.default_rng(3)
  n, h, w, c = 2, 7, 9, 3
  feats = rng.standard_normal((n, h, w, c)).astype(np.float32)
  boxes, idx = random_boxes(rng, 3, h * 4, w * 4, n)
  g = rng.standard_normal((len(boxes), 7, 7, c)).astype(np.float32)
  fn = lambda f: jnp.sum(_roi(f, jnp.asarray(boxes), jnp.asarray(idx), 7, 1 / 4, 2)
                         * g)
  got = np.asarray(jax.grad(fn)(jnp.asarray(feats)))
  a = reference_weights(feats.shape, boxes, idx, 7, 1 / 4, 2)
  want = (a.T @ g.reshape(-1, c).astype(np.float64)).reshape(feats.shape)
  err = np.abs(got - want).max()
  print(f'roi_align grad vs reference adjoint: max abs err {err:.2e} (tol {TOL})')
  assert err <= TOL
  assert np.abs(want).max() > 0.1


def test_roi_align_check_grads_float64():
  """jax.test_util.check_grads (order 1, reverse mode) in float64."""
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    feats = jnp.asarray(rng.standard_normal((2, 6, 5, 2)))
    boxes, idx = random_boxes(rng, 2, 24, 20, 2)
    fn = jax.jit(lambda f: ra.roi_align(f, jnp.asarray(boxes), jnp.asarray(idx), (3, 5),
                                        1 / 4, 2))
    assert fn(feats).dtype == jnp.float64
    check_grads(fn, (feats,), order=1, modes=('rev',), atol=1e-7, rtol=1e-7)


def test_roi_align_rejects_adaptive_sampling():
  with pytest.raises(ValueError):
    ra.roi_align(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32),
                 2, 1.0, sampling_ratio=0)


def _border_boxes(bins, ratio, spacing, length, stride):
  """Integer boxes whose first sample lands on -1 and last on `length` (one axis).

  With sample spacing u = bin / ratio, the samples are start + (k + 1/2) u;
  start = -1 - u/2 and length = (bins ratio - 1) u - 1 put the first and last
  exactly on the border. In image pixels (x stride, aligned's half pixel
  added back) the ends are integers.
  """
  start = -1.0 - spacing / 2
  assert length == (bins * ratio - 1) * spacing - 1
  lo, hi = (start + 0.5) * stride, (start + bins * ratio * spacing + 0.5) * stride
  assert lo == int(lo) and hi == int(hi)
  return lo, hi


@pytest.mark.parametrize('ph,pw,ratio,uy,ux,stride', [
    # 21 / 7 = 3.0000002 under XLA put the last sample outside before the fix
    # (the first four cases; the fifth never did).
    (7, 7, 1, 3, 3, 1),
    (7, 7, 1, 3, 3, 4),
    (7, 7, 2, 3, 3, 4),
    (7, 3, 3, 1, 5, 8),
    (3, 5, 2, 3, 1, 8),
])
def test_roi_align_samples_exactly_on_the_border(ph, pw, ratio, uy, ux, stride):
  """Samples on -1, H or W take the border value (torchvision), not 0."""
  h, w = (ph * ratio - 1) * uy - 1, (pw * ratio - 1) * ux - 1
  y1, y2 = _border_boxes(ph, ratio, uy, h, stride)
  x1, x2 = _border_boxes(pw, ratio, ux, w, stride)
  rng = np.random.default_rng(ph * 100 + pw * 10 + ratio)
  n, c = 2, 3
  feats = rng.standard_normal((n, h, w, c)).astype(np.float32)
  # Both borders on both axes; one axis only; shifted one pixel inwards (the
  # far samples then sit on H - 1 / W - 1); and random integer boxes.
  boxes = [[x1, y1, x2, y2], [x1, y1 + 5 * stride, x2, y2 + 5 * stride],
           [x1 + 7 * stride, y1, x2 + 7 * stride, y2],
           [x1 + stride, y1 + stride, x2 + stride, y2 + stride],
           [x1 - stride, y1 - stride, x2 - stride, y2 - stride]]
  lo = rng.integers(-2, np.array([w, h]) + 2, (6, 2)) * stride
  size = rng.integers(1, np.array([w, h]) + 3, (6, 2)) * stride
  boxes += np.concatenate([lo, lo + size], 1).tolist()
  boxes = np.asarray(boxes, np.float32)
  idx = (np.arange(len(boxes)) % n).astype(np.int32)
  got = np.asarray(_roi(jnp.asarray(feats), jnp.asarray(boxes), jnp.asarray(idx),
                        (ph, pw), 1 / stride, ratio))
  want = reference_roi_align(feats, boxes, idx, (ph, pw), 1 / stride, ratio)
  err = np.abs(got - want).max()
  print(f'roi_align on the border ({ph}x{pw}, sr {ratio}, stride {stride}): '
        f'max abs err {err:.2e} (tol {TOL})')
  assert err <= TOL
  # The first box's corner outputs read the border pixels themselves: the
  # reference really does sample on the border (not 0 and not inside).
  if ratio == 1:
    for (i, j), (yy, xx) in {(0, 0): (0, 0), (ph - 1, pw - 1): (h - 1, w - 1)}.items():
      np.testing.assert_allclose(want[0, i, j], feats[0, yy, xx], rtol=0, atol=1e-6)
