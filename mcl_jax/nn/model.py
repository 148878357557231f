"""The MCL network: ResNet + FPN + region neck + predictors (or classifiers).

Owns the network only: `MCLNet`, how regions are cut from the FPN maps
(`cut_regions`), building it from a config and initialising it. The batch
losses that run it on montages live in objective.py.

Data flow of one view (docs/METHOD.md sections 2-4):
  canvases --ResNet/FPN--> P2..P5 --cut--> regions
  --neck (once over all levels, per-level BN)--> tile embeddings
  --predictor_i--> online predictions (the target keeps level 0 only).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax.nn import remat as remat_lib
from mcl_jax.nn import roi_align
from mcl_jax.nn.fpn import FPN
from mcl_jax.nn.heads import Predictor, RegionNeck
from mcl_jax.nn.montage_layout import Layout
from mcl_jax.nn.resnet import ResNet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# `model.remat`: what the online backward pass recomputes instead of keeping.
# Values: (ResNet.remat, FPN recomputed, neck layers recomputed). Every
# setting computes the same loss and gradients; see docs/PERFORMANCE.md for
# the memory and FLOPs of each. Every part's backward pass waits for its
# cotangent in all settings (remat.py).
REMAT = {
    'none': ('none', False, False),
    'blocks': ('blocks', True, False),  # keeps block inputs and the FPN's inputs
    'blocks+neck': ('blocks', True, True),  # and only each neck layer's input
    'stages+neck': ('stages', True, True),  # only stage inputs in the backbone
}


def _grid_regions(fmap, grid: int):
  """[N, g*k, g*k, C] -> [N*g*g, k, k, C], canvas then row-major tiles."""
  n, h, w, c = fmap.shape
  k = h // grid
  x = fmap.reshape(n, grid, k, grid, k, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n * grid * grid, k, k, c)


def _grid_boxes(num_canvases: int, grid: int, image_size: int):
  """Boxes of every grid cell of every canvas: ([N*g*g, 4], [N*g*g] canvas)."""
  s = image_size / grid
  r, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
  cell = np.stack([c * s, r * s, (c + 1) * s, (r + 1) * s], -1).reshape(-1, 4)
  boxes = np.tile(cell, (num_canvases, 1)).astype(np.float32)
  idx = np.repeat(np.arange(num_canvases), grid * grid).astype(np.int32)
  return boxes, idx


def cut_regions(feats: dict[str, jax.Array], layout: Layout, levels: Sequence[int],
                mode: str, path: str, region_size: int):
  """Cuts the regions the neck will see.

  Args:
    feats: {'P2'..'P5'} of G groups' canvases, [G * num_canvases, h, w, C].
    layout: the montage Layout of one group.
    levels: montage levels whose tile embeddings are wanted.
    mode: 'all' (every canvas at every used FPN level, the reference) or
      'used' (only the tiles the loss reads).
    path: 'reshape' (the reference) or 'roi_align' (7x7-style RoIAlign with
      sampling ratio 1 and aligned boxes; needed for mixed layouts).
    region_size: k, the region side on its FPN level.

  Returns:
    regions [R, k, k, C]; group_sizes (rows per FPN level, ascending level);
    take: per requested montage level, a function mapping the neck output
    [R, D] to that level's tiles [G * T_i, D] in label order.
  """
  nc = layout.num_canvases
  g = feats['P5'].shape[0] // nc
  fpn_of = {i: layout.fpn_level(i) for i in levels}
  fpn_levels = sorted(set(fpn_of.values()))
  # The rules are config_validation's; these only guard direct callers.
  assert path in ('reshape', 'roi_align') and mode in ('all', 'used'), (path, mode)
  assert layout.is_grid or (path, mode) == ('roi_align', 'used'), (path, mode)

  def roi(fmap, boxes, idx, level):
    return roi_align.roi_align(fmap, jnp.asarray(boxes), jnp.asarray(idx), region_size,
                               1.0 / 2**level, sampling_ratio=1, aligned=True)

  pieces, sizes, offsets = [], [], {}
  for lvl in fpn_levels:
    fmap = feats[f'P{lvl}']
    grid = 2**(5 - lvl)
    if mode == 'all':
      if path == 'reshape':
        r = _grid_regions(fmap, grid)
      else:
        r = roi(fmap, *_grid_boxes(g * nc, grid, layout.image_size), lvl)
    else:
      (i,) = [i for i in levels if fpn_of[i] == lvl]
      if path == 'reshape':
        start, block = layout.grid_block(i)
        sub = fmap.reshape(g, nc, *fmap.shape[1:])[:, start:start + block.count]
        r = _grid_regions(sub.reshape(-1, *fmap.shape[1:]), grid)
      else:
        t = layout.tiles(i)
        boxes = np.tile(layout.boxes(i), (g, 1))
        idx = (np.arange(g)[:, None] * nc + t[None, :, 0]).reshape(-1)
        r = roi(fmap, boxes, idx, lvl)
    offsets[lvl] = sum(sizes)
    pieces.append(r)
    sizes.append(r.shape[0])

  def make_take(i):
    lvl, off = fpn_of[i], offsets[fpn_of[i]]
    size = sizes[fpn_levels.index(lvl)]
    if mode == 'used':
      return lambda emb: emb[off:off + size]
    start, block = layout.grid_block(i)
    per_canvas = 4**i

    def take(emb):
      e = emb[off:off + size].reshape(g, nc, per_canvas, -1)
      return e[:, start:start + block.count].reshape(g * block.count * per_canvas, -1)
    return take

  regions = jnp.concatenate(pieces, axis=0) if len(pieces) > 1 else pieces[0]
  return regions, tuple(sizes), {i: make_take(i) for i in levels}


class MCLNet(nn.Module):
  """Online / target network. The target uses the same module without heads.

  Attributes:
    depth, width, stage_sizes, block: the ResNet (see resnet.ResNet).
    fpn_channels: FPN width (256).
    neck_convs, neck_hidden, embed_dim: the region neck.
    predictor_hidden: the per-level predictors' hidden width.
    num_levels: montage levels (one predictor each).
    region_path, neck_regions, region_size: see `cut_regions`.
    num_classes: > 0 adds supervised classifiers (docs/METHOD.md section 7).
    shared_classifier: one classifier for all levels instead of one each.
    dtype: compute dtype.
    remat: a key of REMAT.
  """
  depth: int = 50
  width: int = 64
  stage_sizes: Sequence[int] | None = None
  block: str | None = None
  fpn_channels: int = 256
  neck_convs: int = 4
  neck_hidden: int = 2048
  embed_dim: int = 256
  predictor_hidden: int = 2048
  num_levels: int = 4
  region_path: str = 'reshape'
  neck_regions: str = 'all'
  region_size: int | None = None
  num_classes: int = 0
  shared_classifier: bool = False
  dtype: Any = jnp.float32
  remat: str = 'none'

  def setup(self):
    if self.remat not in REMAT:
      raise ValueError(f'model.remat={self.remat!r}: must be one of {tuple(REMAT)}')
    backbone_remat, fpn_remat, neck_remat = REMAT[self.remat]
    self.backbone = ResNet(self.depth, self.width, self.stage_sizes, self.block, self.dtype,
                           remat=backbone_remat)
    # `self` is argument 0 of the lifted __call__s: FPN(feats, train),
    # Predictor(x, group_sizes, train).
    fpn_cls = remat_lib.remat(FPN, static_argnums=(2,), policy=(
        remat_lib.RECOMPUTE if fpn_remat else remat_lib.KEEP))
    self.fpn = fpn_cls(self.fpn_channels, self.dtype)
    self.neck = RegionNeck(self.fpn_channels, self.neck_convs, self.neck_hidden,
                           self.embed_dim, self.dtype, remat=neck_remat)
    predictor_cls = remat_lib.remat(Predictor, static_argnums=(2, 3), policy=remat_lib.KEEP)
    self.predictors = [predictor_cls(self.predictor_hidden, self.embed_dim, self.dtype)
                       for _ in range(self.num_levels)]
    if self.num_classes:
      n = 1 if self.shared_classifier else self.num_levels
      self.classifiers = [nn.Dense(self.num_classes, param_dtype=jnp.float32)
                          for _ in range(n)]

  def features(self, x, train: bool = False):
    """C2..C5 and P2..P5 of images x [N, H, W, 3] (for evaluation and export)."""
    c = self.backbone(x, train)
    return {**c, **self.fpn(c, train)}

  def embed(self, canvases, layout: Layout, train: bool = True,
            levels: Sequence[int] | None = None):
    """Tile embeddings per montage level (neck outputs, float32)."""
    levels = tuple(range(layout.num_levels)) if levels is None else tuple(levels)
    feats = self.fpn(self.backbone(canvases, train), train)
    k = self.region_size or layout.image_size // 32
    regions, sizes, take = cut_regions(feats, layout, levels, self.neck_regions,
                                       self.region_path, k)
    emb = self.neck(regions, sizes, train)
    return [take[i](emb) for i in levels]

  def __call__(self, canvases, layout: Layout, train: bool = True):
    """Online forward: per level, predictor outputs [G * T_i, D] (float32)."""
    emb = self.embed(canvases, layout, train)
    return [self.predictors[i](e, (e.shape[0],), train) for i, e in enumerate(emb)]

  def classify(self, canvases, layout: Layout, train: bool = True):
    """Supervised objective: per level, class logits of each tile (float32)."""
    emb = self.embed(canvases, layout, train)
    heads = [self.classifiers[0 if self.shared_classifier else i] for i in range(len(emb))]
    return [h(e) for h, e in zip(heads, emb)]


def create_model(config) -> MCLNet:
  """Builds MCLNet from `config.model` (and loss / montage / data fields)."""
  m = config.model
  supervised = config.objective == 'supervised'
  return MCLNet(
      depth=m.depth, width=m.width,
      stage_sizes=tuple(m.stage_sizes) if m.stage_sizes else None,
      block=m.block, fpn_channels=m.fpn_channels,
      neck_convs=m.neck_convs, neck_hidden=m.neck_hidden, embed_dim=m.embed_dim,
      predictor_hidden=m.predictor_hidden, num_levels=len(config.loss.level_weights),
      region_path=m.region_path, neck_regions=m.neck_regions, region_size=m.region_size,
      num_classes=config.data.num_classes if supervised else 0,
      shared_classifier=config.loss.classifier == 'shared',
      dtype=DTYPES[m.dtype], remat=m.remat)


def init_variables(model: MCLNet, layout: Layout, key, image_size: int):
  """Initial variables for one montage group (params + batch_stats)."""
  canvases = jnp.zeros((layout.num_canvases, image_size, image_size, 3), jnp.float32)
  method = MCLNet.classify if model.num_classes else MCLNet.__call__
  return model.init(key, canvases, layout, train=True, method=method)


def encoder_subtree(tree):
  """The target's share of a params / batch_stats tree: backbone, FPN, neck."""
  return {k: tree[k] for k in ('backbone', 'fpn', 'neck')}
