"""The detection ops against independent NumPy references written from detectron2's definitions.

Box coding, IoU, anchors, level assignment, the Matcher and balanced sampler,
greedy NMS and the mask targets / pasting, each on random inputs (clustered
boxes so that suppression happens, quantised IoUs so that ties happen), with
float tolerances from tests/tolerance.py. The mask-target test also measures
how far the box-local targets (the gt mask stored at M x M inside its box)
are from the exact ones (the full-resolution mask sampled in the proposal).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from mcl_jax.detection import anchors as anchor_ops
from mcl_jax.detection import boxes as box_ops
from mcl_jax.detection import mask_targets as mt
from mcl_jax.detection import matching
from mcl_jax.detection import nms as nms_ops
from tests import tolerance

F32 = np.float32
# One program per shape instead of one per operation (eager dispatch compiles each).
mask_targets_jit = jax.jit(mt.mask_targets, static_argnames=('size', 'sampling_ratio'))


def random_boxes(rng, n, extent=400.0, min_size=1.0, max_size=200.0):
  """[n, 4] float32 boxes with positive sides inside [0, extent]."""
  wh = rng.uniform(min_size, max_size, (n, 2))
  xy = rng.uniform(0, extent - max_size, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(F32)


def clustered_boxes(rng, n, clusters, extent=300.0):
  """Boxes jittered around a few centres: many overlaps, so NMS suppresses."""
  centres = rng.uniform(40, extent - 40, (clusters, 2))
  sizes = rng.uniform(10, 60, (clusters, 2))
  k = rng.integers(0, clusters, n)
  c = centres[k] + rng.normal(0, 0.15, (n, 2)) * sizes[k]
  s = sizes[k] * rng.uniform(0.7, 1.3, (n, 2))
  return np.concatenate([c - s / 2, c + s / 2], axis=1).astype(F32)


# ----------------------------------------------------------------------------- box coding

def np_encode(boxes, anchors, weights):
  b, a = boxes.astype(np.float64), anchors.astype(np.float64)
  aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  ax, ay = a[:, 0] + aw / 2, a[:, 1] + ah / 2
  gw, gh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
  gx, gy = b[:, 0] + gw / 2, b[:, 1] + gh / 2
  wx, wy, ww, wh = weights
  return np.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * np.log(gw / aw),
                   wh * np.log(gh / ah)], axis=1)


def test_box_coding_round_trip_and_reference():
  rng = np.random.default_rng(0)
  weights = (10.0, 10.0, 5.0, 5.0)
  anchors = random_boxes(rng, 2000)
  # Targets up to e^3 = 20 times larger or smaller than their anchor: inside the clamp (62.5).
  aw = anchors[:, 2:] - anchors[:, :2]
  centre = anchors[:, :2] + aw / 2 + rng.normal(0, 1, (2000, 2)) * aw
  wh = aw * np.exp(rng.uniform(-3, 3, (2000, 2)))
  boxes = np.concatenate([centre - wh / 2, centre + wh / 2], 1).astype(F32)
  deltas = np.asarray(box_ops.encode(jnp.asarray(boxes), jnp.asarray(anchors), weights))
  want = np_encode(boxes, anchors, weights)
  # encode: centres and sizes (2 roundings each), a difference, a product, a
  # quotient; log's argument a quotient. Errors relative to the coordinates'
  # magnitude carried through the division by the anchor side.
  aw = (anchors[:, 2:] - anchors[:, :2]).astype(np.float64)
  coord = np.abs(np.concatenate([boxes, anchors], 1)).max(1, keepdims=True)
  pos_scale = 10.0 * coord / aw  # |d dx / d coordinate| * coordinate
  log_scale = 5.0 * (1 + np.abs(want[:, 2:]))
  atol = np.concatenate([pos_scale, log_scale], 1) * tolerance.tol(
      F32, 8 + tolerance.TRANSCENDENTAL, worst_case=True)
  tolerance.assert_close(deltas, want, atol=atol, what='encode vs float64')

  back = np.asarray(box_ops.decode(jnp.asarray(deltas), jnp.asarray(anchors), weights))
  # encode then decode: about 12 roundings each way and exp(log(.)) (two
  # transcendentals), each relative to the largest coordinate or side in play.
  scale = np.abs(np.concatenate([boxes, anchors], 1)).max(1, keepdims=True)
  n_ops = 24 + 2 * tolerance.TRANSCENDENTAL
  tolerance.assert_close(back, boxes, atol=scale * tolerance.tol(F32, n_ops, worst_case=True),
                         what='decode(encode(boxes))')


def test_decode_clamps_log_scale():
  rng = np.random.default_rng(1)
  anchors = random_boxes(rng, 100)
  deltas = rng.normal(0, 1, (100, 4)).astype(F32)
  deltas[:50, 2:] = rng.uniform(5, 30, (50, 2)) * 5.0  # far past the clamp (weights 5)
  out = np.asarray(box_ops.decode(jnp.asarray(deltas), jnp.asarray(anchors), (10, 10, 5, 5)))
  a = anchors.astype(np.float64)
  aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  cx, cy = a[:, 0] + aw / 2 + deltas[:, 0] / 10 * aw, a[:, 1] + ah / 2 + deltas[:, 1] / 10 * ah
  dw = np.minimum(deltas[:, 2] / 5.0, math.log(1000 / 16))
  dh = np.minimum(deltas[:, 3] / 5.0, math.log(1000 / 16))
  w, h = np.exp(dw) * aw, np.exp(dh) * ah
  want = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
  assert np.allclose(w[:50] / aw[:50], 62.5) and np.allclose(h[:50] / ah[:50], 62.5)
  scale = np.abs(want).max(1, keepdims=True)
  tolerance.assert_close(out, want, atol=scale * tolerance.tol(
      F32, 12 + tolerance.TRANSCENDENTAL, worst_case=True), what='decode with clamp')


# ----------------------------------------------------------------------------- IoU, levels

def np_iou(a, b):
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a.astype(np.float64)):
    for j, q in enumerate(b.astype(np.float64)):
      iw = min(p[2], q[2]) - max(p[0], q[0])
      ih = min(p[3], q[3]) - max(p[1], q[1])
      if iw > 0 and ih > 0:
        inter = iw * ih
        out[i, j] = inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)
  return out


def test_pairwise_iou_matches_loop_with_empty_boxes():
  rng = np.random.default_rng(2)
  a = clustered_boxes(rng, 60, 5)
  b = clustered_boxes(rng, 50, 5)
  a[:5, 2] = a[:5, 0]             # zero width
  b[:5, 3] = b[:5, 1] - 3.0       # negative height
  b[5] = a[10]                    # identical boxes: IoU 1
  got = np.asarray(box_ops.pairwise_iou(jnp.asarray(a), jnp.asarray(b)))
  want = np_iou(a, b)
  assert np.all(got[:5] == 0) and np.all(got[:, :5] == 0)
  # min/max exact; inter, areas (3 roundings each), union (2), quotient (1),
  # relative to the IoU's scale 1; the coordinate differences are exact
  # enough (Sterbenz) for overlapping boxes only, so count them too.
  tolerance.assert_close(got, want, atol=tolerance.tol(F32, 14, worst_case=True) * 4,
                         what='pairwise IoU')
  assert got[10, 5] == 1.0


def test_assign_levels_matches_definition():
  rng = np.random.default_rng(3)
  sides = np.exp(rng.uniform(np.log(4), np.log(1200), (3000, 2)))
  xy = rng.uniform(0, 100, (3000, 2))
  boxes = np.concatenate([xy, xy + sides], 1).astype(F32)
  exact = np.array([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 448, 448], [0, 0, 56, 56],
                    [0, 0, 2000, 2000], [0, 0, 1, 1], [5, 5, 2, 2]], F32)
  boxes = np.concatenate([boxes, exact])
  got = np.asarray(box_ops.assign_levels(jnp.asarray(boxes)))
  b = boxes.astype(np.float64)
  raw = 4 + np.log2(np.sqrt(np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 0)) / 224 + 1e-8)
  want = np.clip(np.floor(raw), 2, 5) - 2
  # Within float32 rounding of a level boundary either side is right.
  ambiguous = np.abs(raw - np.round(raw)) < tolerance.tol(F32, 8 + tolerance.TRANSCENDENTAL,
                                                          scale=8, worst_case=True)
  ambiguous[-len(exact):] = False  # the canonical sizes are exact in float32 too
  assert np.all((got == want) | ambiguous), np.flatnonzero(got != want)
  assert list(got[-len(exact):]) == [2, 1, 3, 0, 3, 0, 0]
  assert got.dtype == np.int32 and set(np.unique(got)) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- anchors

def np_level_anchors(fh, fw, stride, size, ratios):
  out = []
  for y in range(fh):
    for x in range(fw):
      for a in ratios:
        w = math.sqrt(size * size / a)
        h = a * w
        out.append((x * stride - w / 2, y * stride - h / 2, x * stride + w / 2, y * stride + h / 2))
  return np.asarray(out)


@pytest.mark.parametrize('fh,fw,stride,size', [(5, 7, 4, 32), (3, 2, 64, 512), (1, 1, 16, 128)])
def test_level_anchors_match_definition(fh, fw, stride, size):
  ratios = (0.5, 1.0, 2.0)
  got = np.asarray(anchor_ops.level_anchors(fh, fw, stride, size, ratios))
  want = np_level_anchors(fh, fw, stride, size, ratios)
  assert got.shape == (fh * fw * 3, 4) and got.dtype == np.float32
  scale = stride * max(fh, fw) + size  # the coordinates' magnitude
  tolerance.assert_close(got, want, atol=tolerance.tol(F32, 4, scale=scale, worst_case=True),
                         what=f'anchors stride {stride}')


def test_all_anchors_counts():
  levels = anchor_ops.all_anchors((96, 160), (4, 8, 16, 32, 64), (32, 64, 128, 256, 512),
                                  (0.5, 1.0, 2.0))
  # P6 is a stride-2 1x1 max-pool of P5 (3 x 5): ceil -> 2 x 3.
  sizes = [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
  assert [a.shape for a in levels] == [(h * w * 3, 4) for h, w in sizes]
  with pytest.raises(ValueError, match='one size per level'):
    anchor_ops.all_anchors((64, 64), (4, 8), (32,), (1.0,))


# ----------------------------------------------------------------------------- matching

def np_match(iou, valid, thresholds, labels, low_quality):
  """detectron2's Matcher on the valid gt rows (a gt overlapping nothing makes no low-quality match)."""
  g, n = iou.shape
  rows = np.flatnonzero(valid)
  if not rows.size:
    return np.zeros(n, int), np.full(n, labels[0])
  matched, label = np.zeros(n, int), np.zeros(n, int)
  # Thresholds compared in float32, as torch compares a float32 tensor with a Python float.
  bounds = [-np.inf] + [F32(t) for t in thresholds] + [np.inf]
  for j in range(n):
    best, arg = -1.0, 0
    for i in rows:  # first maximum
      if iou[i, j] > best:
        best, arg = iou[i, j], i
    matched[j] = arg
    for k, lab in enumerate(labels):
      if bounds[k] <= best < bounds[k + 1]:
        label[j] = lab
  if low_quality:
    for i in rows:
      top = iou[i].max()
      if top > 0:
        label[iou[i] == top] = 1
  return matched, label


