"""RoIAlign against a loop-based NumPy port of torchvision's roi_align.

The reference follows torchvision's CPU kernel (roi_align_kernel.cpp, as
built for x86-64: every float32 operation rounded on its own) line by line:
per box, per output bin, per sample point, in float32 and in the kernel's
order, roi_start = x1 * scale - offset, roi_size = (x2 * scale - offset) -
roi_start, bin = roi_size / bins, y = roi_start + b * bin + (s + .5) * bin /
sampling_ratio; a sample with y < -1 or y > H (or the same for x)
contributes zero; negative coordinates clamp to 0; at or past the last row /
column the sample snaps to H - 1 / W - 1; the bilinear weights are float32
products. It returns the sparse weights of every output value, so it gives
both the forward result (weights @ features, in float64) and the exact
gradient (weights^T @ cotangent).

Positions, border decisions and weights are then the same as roi_align's,
bit for bit (test_sample_positions_bit_for_bit), and the tolerances below
bound only float32 rounding in summing the weighted samples (`out_tol`,
`grad_tol`).
"""

import fractions
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mcl_jax.nn import roi_align as ra
from tests import tolerance

F32 = np.float32
U32 = 2.0**-24  # float32 unit roundoff (eps / 2)

# One compile per static configuration instead of op-by-op dispatch.
_roi = jax.jit(ra.roi_align, static_argnums=(3, 4, 5, 6))
_positions = jax.jit(ra.sample_positions, static_argnums=(1, 2, 3, 4))


def _gamma(m, u=U32):
  """gamma_m = m u / (1 - m u): the relative error bound of m float roundings."""
  return tolerance.gamma(m, np.float64 if u == 2.0**-53 else np.float32)


def out_tol(features, sampling_ratio):
  """Max abs error of a float32 RoIAlign output against `reference_roi_align`.

  Both use the same float32 positions, decisions and bilinear weights, so
  only the output's arithmetic differs. A bin is (1/n) sum of 4n terms w v
  (n = sampling_ratio^2 samples of 4 taps, w >= 0 summing to 1 per sample
  up to second-order rounding): rounding each product, summing the terms in
  any order (fused into FMAs or not) and dividing by n (or multiplying by a
  rounded 1/n) is at most 4n + 2 roundings along any term's path, so
  |error| <= gamma_{4n+2} (1/n) sum |w v| <= gamma_{4n+2} max|v|.
  torchvision's own float32 result obeys the same bound; the float64
  reference's error (gamma in 2^-53) is below 1e-8 of it and left out.
  """
  n = sampling_ratio * sampling_ratio
  return _gamma(4 * n + 2) * float(np.abs(features).max())


def grad_tol(a, taps, g):
  """Per-element max abs error of the float32 gradient against a^T g.

  Feature element p receives taps[p] terms (w / n) g: the cotangent's 1/n
  (two roundings: a rounded reciprocal times g), the product with w (one)
  and the scatter-add of taps[p] terms (taps[p] - 1), so |error_p| <=
  gamma_{taps[p] + 2} (|a|^T |g|)_p.
  """
  c = g.shape[-1]
  mass = (np.abs(a).T @ np.abs(g.reshape(-1, c).astype(np.float64)))
  return _gamma(taps[:, None] + 2.0) * mass


def tv_axis(lo, hi, spatial_scale, bins, aligned=True):
  """torchvision's roi_start and bin_size on one axis (float32, op by op).

  Elementwise on float32 scalars or arrays: NumPy rounds every float32
  operation to float32 and fuses none.
  """
  scale, offset = F32(spatial_scale), F32(0.5 if aligned else 0.0)
  start = F32(lo) * scale - offset
  size = (F32(hi) * scale - offset) - start
  if not aligned:  # torchvision forces at least 1x1 boxes in legacy mode
    size = np.maximum(size, F32(1.0))
  return start, size / F32(bins)


def tv_sample(start, bin_size, b, s, ratio):
  """Sample s of bin b: roi_start + b * bin + (s + .5) * bin / ratio, left to right."""
  return start + F32(b) * bin_size + F32(s + 0.5) * bin_size / F32(ratio)


def reference_positions(boxes, output_size, spatial_scale, sampling_ratio, aligned=True):
  """ys [R, ph * sr], xs [R, pw * sr]: the kernel's loops over bins and samples."""
  ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
  boxes = np.asarray(boxes, F32)
  out = []
  for lo, hi, bins in ((boxes[:, 1], boxes[:, 3], ph), (boxes[:, 0], boxes[:, 2], pw)):
    start, bin_size = tv_axis(lo, hi, spatial_scale, bins, aligned)
    out.append(np.stack([tv_sample(start, bin_size, b, s, sampling_ratio)
                         for b in range(bins) for s in range(sampling_ratio)], 1))
  return out


