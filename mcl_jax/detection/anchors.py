"""Anchors of each FPN level (detectron2 DefaultAnchorGenerator).

Anchors depend only on static shapes, so they are computed once on the host
in float32 NumPy (the arithmetic detectron2 does in torch float32) and enter
jitted code as constants.
"""

import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np


def cell_anchors(size: float, aspect_ratios: Sequence[float]) -> np.ndarray:
  """The anchors centred at (0, 0): [A, 4] float32, one per aspect ratio (h / w).

  w = sqrt(size^2 / a), h = a w, so every anchor has area size^2.
  """
  out = []
  for a in aspect_ratios:
    w = math.sqrt(size**2.0 / a)
    h = a * w
    out.append((-w / 2.0, -h / 2.0, w / 2.0, h / 2.0))
  return np.asarray(out, np.float32)


def level_anchors(feat_h: int, feat_w: int, stride: int, size: float,
                  aspect_ratios: Sequence[float], offset: float = 0.0):
  """The anchors of one level: [feat_h * feat_w * A, 4] float32.

  In detectron2's order: positions row-major (y, then x), and at each
  position the aspect ratios in order. The anchor of position (y, x) is
  centred at ((x + offset) * stride, (y + offset) * stride).

  Args:
    feat_h, feat_w: the level's feature map size (static ints).
    stride: the level's stride in canvas pixels.
    size: sqrt of every anchor's area.
    aspect_ratios: h / w of each cell anchor.
    offset: where in the cell the centre sits (0.0: the cell's corner).
  """
  base = cell_anchors(size, aspect_ratios)
  sx = np.arange(offset * stride, feat_w * stride, step=stride, dtype=np.float32)[:feat_w]
  sy = np.arange(offset * stride, feat_h * stride, step=stride, dtype=np.float32)[:feat_h]
  yy, xx = np.meshgrid(sy, sx, indexing='ij')
  xx, yy = xx.reshape(-1), yy.reshape(-1)
  shifts = np.stack([xx, yy, xx, yy], axis=1)
  anchors = (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)
  return jnp.asarray(anchors, jnp.float32)


def feature_size(canvas: int, stride: int) -> int:
  """A level's feature map length: ceil(canvas / stride).

  Exact for the stride-2 stages of the ResNet and for P6 (a 1x1 max-pool with
  stride 2 of P5): each halves with rounding up.
  """
  return -(-canvas // stride)


def all_anchors(canvas_hw: Sequence[int], strides: Sequence[int], sizes: Sequence[float],
                ratios: Sequence[float], offset: float = 0.0) -> list:
  """The anchors of every level for one canvas shape.

  Args:
    canvas_hw: (H, W) of the canvas.
    strides: one stride per level (4, 8, 16, 32, 64 for P2..P6).
    sizes: one anchor size per level (32, ..., 512).
    ratios: the aspect ratios shared by every level.
    offset: as in `level_anchors`.

  Returns:
    A list, one [H_l * W_l * A, 4] float32 array per level (the RPN keeps
    its top-k per level; concatenate them for the image's anchors).
  """
  if len(strides) != len(sizes):
    raise ValueError(f'{len(strides)} strides but {len(sizes)} anchor sizes: give one size per level')
  h, w = canvas_hw
  return [level_anchors(feature_size(h, s), feature_size(w, s), s, size, ratios, offset)
          for s, size in zip(strides, sizes)]