@pytest.mark.parametrize('thresholds,labels,low_quality', [((0.3, 0.7), (0, -1, 1), True),
                                                            ((0.5,), (0, 1), False),
                                                            ((0.5,), (0, 1), True)])
def test_match_matches_reference(thresholds, labels, low_quality):
  rng = np.random.default_rng(4)
  fn = jax.jit(lambda iou, v: matching.match(iou, v, thresholds, labels, low_quality))
  no_gt = 0
  for seed in range(30):
    g, n = 6, 80
    # IoUs on a grid of tenths: ties between gts, ties for each gt's best, values on the thresholds.
    iou = (rng.integers(0, 11, (g, n)) / 10.0).astype(F32)
    iou[rng.random((g, n)) < 0.5] = 0
    if seed % 3 == 0:
      iou[2] = iou[1]  # a duplicated gt: full ties
    valid = rng.random(g) < 0.7
    if seed % 5 == 0:
      valid[:] = False  # an image without gt
    if seed % 7 == 1:
      iou[np.flatnonzero(valid)[:1]] = 0  # a valid gt that overlaps nothing
    got_m, got_l = (np.asarray(x) for x in fn(jnp.asarray(iou), jnp.asarray(valid)))
    want_m, want_l = np_match(iou, valid, thresholds, labels, low_quality)
    np.testing.assert_array_equal(got_l, want_l)
    np.testing.assert_array_equal(got_m, want_m)
    assert got_m.dtype == np.int32 and got_l.dtype == np.int32
    if valid.any():
      assert np.all(valid[got_m])  # padding never matches
    else:
      assert np.all(got_l == labels[0])
      no_gt += 1
  assert no_gt > 0


