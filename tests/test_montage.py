"""Montage assembly (docs/METHOD.md section 2) against a direct NumPy check.

Every tile of every canvas is cut out with NumPy at the position the layout
gives (`Layout.boxes` / `Layout.tiles`) and compared with the crop its label
names, downsampled independently here ('nearest' = x[::r, ::r], exact;
'antialias' = r x r block mean in float64: the float32 mean of r^2 values
of unit scale, tests/tolerance.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mcl_100ep
from mcl_jax.pretext import montage

from tests import tolerance

B, S = 32, 64  # group size, canvas side
C = 2  # channels: few, to keep the tests light

# One compile per (layout, method); the tests share shapes (2 groups, C channels).
_assemble = jax.jit(montage.assemble, static_argnums=(2, 4))


def _cfg(layout='grid'):
  m = mcl_100ep.get_config().montage
  m.group_size = B
  m.layout = layout
  return m


@pytest.fixture(scope='module')
def grid_layout():
  return montage.make_layout(_cfg('grid'), S)


@pytest.fixture(scope='module')
def mixed_layout():
  return montage.make_layout(_cfg('mixed'), S)


def _crops(rng, num_groups, channels=C):
  return [rng.standard_normal((num_groups * B, S, S, channels)).astype(np.float32)
          for _ in range(4)]


def _np_down(x, r, method):
  if method == 'nearest':
    return x[::r, ::r]
  h, w, c = x.shape
  return x.reshape(h // r, r, w // r, r, c).mean(axis=(1, 3))


def check_tiles(layout, crops, canvases, labels, group_ids, method='nearest'):
  """Every tile equals its labelled, downsampled crop; returns max abs error."""
  canvases, labels = np.asarray(canvases), [np.asarray(l) for l in labels]
  nc = layout.num_canvases
  assert canvases.shape == (len(group_ids) * nc, S, S, crops[0].shape[-1])
  err = 0.0
  for j, gid in enumerate(group_ids):
    coverage = np.zeros((nc, S, S), np.int32)
    for level in range(layout.num_levels):
      tiles, boxes = layout.tiles(level), layout.boxes(level)
      t = len(tiles)
      assert labels[level].shape == (len(group_ids) * t,)
      lab = labels[level][j * t:(j + 1) * t]
      assert lab.min() >= gid * B and lab.max() < (gid + 1) * B
      r = layout.grids[level]
      for (canvas, y0, x0), (bx1, by1, bx2, by2), l in zip(tiles, boxes, lab):
        # The boxes describe the tile positions.
        assert (bx1, by1, bx2 - bx1, by2 - by1) == (x0, y0, S // r, S // r)
        got = canvases[j * nc + canvas, int(by1):int(by2), int(bx1):int(bx2)]
        want = _np_down(crops[level][j * B + l - gid * B], r, method)
        err = max(err, np.abs(got - want).max())
        coverage[canvas, y0:y0 + S // r, x0:x0 + S // r] += 1
    # Tiles partition every canvas: no gap, no overlap.
    assert (coverage == 1).all()
  return err


def test_grid_layout_shape(grid_layout):
  lay = grid_layout
  assert lay.grids == (1, 2, 4, 8) and lay.is_grid
  assert [b.count for b in lay.blocks] == [32, 8, 2, 1]
  assert lay.num_canvases == 43
  assert [lay.num_tiles(i) for i in range(4)] == [32, 32, 32, 64]


@pytest.mark.parametrize('method', ['nearest', 'antialias'])
def test_grid_tiles_are_labelled_crops(grid_layout, method):
  rng = np.random.default_rng(0)
  crops = _crops(rng, 2)
  group_ids = np.array([3, 5], np.int32)
  canvases, labels = _assemble([jnp.asarray(c) for c in crops], jax.random.key(1),
                               grid_layout, jnp.asarray(group_ids), method)
  err = check_tiles(grid_layout, crops, canvases, labels, group_ids, method)
  # 'nearest' copies values: exact. 'antialias': a mean over r x r values
  # (r <= 8) of N(0, 1) crops; its result's scale is at most theirs.
  r = max(grid_layout.grids)
  tol = 0.0 if method == 'nearest' else tolerance.tol(np.float32, r * r, 1.0)
  tolerance.check(err, tol, f'montage grid {method}')
  # Level 0 canvases are the crops themselves, labels in order.
  np.testing.assert_array_equal(np.asarray(labels[0]),
                                np.concatenate([np.arange(B) + g * B for g in group_ids]))


def test_grid_each_image_once_or_twice(grid_layout):
  rng = np.random.default_rng(1)
  crops = [jnp.asarray(c) for c in _crops(rng, 2)]
  group_ids = np.array([1, 7], np.int32)
  _, labels = _assemble(crops, jax.random.key(2), grid_layout, jnp.asarray(group_ids),
                        'nearest')
  for level, times in ((1, 1), (2, 1), (3, 2)):
    lab = np.asarray(labels[level]).reshape(2, -1)
    for j, gid in enumerate(group_ids):
      counts = np.bincount(lab[j] - gid * B, minlength=B)
      assert counts.shape == (B,) and (counts == times).all(), (level, gid, counts)


def test_keys_and_groups_change_assignments(grid_layout):
  rng = np.random.default_rng(2)
  crops = [jnp.asarray(c) for c in _crops(rng, 2)]
  ids = jnp.asarray([0, 1], jnp.int32)
  _, lab_a = _assemble(crops, jax.random.key(0), grid_layout, ids, 'nearest')
  _, lab_b = _assemble(crops, jax.random.key(1), grid_layout, ids, 'nearest')
  _, lab_a2 = _assemble(crops, jax.random.key(0), grid_layout, ids, 'nearest')
  for level in (1, 2, 3):
    a, b = np.asarray(lab_a[level]), np.asarray(lab_b[level])
    assert (a != b).mean() > 0.5  # a fresh permutation per key
    np.testing.assert_array_equal(a, np.asarray(lab_a2[level]))  # deterministic
    # The two groups use different permutations (fold_in of the group id).
    a = a.reshape(2, -1)
    assert (a[0] != a[1] - B).mean() > 0.5


def test_assemble_under_jit(grid_layout):
  rng = np.random.default_rng(3)
  crops = [jnp.asarray(c) for c in _crops(rng, 2)]
  ids = jnp.asarray([4, 9], jnp.int32)
  key = jax.random.key(5)
  fn = jax.jit(montage.assemble, static_argnums=(2, 4))
  canv_j, lab_j = fn(crops, key, grid_layout, ids, 'nearest')
  canv_e, lab_e = montage.assemble(crops, key, grid_layout, ids, 'nearest')
  np.testing.assert_array_equal(np.asarray(canv_j), np.asarray(canv_e))
  for a, b in zip(lab_j, lab_e):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  err = check_tiles(grid_layout, [np.asarray(c) for c in crops], canv_j, lab_j, [4, 9])
  assert err == 0.0


@pytest.mark.parametrize('axis_type', ['default', 'auto'])
def test_sharded_assemble_matches_unsharded(grid_layout, axis_type):
  """8 devices, one group each; the default make_mesh has Explicit axes."""
  if jax.device_count() < 8:  # tests/conftest.py simulates 8 unless XLA_FLAGS is set outside
    pytest.skip(f'needs 8 devices, has {jax.device_count()}')
  if axis_type == 'default':
    mesh = jax.make_mesh((8,), ('data',))
  else:
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(4)
  crops = [jnp.asarray(c) for c in _crops(rng, 8, channels=1)]
  key = jax.random.key(11)
  fn = jax.jit(montage.sharded_assemble, static_argnums=(2, 3))
  canv_s, lab_s = fn(crops, key, grid_layout, mesh)
  canv_u, lab_u = fn(crops, key, grid_layout, None)
  np.testing.assert_array_equal(np.asarray(canv_s), np.asarray(canv_u))
  for a, b in zip(lab_s, lab_u):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Group g is assembled with global id g on whichever device holds it.
  err = check_tiles(grid_layout, [np.asarray(c) for c in crops], canv_s, lab_s,
                    list(range(8)))
  assert err == 0.0
  assert len(canv_s.sharding.device_set) == 8


def test_mixed_layout(mixed_layout):
  lay = mixed_layout
  assert not lay.is_grid
  assert [b.count for b in lay.blocks] == [32, 4]  # B / 8 mixed canvases
  # Per mixed canvas: one 2x2-level tile (a quadrant), 2 x 4 level-2 tiles,
  # 16 level-3 tiles.
  assert [lay.num_tiles(i) for i in range(4)] == [32, 4 * 1, 4 * 8, 4 * 16]
  rng = np.random.default_rng(6)
  crops = _crops(rng, 2)
  group_ids = np.array([1, 2], np.int32)
  # (antialias downsampling is shared with the grid layout, tested above)
  canvases, labels = _assemble([jnp.asarray(c) for c in crops], jax.random.key(3),
                               lay, jnp.asarray(group_ids), 'nearest')
  err = check_tiles(lay, crops, canvases, labels, group_ids, 'nearest')
  print(f'montage mixed nearest: max abs err {err:.2e} (tol 0)')
  assert err == 0.0
  # Level 2 / 3 tiles of one group are drawn from a permutation: no image
  # appears more than ceil(T / B) times.
  for level in (1, 2, 3):
    lab = np.asarray(labels[level]).reshape(2, -1)
    for j, gid in enumerate(group_ids):
      counts = np.bincount(lab[j] - gid * B, minlength=B)
      assert counts.max() <= -(-lab.shape[1] // B)


def test_make_layout_rejects_bad_grids():
  m = _cfg('grid')
  m.grids = (1, 2, 3, 8)
  with pytest.raises(AssertionError):
    montage.make_layout(m, S)
  m = _cfg('bogus')
  with pytest.raises(AssertionError):
    montage.make_layout(m, S)
