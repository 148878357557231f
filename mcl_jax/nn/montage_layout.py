"""Montage geometry: which tiles a group's canvases hold, where, at which level.

NumPy only and static (no arrays of a step): the network cuts its regions
by it (`mcl_jax.nn.model.cut_regions`) and the pretext assembles its
canvases by it (`mcl_jax.pretext.montage`), so it sits in the lowest layer.
A `Layout` is built from `config.montage` (docs/METHOD.md section 2).
"""

import dataclasses
from typing import Any, Sequence

import numpy as np


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