def test_match_on_boxes_and_empty_gt():
  rng = np.random.default_rng(5)
  anchors = np.asarray(anchor_ops.level_anchors(12, 12, 8, 32, (0.5, 1.0, 2.0)))
  gt = clustered_boxes(rng, 5, 2, extent=96)
  valid = np.array([True, True, True, False, True])
  iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(gt), jnp.asarray(anchors)))
  got = matching.match(jnp.asarray(iou), jnp.asarray(valid), (0.3, 0.7), (0, -1, 1), True)
  want = np_match(iou, valid, (0.3, 0.7), (0, -1, 1), True)
  np.testing.assert_array_equal(np.asarray(got[1]), want[1])
  np.testing.assert_array_equal(np.asarray(got[0]), want[0])
  assert np.sum(want[1] == 1) >= valid.sum() - 1  # every gt got at least its best anchor
  m, lab = matching.match(jnp.zeros((0, 10)), jnp.zeros((0,), bool), (0.5,), (0, 1), False)
  assert np.all(np.asarray(lab) == 0) and np.asarray(m).shape == (10,)


def test_subsample_counts_and_randomness():
  rng = np.random.default_rng(6)
  fn = jax.jit(jax.vmap(lambda lab, k: matching.subsample(lab, 64, 0.25, k), in_axes=(None, 0)))
  keys = jax.random.split(jax.random.key(0), 100)
  for num_pos, num_neg in [(40, 500), (5, 500), (40, 20), (0, 30), (0, 0), (200, 0)]:
    labels = np.full(600, -1)
    idx = rng.permutation(600)
    labels[idx[:num_pos]] = 1
    labels[idx[num_pos:num_pos + num_neg]] = 0
    pos, neg = (np.asarray(x) for x in fn(jnp.asarray(labels, jnp.int32), keys))
    want_pos = min(num_pos, int(64 * 0.25))
    want_neg = min(num_neg, 64 - want_pos)
    assert np.all(pos.sum(1) == want_pos) and np.all(neg.sum(1) == want_neg), (num_pos, num_neg)
    assert not np.any(pos & neg)
    assert np.all(labels[np.nonzero(pos)[1]] == 1) and np.all(labels[np.nonzero(neg)[1]] == 0)
    for chosen, count, total in [(pos, want_pos, num_pos), (neg, want_neg, num_neg)]:
      if 0 < count < total:
        # Different keys choose different sets, and each candidate is chosen by
        # some key: one picked with probability p = count / total >= 0.2 is
        # left out by all 100 keys with probability (1 - p)^100 < 3e-10.
        assert len({tuple(np.flatnonzero(c)) for c in chosen}) > 90
        if count / total >= 0.2:
          assert np.all(chosen.sum(0)[labels == (1 if chosen is pos else 0)] > 0)