def _bilinear_taps(h, w, y, x):
  """torchvision bilinear_interpolate in float32, as [(row, col, weight)] taps."""
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return []
  y, x = max(y, F32(0.0)), max(x, F32(0.0))
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_high = y_low = h - 1
    y = F32(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_high = x_low = w - 1
    x = F32(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - F32(y_low), x - F32(x_low)
  hy, hx = F32(1.0) - ly, F32(1.0) - lx
  return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx),
          (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]


def reference_weights(shape, boxes, box_indices, output_size, spatial_scale,
                      sampling_ratio, aligned=True):
  """Dense A [R*ph*pw, N*H*W] with out[r, i, j, :] = A @ features, and taps [N*H*W].

  taps[p] counts the bilinear taps (before merging equal ones) that read
  feature pixel p: the length of the gradient's sum there.
  """
  n, h, w, _ = shape
  ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
  ys, xs = reference_positions(boxes, output_size, spatial_scale, sampling_ratio, aligned)
  a = np.zeros((len(boxes) * ph * pw, n * h * w), np.float64)
  taps = np.zeros(n * h * w, np.int64)
  count = sampling_ratio * sampling_ratio
  for r, b in enumerate(box_indices):
    for i in range(ph):
      for j in range(pw):
        row = (r * ph + i) * pw + j
        for iy in range(sampling_ratio):
          y = ys[r, i * sampling_ratio + iy]
          for ix in range(sampling_ratio):
            x = xs[r, j * sampling_ratio + ix]
            for yy, xx, wt in _bilinear_taps(h, w, y, x):
              col = (b * h + yy) * w + xx
              a[row, col] += float(wt) / count
              taps[col] += 1
  return a, taps


def reference_roi_align(features, boxes, box_indices, output_size, spatial_scale,
                        sampling_ratio, aligned=True):
  ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
  a, _ = reference_weights(features.shape, boxes, box_indices, output_size,
                           spatial_scale, sampling_ratio, aligned)
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


def _stats(name, got, want, tol):
  """Prints the max abs error; returns the worst err / tol (tol scalar or per element)."""
  err = np.abs(np.asarray(got, np.float64) - want)
  tol = np.broadcast_to(tol, err.shape)
  # Where nothing may differ (a feature pixel no sample reads), any error fails.
  ratio = np.where(tol > 0, err / np.where(tol > 0, tol, 1), np.where(err > 0, np.inf, 0.0))
  i = np.unravel_index(np.argmax(ratio), ratio.shape)
  ratio = float(ratio[i])
  print(f'{name}: max abs err {err.max():.2e}, worst err / tol {ratio:.3f}')
  tolerance.record(name, float(err[i]), float(tol[i]))
  return ratio


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
  assert _stats(f'roi_align scale={spatial_scale} sr={sampling_ratio} out={output_size}',
                got, want, out_tol(feats, sampling_ratio)) <= 1
  # The box mix must reach the all-samples-outside case and non-trivial values.
  assert (want == 0).any() and np.abs(want).max() > 0.1


@pytest.mark.parametrize('spatial_scale,ratio,output_size,aligned', [
    (1 / 4, 1, 7, True), (1 / 8, 2, (3, 5), False), (1 / 2, 3, (5, 7), True),
    (1.0, 2, 7, True), (3 / 4, 3, (7, 3), True), (0.3, 1, (5, 3), False),
    (1 / 3, 2, 7, True)])
def test_sample_positions_bit_for_bit(spatial_scale, ratio, output_size, aligned):
  """roi_align's float32 sample positions are torchvision's, on many random boxes.

  The scales include ones whose products round (0.75, 0.3, 1/3) and the
  output sizes divisions that do (by 7, 5, 3).
  """
  rng = np.random.default_rng(int(spatial_scale * 1000) + ratio)
  h, w = 13, 11
  boxes, _ = random_boxes(rng, 2000, h / spatial_scale, w / spatial_scale, 1)
  got = _positions(jnp.asarray(boxes), output_size, spatial_scale, ratio, aligned)
  want = reference_positions(boxes, output_size, spatial_scale, ratio, aligned)
  for axis, g, wt in zip('yx', got, want):
    g = np.asarray(g)
    assert g.dtype == np.float32 and g.shape == wt.shape
    diff = int((g != wt).sum())
    assert diff == 0, f'{diff} of {wt.size} {axis} positions differ'


def test_roi_align_torch_cross_check():
  """The reference's float32 arithmetic written again with torch tensor ops.

  Eager torch rounds every float32 operation on its own, as the kernel does:
  an independent, vectorised check of the NumPy loop (positions bit for bit,
  outputs to float64 rounding) and of roi_align.
  """
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(7)
  n, h, w, c = 2, 9, 10, 3
  scale, sr, ph, pw = 0.3, 2, 3, 5
  feats = rng.standard_normal((n, h, w, c)).astype(np.float32)
  boxes, idx = random_boxes(rng, 4, h / scale, w / scale, n)
  b = torch.from_numpy(boxes)
  s, off = torch.tensor(scale, dtype=torch.float32), torch.tensor(0.5, dtype=torch.float32)

  def axis(lo, hi, bins, length):
    start = lo * s - off
    bin_size = ((hi * s - off) - start) / bins
    k = torch.arange(bins * sr)
    bi, t = (k // sr).float(), (k % sr).float() + 0.5
    pos = (start[:, None] + bi * bin_size[:, None]) + t * bin_size[:, None] / sr
    ok = (pos >= -1) & (pos <= length)
    cd = pos.clamp(min=0)
    lo_i = cd.floor().long()
    edge = lo_i >= length - 1
    lo_i = torch.where(edge, torch.full_like(lo_i, length - 1), lo_i)
    hi_i = torch.where(edge, lo_i, lo_i + 1)
    cd = torch.where(edge, lo_i.float(), cd)
    fr = cd - lo_i
    return pos, lo_i, hi_i, 1 - fr, fr, ok

  ys, yl, yh, wyl, wyh, yok = axis(b[:, 1], b[:, 3], ph, h)
  xs, xl, xh, wxl, wxh, xok = axis(b[:, 0], b[:, 2], pw, w)
  f = torch.from_numpy(feats).double()
  bi = torch.from_numpy(idx).long()[:, None, None]
  out = 0
  for yi, wy in ((yl, wyl), (yh, wyh)):
    for xi, wx in ((xl, wxl), (xh, wxh)):
      wt = (wy[:, :, None] * wx[:, None, :]).double()  # float32 products, as the kernel's
      out = out + f[bi, yi[:, :, None], xi[:, None, :]] * wt[..., None]
  out = out * (yok[:, :, None] & xok[:, None, :])[..., None]
  out = out.reshape(len(boxes), ph, sr, pw, sr, c).mean((2, 4)).numpy()

  ref_ys, ref_xs = reference_positions(boxes, (ph, pw), scale, sr)
  got_ys, got_xs = _positions(jnp.asarray(boxes), (ph, pw), scale, sr, True)
  for t_pos, ref, got in ((ys, ref_ys, got_ys), (xs, ref_xs, got_xs)):
    assert np.array_equal(t_pos.numpy(), ref) and np.array_equal(np.asarray(got), ref)
  ref = reference_roi_align(feats, boxes, idx, (ph, pw), scale, sr)
  got = np.asarray(_roi(jnp.asarray(feats), jnp.asarray(boxes), jnp.asarray(idx),
                        (ph, pw), scale, sr))
  # Two float64 sums of the same 4 sr^2 terms: gamma_{4 sr^2 + 2} in 2^-53, each.
  tol64 = 2 * _gamma(4 * sr * sr + 2, 2.0**-53) * np.abs(feats).max()
  assert _stats('numpy reference vs torch', ref, out, tol64) <= 1
  assert _stats('roi_align vs torch', got, out, out_tol(feats, sr)) <= 1


def test_roi_align_gradient_matches_reference_adjoint():
  """d<roi_align(f), g>/df equals A^T g from the reference (float32, `grad_tol`)."""
  rng = np.random.default_rng(3)
  n, h, w, c = 2, 7, 9, 3
  feats = rng.standard_normal((n, h, w, c)).astype(np.float32)
  boxes, idx = random_boxes(rng, 3, h * 4, w * 4, n)
  g = rng.standard_normal((len(boxes), 7, 7, c)).astype(np.float32)
  fn = lambda f: jnp.sum(_roi(f, jnp.asarray(boxes), jnp.asarray(idx), 7, 1 / 4, 2)
                         * g)
  got = np.asarray(jax.grad(fn)(jnp.asarray(feats))).reshape(-1, c)
  a, taps = reference_weights(feats.shape, boxes, idx, 7, 1 / 4, 2)
  want = a.T @ g.reshape(-1, c).astype(np.float64)
  assert _stats('roi_align grad vs reference adjoint', got, want, grad_tol(a, taps, g)) <= 1
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
    # RoIAlign is linear in the features, so the central difference is exact
    # up to rounding: both evaluations err by gamma_{4 n + 2} max|f| per
    # output (n = 2 x 2 samples), divided by the step 2 eps; check_grads
    # compares inner products with a random N(0, 1) cotangent over the
    # outputs (|ct| <= 5 on so few draws).
    outputs = int(np.prod(fn(feats).shape))
    eps = 1e-4  # check_grads' default step
    atol = tolerance.tol(np.float64, 4 * 4 + 2, float(jnp.abs(feats).max()) * 5 * outputs,
                         sides=2, worst_case=True) / (2 * eps)
    check_grads(fn, (feats,), order=1, modes=('rev',), atol=atol, rtol=0, eps=eps)


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
  assert _stats(f'roi_align on the border ({ph}x{pw}, sr {ratio}, stride {stride})',
                got, want, out_tol(feats, ratio)) <= 1
  # The first box's corner outputs read the border pixels themselves, with
  # weight exactly 1: the reference really does sample on the border (not 0
  # and not inside).
  if ratio == 1:
    for (i, j), (yy, xx) in {(0, 0): (0, 0), (ph - 1, pw - 1): (h - 1, w - 1)}.items():
      np.testing.assert_array_equal(want[0, i, j], feats[0, yy, xx])


def _exact_positions(boxes, output_size, spatial_scale, sampling_ratio, aligned=True):
  """ys, xs in exact arithmetic from the same float32 boxes and scale (Fractions)."""
  ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
  scale = fractions.Fraction(float(F32(spatial_scale)))
  offset = fractions.Fraction(1, 2) if aligned else 0
  out = []
  for lo_i, hi_i, bins in ((1, 3, ph), (0, 2, pw)):
    rows = []
    for box in np.asarray(boxes, F32):
      start = fractions.Fraction(float(box[lo_i])) * scale - offset
      size = fractions.Fraction(float(box[hi_i])) * scale - offset - start
      if not aligned:
        size = max(size, 1)
      rows.append([start + (b + fractions.Fraction(2 * s + 1, 2 * sampling_ratio)) * size / bins
                   for b in range(bins) for s in range(sampling_ratio)])
    out.append(rows)
  return out


def test_roi_align_issue_box_sample_on_row_minus_one():
  """A non-integer box whose float32 sample row lands exactly on y = -1.

  9 x 11 map, scale 1/2, aligned, 2 x 2 samples, 7 x 7 bins, box
  (4.6, -9.2, 7.8, 23.6): torchvision's rounding puts sample row 3 (bin 1)
  on -1.0 (exactly -1 + 2^-23 from the same float32 box), which is on the map
  and reads row 0; the bins of that row then differ from dropping it by
  about one row-0 value / 4.
  """
  rng = np.random.default_rng(21)
  h, w, c = 9, 11, 4
  feats = rng.standard_normal((1, h, w, c)).astype(np.float32)
  boxes = np.array([[4.6, -9.2, 7.8, 23.6]], np.float32)
  idx = np.zeros(1, np.int32)
  ys, _ = reference_positions(boxes, 7, 0.5, 2)
  exact_ys, _ = _exact_positions(boxes, 7, 0.5, 2)
  assert ys[0, 3] == -1.0 and exact_ys[0][3] == -1 + fractions.Fraction(1, 2**23)
  got_ys, _ = _positions(jnp.asarray(boxes), 7, 0.5, 2, True)
  assert np.asarray(got_ys)[0, 3] == -1.0
  got = np.asarray(_roi(jnp.asarray(feats), jnp.asarray(boxes), jnp.asarray(idx), 7, 0.5, 2))
  want = reference_roi_align(feats, boxes, idx, 7, 0.5, 2)
  assert _stats('roi_align, the issue box', got, want, out_tol(feats, 2)) <= 1


def _ulp_steps(v, steps):
  """The float32 values `steps` ulps from v (v away from 0)."""
  return (np.asarray(v, F32).view(np.int32) + steps.astype(np.int32)).view(F32)


def _axis_on_target(rng, target, spatial_scale, bins, ratio, aligned, exact_outside):
  """Non-integer float32 (lo, hi) in image pixels with a sample exactly on `target`.

  A box is solved in exact arithmetic for a random sample to lie on the
  target, then its ends are moved by up to 24 ulps each until the float32
  (torchvision-order) position of that sample equals the target exactly. With
  exact_outside, the sample must also lie beyond the map in exact arithmetic
  (by more than float64 can blur), the case an exact decision would drop.
  """
  offset = 0.5 if aligned else 0.0
  steps = np.arange(-24, 25)
  for _ in range(200):
    b, s = divmod(int(rng.integers(bins * ratio)), ratio)
    frac = (b + (s + 0.5) / ratio) / bins
    size = rng.uniform(1.5, 3.0) * bins
    lo = (target - frac * size + offset) / spatial_scale
    los = _ulp_steps(F32(lo), steps)[:, None]
    his = _ulp_steps(F32(lo + size / spatial_scale), steps)[None, :]
    start, bin_size = tv_axis(los, his, spatial_scale, bins, aligned)
    hit = ((tv_sample(start, bin_size, b, s, ratio) == F32(target))
           & (los != np.round(los)) & (his != np.round(his)))
    if exact_outside:
      s64 = los.astype(np.float64) * F32(spatial_scale) - offset
      y64 = s64 + frac * (his.astype(np.float64) * F32(spatial_scale) - offset - s64)
      hit &= (y64 - target) * np.sign(target) > 1e-9
    if hit.any():
      i, j = np.argwhere(hit)[rng.integers(hit.sum())]
      return los[i, 0], his[0, j]
  raise AssertionError(f'no box puts a sample on {target} (scale {spatial_scale})')


@pytest.mark.parametrize('spatial_scale,ratio,output_size,aligned', [
    (1 / 4, 1, 7, True),
    (1 / 8, 2, (3, 5), True),
    (1 / 2, 3, 7, True),
    (1.0, 2, (5, 3), True),
    (0.3, 2, 7, True),
    (1 / 4, 2, (4, 7), False),
])
def test_roi_align_non_integer_boxes_with_samples_on_the_border(spatial_scale, ratio,
                                                                 output_size, aligned):
  """Samples that float32 puts exactly on -1, H, W (or one ulp beyond) decide as torchvision's.

  Each box has, on each axis, a sample on -1 or the far border, or one ulp
  outside either; half of those on the border lie beyond the map in exact
  arithmetic, so an exact decision would drop them.
  """
  rng = np.random.default_rng(int(spatial_scale * 100) + 10 * ratio + aligned)
  ph, pw = (output_size,) * 2 if isinstance(output_size, int) else output_size
  n, h, w, c = 2, 9, 11, 3
  feats = rng.standard_normal((n, h, w, c)).astype(np.float32)

  def targets(length):
    return [(F32(-1.0), False), (F32(length), False), (F32(-1.0), True), (F32(length), True),
            (np.nextafter(F32(-1.0), F32(-2.0)), False),
            (np.nextafter(F32(length), F32(length + 1)), False)]

  boxes = []
  for (ty, ey), (tx, ex) in itertools.product(targets(h), targets(w)[::-1]):
    y1, y2 = _axis_on_target(rng, ty, spatial_scale, ph, ratio, aligned, ey)
    x1, x2 = _axis_on_target(rng, tx, spatial_scale, pw, ratio, aligned, ex)
    boxes.append([x1, y1, x2, y2])
  boxes = np.asarray(boxes, F32)
  idx = rng.integers(0, n, len(boxes)).astype(np.int32)

  # The construction holds in the loop reference: samples exactly on -1, H
  # and W, some of them beyond the map in exact arithmetic, and samples one
  # ulp outside.
  ys, xs = reference_positions(boxes, output_size, spatial_scale, ratio, aligned)
  exact_ys, exact_xs = _exact_positions(boxes, output_size, spatial_scale, ratio, aligned)
  for pos, exact, length in ((ys, exact_ys, h), (xs, exact_xs, w)):
    for border, outward in ((-1, -1), (length, 1)):
      on = np.argwhere(pos == F32(border))
      assert len(on), f'no sample on {border}'
      assert any((exact[r][k] - border) * outward > 0 for r, k in on), border
      assert (pos == np.nextafter(F32(border), F32(border + outward))).any()
  got_pos = _positions(jnp.asarray(boxes), output_size, spatial_scale, ratio, aligned)
  for g, want_pos in zip(got_pos, (ys, xs)):
    np.testing.assert_array_equal(np.asarray(g), want_pos)
  got = np.asarray(_roi(jnp.asarray(feats), jnp.asarray(boxes), jnp.asarray(idx),
                        output_size, spatial_scale, ratio, aligned))
  want = reference_roi_align(feats, boxes, idx, output_size, spatial_scale, ratio, aligned)
  assert _stats(f'roi_align, samples on the border (scale {spatial_scale}, sr {ratio}, '
                f'out {output_size}, aligned {aligned})', got, want, out_tol(feats, ratio)) <= 1
