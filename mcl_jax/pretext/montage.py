"""Montage assembly: crops downsampled and tiled onto canvases (docs/METHOD.md section 2).

A montage *group* is the set of `group_size` images that are mixed into one
set of canvases (the reference mixes the 128 images of one GPU). Groups are
independent: group g is assembled with key `fold_in(key, g)` and its labels
are offset by `g * group_size`, so the result does not depend on how many
devices share the work. `assemble` runs per device inside `jax.shard_map`.

The static part of a montage (which tiles exist, where, at which level) is a
`Layout`; the random part (which image fills each tile) is drawn per step.
"""

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Block:
  """`count` canvases sharing one tile pattern.

  Attributes:
    count: canvases in the block (per group).
    tiles: the pattern, ((level, y0, x0), ...) in canvas pixels; a level-i
      tile is image_size / grids[i] pixels wide.
    grid: r when the pattern is a full r x r grid of one level, laid
      row-major (lets assembly and region cutting use reshapes); else 0.
  """
  count: int
  tiles: tuple[tuple[int, int, int], ...]
  grid: int = 0


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of the canvases of one montage group.

  Attributes:
    image_size: canvas (and crop) side in pixels.
    group_size: images per group, B.
    grids: tiles per side at each level, (1, 2, 4, 8) by default; level i
      reads FPN level P(5 - i), whose stride is 32 / grids[i].
    blocks: the canvases, block by block, in the order they are concatenated.
  """
  image_size: int
  group_size: int
  grids: tuple[int, ...]
  blocks: tuple[Block, ...]

  @property
  def num_levels(self) -> int:
    return len(self.grids)

  @property
  def num_canvases(self) -> int:
    return sum(b.count for b in self.blocks)

  def tile_size(self, level: int) -> int:
    return self.image_size // self.grids[level]

  def fpn_level(self, level: int) -> int:
    """FPN level (2..5) read by montage level `level`."""
    return 5 - level

  @property
  def is_grid(self) -> bool:
    return all(b.grid for b in self.blocks)

  def tiles(self, level: int) -> np.ndarray:
    """Tile slots of a level, in label order: [T, 3] (canvas, y0, x0)."""
    out, start = [], 0
    for b in self.blocks:
      for c in range(b.count):
        out += [(start + c, y, x) for (l, y, x) in b.tiles if l == level]
      start += b.count
    return np.asarray(out, np.int32).reshape(-1, 3)

  def num_tiles(self, level: int) -> int:
    return len(self.tiles(level))

  def boxes(self, level: int) -> np.ndarray:
    """[T, 4] tile boxes (x1, y1, x2, y2) in canvas pixels."""
    t = self.tiles(level).astype(np.float32)
    s = self.tile_size(level)
    return np.stack([t[:, 2], t[:, 1], t[:, 2] + s, t[:, 1] + s], axis=1)

  def grid_block(self, level: int) -> tuple[int, Block]:
    """(first canvas, block) of the grid block holding `level` (grid layouts)."""
    start = 0
    for b in self.blocks:
      if b.grid and b.tiles[0][0] == level:
        return start, b
      start += b.count
    raise ValueError(f'no grid block for level {level}')


def _grid_block(level: int, grid: int, count: int, size: int) -> Block:
  s = size // grid
  tiles = tuple((level, r * s, c * s) for r in range(grid) for c in range(grid))
  return Block(count, tiles, grid)


def _mixed_block(count: int, size: int, grids: Sequence[int]) -> Block:
  """Quadrants: one level-1 tile, 2x2 level-2 tiles, 4x4 level-3, 2x2 level-2."""
  h = size // 2
  tiles = [(1, 0, 0)]
  quads = ((2, 0, h), (3, h, 0), (2, h, h))
  for level, y0, x0 in quads:
    r = grids[level] // 2
    s = size // grids[level]
    tiles += [(level, y0 + i * s, x0 + j * s) for i in range(r) for j in range(r)]
  return Block(count, tuple(tiles))


def make_layout(montage_cfg: Any, image_size: int, num_levels: int | None = None) -> Layout:
  """Builds the Layout from `config.montage` (see configs/mcl_100ep.py).

  The config's rules are config_validation's; the asserts only guard
  direct callers.
  """
  grids = tuple(montage_cfg.grids)[:num_levels]
  b = montage_cfg.group_size
  assert grids == tuple(2**i for i in range(len(grids))), grids
  blocks = [_grid_block(0, 1, b, image_size)]  # level 0: the crops themselves
  if montage_cfg.layout == 'grid':
    for i, (g, d) in enumerate(zip(grids[1:], montage_cfg.canvas_divisors[1:]), start=1):
      blocks.append(_grid_block(i, g, b // d, image_size))
  else:
    assert montage_cfg.layout == 'mixed' and len(grids) == 4, (montage_cfg.layout, grids)
    blocks.append(_mixed_block(b // montage_cfg.mixed_canvases_divisor, image_size, grids))
  return Layout(image_size, b, grids, tuple(blocks))


def layout_for(config) -> Layout:
  """The montage Layout of one group under a whole config (one level per loss weight)."""
  return make_layout(config.montage, config.data.image_size, len(config.loss.level_weights))


def downsample(x, factor: int, method: str = 'nearest'):
  """Downsamples NHWC images by an integer factor.

  'nearest' is torch `F.interpolate(scale_factor=1/r)` (takes pixel r*i);
  'antialias' averages each r x r block (a box filter).
  """
  if factor == 1:
    return x
  if method == 'nearest':
    return x[:, ::factor, ::factor]
  if method == 'antialias':
    n, h, w, c = x.shape
    y = x.reshape(n, h // factor, factor, w // factor, factor, c)
    return y.mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)
  raise AssertionError(f'downsample method {method!r}')  # config_validation's rule


def _assemble_group(crops: Sequence[jax.Array], key, layout: Layout, method: str):
  """One group: crops[i] is [B, S, S, C] for level i. Returns canvases, labels."""
  b = layout.group_size
  labels = [jnp.arange(b, dtype=jnp.int32)]
  for level in range(1, layout.num_levels):
    n = layout.num_tiles(level)
    perm = jax.random.permutation(jax.random.fold_in(key, level), n)
    labels.append((perm % b).astype(jnp.int32))
  small = [downsample(c, g, method) for c, g in zip(crops, layout.grids)]
  canvases, used = [], [0] * layout.num_levels
  for block in layout.blocks:
    if block.grid:
      level, r = block.tiles[0][0], block.grid
      lab = labels[level][used[level]:used[level] + block.count * r * r]
      used[level] += block.count * r * r
      t = small[level][lab]
      _, s, _, ch = t.shape
      t = t.reshape(block.count, r, r, s, s, ch).transpose(0, 1, 3, 2, 4, 5)
      canvases.append(t.reshape(block.count, r * s, r * s, ch))
      continue
    canvas = jnp.zeros((block.count, layout.image_size, layout.image_size,
                        crops[0].shape[-1]), crops[0].dtype)
    per_level = {l: sum(1 for t in block.tiles if t[0] == l) for l, _, _ in block.tiles}
    k_in_level = dict.fromkeys(per_level, 0)
    for level, y0, x0 in block.tiles:
      # Slot order is canvas-major, then pattern order within the level.
      idx = used[level] + jnp.arange(block.count) * per_level[level] + k_in_level[level]
      k_in_level[level] += 1
      s = layout.tile_size(level)
      canvas = canvas.at[:, y0:y0 + s, x0:x0 + s].set(small[level][labels[level][idx]])
    for level, k in per_level.items():
      used[level] += block.count * k
    canvases.append(canvas)
  return jnp.concatenate(canvases, axis=0), labels


def assemble(crops: Sequence[jax.Array], key, layout: Layout, group_ids,
             method: str = 'nearest'):
  """Assembles the canvases of several groups.

  Args:
    crops: per level, [G * B, S, S, C] crops (group-major).
    key: PRNG key of this step and view.
    layout: the static Layout.
    group_ids: [G] int32 global indices of these groups; group g uses key
      fold_in(key, g) and its labels are offset by g * B, so that they index
      the globally gathered targets.
    method: 'nearest' or 'antialias' downsampling.

  Returns:
    canvases: [G * num_canvases, S, S, C], group-major.
    labels: per level, [G * T_i] int32 global source-image indices.
  """
  g = group_ids.shape[0]
  grouped = [c.reshape(g, layout.group_size, *c.shape[1:]) for c in crops]

  def one(group_id, *group_crops):
    canv, labels = _assemble_group(group_crops, jax.random.fold_in(key, group_id),
                                   layout, method)
    return canv, [l + group_id * layout.group_size for l in labels]

  canvases, labels = jax.vmap(one)(group_ids, *grouped)
  return (canvases.reshape(-1, *canvases.shape[2:]),
          [l.reshape(-1) for l in labels])


def sharded_assemble(crops, key, layout: Layout, mesh, method: str = 'nearest'):
  """`assemble` per device under `jax.shard_map` over the mesh's 'data' axis.

  Montage assembly gathers images within a group; running it per device
  keeps those gathers local instead of letting the partitioner move images
  between devices.
  """
  num_groups = crops[0].shape[0] // layout.group_size
  if mesh is None:
    return assemble(crops, key, layout, jnp.arange(num_groups, dtype=jnp.int32), method)
  per_device = num_groups // mesh.shape['data']

  def local(k, *c):
    # Global ids of this device's groups. Computed here rather than passed
    # in: an unsharded input fails shard_map's in_specs check on meshes
    # with Explicit axes (the default of jax.make_mesh).
    ids = jax.lax.axis_index('data') * per_device + jnp.arange(per_device, dtype=jnp.int32)
    return assemble(c, k, layout, ids, method)

  sharding = NamedSharding(mesh, P('data'))
  crops = [jax.device_put(c, sharding) for c in crops]
  fn = jax.shard_map(
      local, mesh=mesh, in_specs=(P(),) + (P('data'),) * len(crops),
      out_specs=(P('data'), [P('data')] * layout.num_levels))
  return fn(key, *crops)