# ----------------------------------------------------------------------------- NMS

def np_greedy_nms(boxes, scores, idxs, valid, thr):
  """Greedy NMS: by decreasing score, lower index first on ties; IoU in float64."""
  order = sorted(np.flatnonzero(valid), key=lambda i: (-float(scores[i]), i))
  b = boxes.astype(np.float64)
  area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  keep = []
  for i in order:
    if keep:
      k = np.asarray(keep)
      iw = np.maximum(np.minimum(b[k, 2], b[i, 2]) - np.maximum(b[k, 0], b[i, 0]), 0)
      ih = np.maximum(np.minimum(b[k, 3], b[i, 3]) - np.maximum(b[k, 1], b[i, 1]), 0)
      inter = iw * ih
      iou = np.where(inter > 0, inter / np.where(inter > 0, area[k] + area[i] - inter, 1), 0)
      if np.any((iou > thr) & (idxs[k] == idxs[i])):
        continue
    keep.append(i)
  return keep


def _check_nms(fn, boxes, scores, idxs, valid, thr, max_output):
  ind, ok = (np.asarray(x) for x in fn(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(idxs),
                                       jnp.asarray(valid)))
  want = np_greedy_nms(boxes, scores, idxs, valid, thr)[:max_output]
  got = list(ind[ok])
  assert ok.dtype == bool and ind.dtype == np.int32 and ind.shape == (max_output,)
  assert np.all(ok[:len(got)]) and np.all(ind[~ok] == 0)  # kept slots first, then padding
  return got == want, len(want)


