"""Mask-head targets from box-local ground-truth masks, and pasting predicted masks.

The input pipeline stores each instance's mask cropped to its own gt box B
and resized to M x M ("box-local"), so the device never holds full-image
masks. The target of a proposal P matched to that instance is the mask
inside P at size x size: cell (i, j) of the box-local mask covers
[B.x1 + j B.w / M, B.x1 + (j + 1) B.w / M) in canvas x (rows likewise), so P
in mask cells is ((P.x1 - B.x1) M / B.w, ...). RoIAlign (aligned=True)
samples that box on the mask padded with zeros (the instance has no pixels
outside its box), and a bin is foreground when its mean is >= 0.5, as
detectron2 does on full-resolution bitmasks.
"""

import math

import jax.numpy as jnp
import numpy as np

from mcl_jax.nn.roi_align import roi_align


def proposals_in_mask_cells(gt_boxes, proposals, mask_size: int):
  """Each proposal in the cell coordinates of its gt's box-local mask: [R, 4].

  Args:
    gt_boxes: [R, 4] the matched gt box of each proposal.
    proposals: [R, 4].
    mask_size: M.
  """
  # A degenerate gt box (padding, never a real instance) must not divide by zero.
  bw = jnp.maximum(gt_boxes[:, 2] - gt_boxes[:, 0], 1e-6)
  bh = jnp.maximum(gt_boxes[:, 3] - gt_boxes[:, 1], 1e-6)
  sx, sy = mask_size / bw, mask_size / bh
  return jnp.stack([(proposals[:, 0] - gt_boxes[:, 0]) * sx, (proposals[:, 1] - gt_boxes[:, 1]) * sy,
                    (proposals[:, 2] - gt_boxes[:, 0]) * sx, (proposals[:, 3] - gt_boxes[:, 1]) * sy],
                   axis=-1)


def default_sampling_ratio(mask_size: int, size: int) -> int:
  """Samples per bin and axis: about one per mask cell for a proposal the size of its gt box.

  detectron2 samples its full-resolution masks with ceil(box side / size)
  per bin; a proposal near its gt box spans about M cells.
  """
  return max(1, math.ceil(mask_size / size))


def mask_targets(gt_masks, gt_boxes, proposals, matched_gt, size: int = 28,
                 sampling_ratio: int | None = None):
  """The mask target of each proposal: its matched instance inside it, size x size.

  Args:
    gt_masks: [G, M, M] uint8 box-local masks (nonzero = the instance).
    gt_boxes: [G, 4] float32 gt boxes in canvas pixels.
    proposals: [R, 4] float32 proposal boxes in canvas pixels.
    matched_gt: [R] int index of each proposal's gt.
    size: the output side (28 for the mask head).
    sampling_ratio: RoIAlign samples per bin and axis (static); default
      `default_sampling_ratio(M, size)`.

  Returns:
    [R, size, size] float32 in {0, 1}.
  """
  m = gt_masks.shape[-1]
  if sampling_ratio is None:
    sampling_ratio = default_sampling_ratio(m, size)
  matched_gt = matched_gt.astype(jnp.int32)
  # One cell of zeros around each mask: RoIAlign clamps samples within one
  # cell outside the map to the edge cell, which must read as background.
  padded = jnp.pad((gt_masks > 0).astype(jnp.float32), ((0, 0), (1, 1), (1, 1)))[..., None]
  cells = proposals_in_mask_cells(gt_boxes.astype(jnp.float32)[matched_gt],
                                  proposals.astype(jnp.float32), m) + 1.0
  sampled = roi_align(padded, cells, matched_gt, output_size=size, spatial_scale=1.0,
                      sampling_ratio=sampling_ratio, aligned=True)[..., 0]
  return (sampled >= 0.5).astype(jnp.float32)


def _paste_weights(lo: float, hi: float, s: int, n: int) -> np.ndarray:
  """Bilinear weights [n, s] of the s mask cells for n image pixels along one axis.

  grid_sample(align_corners=False, padding zeros) at the pixel centres
  (k + 0.5) normalised to the box [lo, hi]: mask coordinate
  ((g + 1) s - 1) / 2 with g = 2 (k + 0.5 - lo) / (hi - lo) - 1; cells
  outside the mask contribute zero.
  """
  k = np.arange(n, dtype=np.float32) + np.float32(0.5)
  g = (k - np.float32(lo)) / np.float32(hi - lo) * np.float32(2) - np.float32(1)
  c = ((g + np.float32(1)) * np.float32(s) - np.float32(1)) / np.float32(2)
  c0 = np.floor(c)
  f = c - c0
  c0 = c0.astype(np.int64)
  w = np.zeros((n, s + 2), np.float32)  # columns -1 and s collect what falls off the mask
  rows = np.arange(n)
  w[rows, np.clip(c0, -1, s) + 1] += np.where((c0 >= -1) & (c0 <= s), 1 - f, 0)
  w[rows, np.clip(c0 + 1, -1, s) + 1] += np.where((c0 + 1 >= -1) & (c0 + 1 <= s), f, 0)
  return w[:, 1:-1]


def paste_masks(masks, boxes, image_hw, threshold: float = 0.5) -> np.ndarray:
  """Pastes size x size mask probabilities into an image (detectron2 paste_masks_in_image).

  Each mask is resized bilinearly onto its box (grid_sample with
  align_corners=False, zero outside the mask) and thresholded. Host-side
  NumPy: bilinear sampling is separable, so each mask is Wy @ mask @ Wx^T
  over the pixels its box reaches.

  Args:
    masks: [D, s, s] probabilities.
    boxes: [D, 4] (x1, y1, x2, y2) in the image's pixels.
    image_hw: (h, w) of the image.
    threshold: foreground where the resized probability >= threshold (> 0).

  Returns:
    bool [D, h, w].
  """
  if threshold <= 0:
    raise ValueError(f'threshold={threshold}: must be > 0 (every pixel would be foreground)')
  masks = np.asarray(masks, np.float32)
  boxes = np.asarray(boxes, np.float32)
  h, w = int(image_hw[0]), int(image_hw[1])
  d, s = masks.shape[0], masks.shape[-1]
  out = np.zeros((d, h, w), bool)
  for i in range(d):
    x0, y0, x1, y1 = (float(v) for v in boxes[i])
    if not (x1 > x0 and y1 > y0):
      continue  # an empty box covers no pixel
    wy, wx = _paste_weights(y0, y1, s, h), _paste_weights(x0, x1, s, w)
    rows = np.flatnonzero(wy.any(axis=1))
    cols = np.flatnonzero(wx.any(axis=1))
    if not rows.size or not cols.size:
      continue
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    out[i, r0:r1, c0:c1] = (wy[r0:r1] @ masks[i] @ wx[c0:c1].T) >= threshold
  return out
