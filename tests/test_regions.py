"""Region cutting (`model.cut_regions`): reshape path vs RoIAlign path vs slices.

Features are random FPN-like maps of G = 2 montage groups at 64 px canvases
(P2..P5 = 16, 8, 4, 2 px; regions are 2 x 2). Tolerance between the reshape
and the RoIAlign paths (tests/tolerance.py): a RoIAlign output is a
weighted sum of 4 bilinear taps (one sample per bin), at most 4 + 2
roundings relative to the largest feature (`roi_align`'s own bound); with
aligned boxes on pixel centres the weights are 1 and 0, so the measured
error is 0.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mcl_100ep
from mcl_jax.pretext import montage
from mcl_jax.nn.model import cut_regions
from tests import tolerance


def _roi_tol(feats):
  """One sample of 4 bilinear taps per bin: gamma_{4 + 2} max |feature|."""
  return tolerance.tol(np.float32, 4 + 2, max(float(np.abs(f).max()) for f in feats.values()),
                       worst_case=True)

B, S, G, C = 32, 64, 2, 3
K = S // 32  # region side
LEVELS = (0, 1, 2, 3)


def _layout(kind):
  m = mcl_100ep.get_config().montage
  m.group_size = B
  m.layout = kind
  return montage.make_layout(m, S)


def _feats(layout, seed):
  rng = np.random.default_rng(seed)
  n = G * layout.num_canvases
  return {f'P{l}': jnp.asarray(rng.standard_normal((n, S >> l, S >> l, C)).astype(np.float32))
          for l in range(2, 6)}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _cut(feats, layout, levels, mode, path):
  """cut_regions under jit: (regions, sizes as an array, per level the taken
  rows of the flattened regions, a stand-in for the neck output)."""
  regions, sizes, take = cut_regions(feats, layout, levels, mode, path, K)
  flat = regions.reshape(regions.shape[0], -1)
  return regions, jnp.asarray(sizes), [take[i](flat).reshape(-1, K, K, C) for i in levels]


def cut(feats, layout, levels, mode, path):
  regions, sizes, taken = _cut(feats, layout, levels, mode, path)
  return (np.asarray(regions), tuple(int(x) for x in sizes),
          {i: np.asarray(t) for i, t in zip(levels, taken)})


def _manual_tiles(feats, layout, level):
  """[G * T, K, K, C]: each tile of `level` sliced by hand from its canvas map."""
  lvl = layout.fpn_level(level)
  fmap, stride = np.asarray(feats[f'P{lvl}']), 2**lvl
  nc, out = layout.num_canvases, []
  for g in range(G):
    for canvas, y0, x0 in layout.tiles(level):
      y, x = y0 // stride, x0 // stride
      out.append(fmap[g * nc + canvas, y:y + K, x:x + K])
  return np.stack(out)


@pytest.fixture(scope='module')
def grid_case():
  layout = _layout('grid')
  return layout, _feats(layout, 0)


@pytest.mark.parametrize('mode', ['all', 'used'])
def test_reshape_equals_roi_align(grid_case, mode):
  layout, feats = grid_case
  r1, s1, t1 = cut(feats, layout, LEVELS, mode, 'reshape')
  r2, s2, t2 = cut(feats, layout, LEVELS, mode, 'roi_align')
  assert s1 == s2
  nc = G * layout.num_canvases
  if mode == 'all':  # every canvas at every FPN level, P2 first
    assert s1 == (nc * 64, nc * 16, nc * 4, nc)
  else:  # only each level's own tiles, P2 (level 3) first
    assert s1 == tuple(G * layout.num_tiles(i) for i in (3, 2, 1, 0))
  assert r1.shape == (sum(s1), K, K, C)
  tol = _roi_tol(feats)
  tolerance.check(float(np.abs(r1 - r2).max()), tol, f'cut_regions {mode}: reshape vs roi_align')
  for level in LEVELS:
    want = _manual_tiles(feats, layout, level)
    a, b = t1[level], t2[level]
    assert a.shape == want.shape == (G * layout.num_tiles(level), K, K, C)
    np.testing.assert_array_equal(a, want)
    tolerance.check(np.abs(b - want).max(), tol, f'cut_regions {mode}: roi_align vs slices')


def test_used_regions_come_from_the_right_canvases(grid_case):
  """'used': level i's rows are exactly level i's canvases' cells of P(5 - i)."""
  layout, feats = grid_case
  regions, sizes, taken = cut(feats, layout, LEVELS, 'used', 'reshape')
  offsets = np.cumsum((0,) + sizes)
  nc = layout.num_canvases
  for level in LEVELS:
    lvl = layout.fpn_level(level)
    block_index = {0: 3, 1: 2, 2: 1, 3: 0}[level]  # sizes are in ascending FPN level
    rows = regions[offsets[block_index]:offsets[block_index + 1]]
    start, block = layout.grid_block(level)
    r = block.grid
    fmap = np.asarray(feats[f'P{lvl}'])
    # Manual slicing: canvas-major, then row-major tiles.
    want = []
    for g in range(G):
      for c in range(block.count):
        canvas = fmap[g * nc + start + c]
        for ty in range(r):
          for tx in range(r):
            want.append(canvas[ty * K:(ty + 1) * K, tx * K:(tx + 1) * K])
    np.testing.assert_array_equal(rows, np.stack(want))
    np.testing.assert_array_equal(taken[level], np.stack(want))


def test_subset_of_levels(grid_case):
  """Only level 0 (the target's use): one group of rows, P5 only."""
  layout, feats = grid_case
  for mode in ('all', 'used'):
    regions, sizes, taken = cut(feats, layout, (0,), mode, 'reshape')
    assert len(sizes) == 1 and set(taken) == {0}
    np.testing.assert_array_equal(taken[0], _manual_tiles(feats, layout, 0))


def test_mixed_layout_roi_path():
  layout = _layout('mixed')
  feats = _feats(layout, 1)
  regions, sizes, taken = cut(feats, layout, LEVELS, 'used', 'roi_align')
  assert sizes == tuple(G * layout.num_tiles(i) for i in (3, 2, 1, 0))
  err = 0.0
  for level in LEVELS:
    want = _manual_tiles(feats, layout, level)
    got = taken[level]
    assert got.shape == want.shape
    err = max(err, np.abs(got - want).max())
  tolerance.check(err, _roi_tol(feats), 'cut_regions mixed roi_align vs slices')
  with pytest.raises(AssertionError):
    cut_regions(feats, layout, LEVELS, 'used', 'reshape', K)
  with pytest.raises(AssertionError):
    cut_regions(feats, layout, LEVELS, 'all', 'roi_align', K)


def test_bad_options(grid_case):
  layout, feats = grid_case
  with pytest.raises(AssertionError):
    cut_regions(feats, layout, LEVELS, 'some', 'reshape', K)
  with pytest.raises(AssertionError):
    cut_regions(feats, layout, LEVELS, 'all', 'crop', K)