def test_nms_matches_greedy_reference():
  rng = np.random.default_rng(7)
  n, thr = 200, 0.5
  # One tile (the default for N=200), and tiles of 16 and 7 (padding N to a multiple).
  fns = {(m, t): jax.jit(lambda b, s, i, v, m=m, t=t: nms_ops.nms(b, s, v, thr, m, tile=t))
         for m, t in [(200, 256), (15, 256), (200, 16), (15, 7)]}
  cases = mismatches = kept = 0
  for seed in range(40):
    boxes = clustered_boxes(rng, n, clusters=rng.integers(3, 20))
    scores = rng.random(n).astype(F32)
    if seed % 2:
      scores = np.round(scores * 8).astype(F32) / 8  # many exact ties
    valid = rng.random(n) < 0.9
    for (m, _), fn in fns.items():
      same, k = _check_nms(fn, boxes, scores, np.zeros(n, int), valid, thr, m)
      cases, mismatches, kept = cases + 1, mismatches + (not same), kept + k
  print(f'NMS: {cases} cases, {mismatches} mismatches, {kept} boxes kept in all')
  assert mismatches == 0 and kept > 0


def test_nms_ties_invalid_empty_and_large():
  same = np.array([[0, 0, 10, 10]] * 4, F32)
  ind, ok = nms_ops.nms(jnp.asarray(same), jnp.full((4,), 0.5), jnp.array([False, True, True, True]),
                        0.5, 3)
  assert list(np.asarray(ind)) == [1, 0, 0] and list(np.asarray(ok)) == [True, False, False]
  ind, ok = nms_ops.nms(jnp.asarray(same), jnp.ones(4), jnp.zeros(4, bool), 0.5, 3)
  assert not np.asarray(ok).any() and np.all(np.asarray(ind) == 0)
  ind, ok = nms_ops.nms(jnp.zeros((0, 4)), jnp.zeros((0,)), jnp.zeros((0,), bool), 0.5, 5)
  assert np.asarray(ind).shape == (5,) and not np.asarray(ok).any()
  # A few thousand boxes (the RPN's per-image candidates), more kept than slots.
  rng = np.random.default_rng(8)
  boxes = clustered_boxes(rng, 3000, 150, extent=1000)
  scores = rng.random(3000).astype(F32)
  fn = jax.jit(lambda b, s, i, v: nms_ops.nms(b, s, v, 0.7, 1000))
  same, k = _check_nms(fn, boxes, scores, np.zeros(3000, int), np.ones(3000, bool), 0.7, 1000)
  assert same and k == 1000


def test_batched_nms_never_suppresses_across_ids():
  rng = np.random.default_rng(9)
  n, thr = 150, 0.5
  fn = jax.jit(lambda b, s, i, v: nms_ops.batched_nms(b, s, i, v, thr, 150, tile=32))
  for _ in range(10):
    boxes = clustered_boxes(rng, n, 6)
    scores = rng.random(n).astype(F32)
    idxs = rng.integers(0, 4, n)
    same, _ = _check_nms(fn, boxes, scores, idxs, np.ones(n, bool), thr, 150)
    assert same
  # Identical boxes in different groups are all kept.
  box = np.tile(np.array([[5, 5, 50, 50]], F32), (4, 1))
  ind, ok = nms_ops.batched_nms(jnp.asarray(box), jnp.array([.9, .8, .7, .6]), jnp.array([0, 1, 0, 2]),
                                jnp.ones(4, bool), 0.5, 4)
  assert list(np.asarray(ind)[np.asarray(ok)]) == [0, 1, 3]


