"""Montage assembly: crops downsampled and tiled onto canvases (docs/METHOD.md section 2).

A montage *group* is the set of `group_size` images that are mixed into one
set of canvases (the reference mixes the 128 images of one GPU). Groups are
independent: group g is assembled with key `fold_in(key, g)` and its labels
are offset by `g * group_size`, so the result does not depend on how many
devices share the work. `assemble` runs per device inside `jax.shard_map`.

The static part of a montage (which tiles exist, where, at which level) is a
`Layout`; the random part (which image fills each tile) is drawn per step.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

# The geometry is the network layer's (region cutting reads it); these names
# stay importable from here, where the montage is assembled.
from mcl_jax.nn.montage_layout import Block, Layout, layout_for, make_layout  # noqa: F401


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