def test_nms_and_mask_targets_compile_once():
  traces = {'nms': 0, 'mask': 0}

  def nms_fn(b, s, v):
    traces['nms'] += 1
    return nms_ops.nms(b, s, v, 0.5, 10)

  def mask_fn(m, g, p, i):
    traces['mask'] += 1
    return mt.mask_targets(m, g, p, i)

  nms_jit, mask_jit = jax.jit(nms_fn), jax.jit(mask_fn)
  rng = np.random.default_rng(10)
  for _ in range(2):
    b = clustered_boxes(rng, 50, 4)
    nms_jit(b, rng.random(50).astype(F32), rng.random(50) < 0.8)
    mask_jit((rng.random((3, 16, 16)) < 0.5).astype(np.uint8), random_boxes(rng, 3),
             random_boxes(rng, 7), rng.integers(0, 3, 7).astype(np.int32))
  assert traces == {'nms': 1, 'mask': 1}
  # And under vmap over images (how the model calls it).
  batched = jax.jit(jax.vmap(lambda b, s, v: nms_ops.nms(b, s, v, 0.5, 10)))
  b = np.stack([clustered_boxes(rng, 50, 4) for _ in range(3)])
  s, v = rng.random((3, 50)).astype(F32), rng.random((3, 50)) < 0.8
  ind, ok = batched(b, s, v)
  for k in range(3):
    want = np_greedy_nms(b[k], s[k], np.zeros(50, int), v[k], 0.5)[:10]
    assert list(np.asarray(ind[k])[np.asarray(ok[k])]) == want


# ----------------------------------------------------------------------------- mask targets

def np_roi_align(img, box, out, ratio_y, ratio_x):
  """torchvision roi_align(aligned=True) of one [H, W] map, float64, separable weights."""
  h, w = img.shape
  x1, y1, x2, y2 = np.asarray(box, np.float64) - 0.5

  def weights(lo, hi, ratio, length):
    bins = (hi - lo) / out
    c = lo + (np.arange(out)[:, None] + (np.arange(ratio)[None, :] + 0.5) / ratio) * bins
    c = c.reshape(-1)
    on_map = (c >= -1) & (c <= length)  # torchvision: samples beyond one pixel read 0
    c = np.maximum(c, 0.0)
    lo_i = np.floor(c).astype(int)
    edge = lo_i >= length - 1  # at the last pixel: all weight on it
    frac = np.where(edge, 0.0, c - lo_i)
    lo_i = np.minimum(lo_i, length - 1)
    hi_i = np.minimum(lo_i + 1, length - 1)
    wts = np.zeros((c.size, length))
    rows = np.arange(c.size)
    np.add.at(wts, (rows, lo_i), np.where(on_map, 1 - frac, 0))
    np.add.at(wts, (rows, hi_i), np.where(on_map, frac, 0))
    return wts

  wy, wx = weights(y1, y2, ratio_y, h), weights(x1, x2, ratio_x, w)
  return (wy @ img @ wx.T).reshape(out, ratio_y, out, ratio_x).mean(axis=(1, 3))


def crop_and_resize(full, box, out):
  """detectron2's BitMasks.crop_and_resize: aligned RoIAlign with adaptive sampling (ratio 0)."""
  ry = max(1, math.ceil((box[3] - box[1]) / out))
  rx = max(1, math.ceil((box[2] - box[0]) / out))
  return np_roi_align(full.astype(np.float64), box, out, ry, rx)


def random_blob(rng, canvas, size):
  """A full-resolution binary instance (a union of ellipses) about `size` pixels across."""
  yy, xx = np.mgrid[:canvas, :canvas] + 0.5
  centre = rng.uniform(size, canvas - size, 2)
  mask = np.zeros((canvas, canvas), bool)
  for _ in range(rng.integers(2, 6)):
    c = centre + rng.normal(0, size / 5, 2)
    ax = rng.uniform(size / 8, size / 2.5, 2)
    t = rng.uniform(0, np.pi)
    dx, dy = xx - c[0], yy - c[1]
    u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
    mask |= (u / ax[0])**2 + (v / ax[1])**2 <= 1
  ys, xs = np.nonzero(mask)
  return mask, np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def _mask_case(rng, m, g=6, r=48, canvas=192):
  fulls, boxes, local = [], [], []
  for _ in range(g):
    full, box = random_blob(rng, canvas, rng.uniform(12, 60))
    fulls.append(full)
    boxes.append(box)
    local.append(crop_and_resize(full, box, m) >= 0.5)  # the box-local gt mask
  boxes = np.asarray(boxes)
  matched = rng.integers(0, g, r)
  b = boxes[matched]
  wh = b[:, 2:] - b[:, :2]
  props = b + rng.normal(0, 0.12, (r, 4)) * np.concatenate([wh, wh], 1)
  props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 2)
  return fulls, boxes.astype(F32), np.asarray(local, np.uint8), props.astype(F32), matched


def np_box_local_target(local, gt_box, prop, size, ratio):
  m = local.shape[0]
  gt_box, prop = gt_box.astype(np.float64), prop.astype(np.float64)
  sx, sy = m / (gt_box[2] - gt_box[0]), m / (gt_box[3] - gt_box[1])
  cells = np.array([(prop[0] - gt_box[0]) * sx, (prop[1] - gt_box[1]) * sy,
                    (prop[2] - gt_box[0]) * sx, (prop[3] - gt_box[1]) * sy])
  big = np.zeros((m + 40, m + 40))  # zeros well past anything a sample reaches
  big[20:20 + m, 20:20 + m] = local
  return np_roi_align(big, cells + 20, size, ratio, ratio)


def test_mask_targets_box_local_reference_and_full_resolution():
  rng = np.random.default_rng(11)
  size = 28
  report = {}
  for m in (32, 56, 112):
    fulls, gt_boxes, local, props, matched = _mask_case(rng, m)
    got = np.asarray(mask_targets_jit(jnp.asarray(local), jnp.asarray(gt_boxes), jnp.asarray(props),
                                     jnp.asarray(matched, jnp.int32), size=size))
    assert got.shape == (len(props), size, size) and got.dtype == np.float32
    assert set(np.unique(got)) <= {0.0, 1.0}
    ratio = max(1, math.ceil(m / size))
    ref = np.stack([np_box_local_target(local[j], gt_boxes[j], p, size, ratio)
                    for p, j in zip(props, matched)])
    # The same procedure: equal except where the sampled value is within float32
    # rounding of 0.5 (positions of magnitude ~ 2 M, a dozen roundings each).
    near = np.abs(ref - 0.5) <= tolerance.tol(F32, 16, scale=4 * m, worst_case=True)
    differ = got != (ref >= 0.5)
    assert np.all(near[differ]), (m, int(differ.sum()))
    assert differ.sum() <= 3, (m, int(differ.sum()))
    print(f'M={m}: {int(differ.sum())} of {differ.size} target pixels differ from the NumPy '
          f'box-local reference (allowed only within rounding of 0.5)')

    # Against the exact target: the full-resolution mask sampled in the proposal.
    exact = np.stack([crop_and_resize(fulls[j], p, size) >= 0.5 for p, j in zip(props, matched)])
    wrong = got != exact
    report[m] = wrong.mean()
    # Every disagreement lies at the instance's boundary: within two mask
    # cells (the box-local resampling, one cell of bilinear reach) plus one
    # target bin and one pixel of the boundary.
    for k, (p, j) in enumerate(zip(props, matched)):
      if not wrong[k].any():
        continue
      full = fulls[j]
      dist = np.maximum(ndimage.distance_transform_edt(full), ndimage.distance_transform_edt(~full))
      gw, gh = gt_boxes[j, 2] - gt_boxes[j, 0], gt_boxes[j, 3] - gt_boxes[j, 1]
      bw, bh = (p[2] - p[0]) / size, (p[3] - p[1]) / size
      band = 2 * math.hypot(gw / m, gh / m) + math.hypot(bw, bh) + 1.5
      iy, ix = np.nonzero(wrong[k])
      cy = np.clip((p[1] + (iy + 0.5) * bh).astype(int), 0, full.shape[0] - 1)
      cx = np.clip((p[0] + (ix + 0.5) * bw).astype(int), 0, full.shape[1] - 1)
      assert np.all(dist[cy, cx] <= band), (m, k, dist[cy, cx].max(), band)
  print('mask targets, fraction of pixels differing from the full-resolution target: '
        + ', '.join(f'M={m}: {f:.4f}' for m, f in report.items()))
  # The band above bounds each proposal's disagreement; overall it is a thin
  # boundary strip of instances tens of pixels across: a few percent at most.
  assert report[112] <= 0.03 and report[32] <= 0.08


def test_mask_targets_outside_gt_box_is_background():
  # A full mask: the target is 1 exactly over the gt box's part of the proposal.
  # A padding gt row (a zero box) gives a finite, empty target.
  gt = np.array([[20, 20, 60, 60], [0, 0, 0, 0]], F32)
  props = np.array([[0, 0, 80, 80], [20, 20, 60, 60], [70, 70, 90, 90], [10, 10, 30, 30]], F32)
  got = np.asarray(mask_targets_jit(jnp.ones((2, 32, 32), jnp.uint8), jnp.asarray(gt),
                                   jnp.asarray(props), jnp.array([0, 0, 0, 1], jnp.int32), size=8))
  inside = np.zeros((8, 8))
  inside[2:6, 2:6] = 1  # bins of 10 px: the box covers bins 2..5
  np.testing.assert_array_equal(got[0], inside)
  assert np.all(got[1] == 1) and np.all(got[2] == 0) and np.all(got[3] == 0)


# ----------------------------------------------------------------------------- paste_masks

def np_paste(mask, box, h, w):
  """detectron2 _do_paste_mask on the whole image: grid_sample(align_corners=False), zero padding."""
  s = mask.shape[0]
  x0, y0, x1, y1 = box.astype(np.float64)
  gy = ((np.arange(h) + 0.5) - y0) / (y1 - y0) * 2 - 1
  gx = ((np.arange(w) + 0.5) - x0) / (x1 - x0) * 2 - 1
  iy = ((gy + 1) * s - 1) / 2
  ix = ((gx + 1) * s - 1) / 2
  iy, ix = np.meshgrid(iy, ix, indexing='ij')
  y0i, x0i = np.floor(iy).astype(int), np.floor(ix).astype(int)
  out = np.zeros((h, w))
  for dy in (0, 1):
    for dx in (0, 1):
      yi, xi = y0i + dy, x0i + dx
      wt = (1 - np.abs(iy - yi)) * (1 - np.abs(ix - xi))
      inb = (yi >= 0) & (yi < s) & (xi >= 0) & (xi < s)
      out += np.where(inb, wt * mask[np.clip(yi, 0, s - 1), np.clip(xi, 0, s - 1)], 0)
  return out, max(np.abs(iy).max(), np.abs(ix).max())


def test_paste_masks_matches_grid_sample_reference():
  rng = np.random.default_rng(12)
  h, w, d = 70, 90, 12
  boxes = random_boxes(rng, d, extent=90, min_size=0.5, max_size=60)
  boxes[0] = [-10, -5, 30, 20]  # partly outside the image
  boxes[1] = [5, 5, 5, 9]       # empty
  probs = rng.random((d, 28, 28)).astype(F32)
  got = mt.paste_masks(probs, boxes, (h, w))
  assert got.shape == (d, h, w) and got.dtype == bool
  assert not got[1].any()
  differ_total = 0
  for k in [0] + list(range(2, d)):
    ref, coord = np_paste(probs[k].astype(np.float64), boxes[k], h, w)
    near = np.abs(ref - 0.5) <= tolerance.tol(F32, 16, scale=coord, worst_case=True)
    differ = got[k] != (ref >= 0.5)
    assert np.all(near[differ]), k
    differ_total += differ.sum()
  print(f'paste_masks: {differ_total} pixels differ from the grid_sample reference')
  assert differ_total <= 3
  with pytest.raises(ValueError, match='must be > 0'):
    mt.paste_masks(probs, boxes, (h, w), threshold=0.0)
