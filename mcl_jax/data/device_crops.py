"""Random-resized crops cut on the device from the host's decoded images.

With `data.crop_on='device'` the host decodes each image once and sends a
padded uint8 buffer, its valid size and the crop windows (sampled on the host
with torchvision's RandomResizedCrop rules, `mcl_jax/data/decode.py`); the
train step cuts and resizes the crops here, before the colour augmentation.

The resize is TensorFlow's `resize(crop, [S, S], 'bilinear', antialias=True)`
of the cut window (the host path, i.e. PIL's antialiased bilinear): a
triangle kernel stretched by the downscale factor, sampled at pixel centres,
whose weights are renormalised over the pixels inside the window. Inside the
window is what makes it equal the host path: scaling the whole buffer (e.g.
`jax.image.scale_and_translate`) would blend pixels from beyond the window's
edges into its edge pixels. Each axis is a dense [S, max_side] weight matrix,
so a crop is two matmuls (2 * 3 * S * M * (M + S) FLOPs for an M-side
buffer) at `jax.lax.Precision.HIGH`: exact float32 on CPU, TF32 on GPU,
bf16_3x on TPU.

Owns `crop_batch` (the resize), `step_images` / `crops_of` (what the train
step receives in each mode and how it becomes crops) and `DEVICE_KEYS`.
"""

import jax
import jax.numpy as jnp

# The batch entries the device path sends instead of 'crops'.
DEVICE_KEYS = ('image', 'size', 'windows')


def axis_weights(start, length, valid, out_size: int, in_size: int):
  """Resize weights of one axis of one window: float32 [out_size, in_size].

  Args:
    start: window start along the axis, in input pixels (may be fractional).
    length: window length along the axis (input pixels, > 0).
    valid: valid input pixels along the axis (the rest is padding).
    out_size: output pixels.
    in_size: input pixels (the buffer's side).

  Returns:
    Row o holds the weights of output pixel o over the input pixels; each row
    sums to 1 over the pixels whose centre lies inside the window.
  """
  start = jnp.asarray(start, jnp.float32)
  length = jnp.asarray(length, jnp.float32)
  scale = length / out_size  # input pixels per output pixel
  kernel_scale = jnp.maximum(scale, 1.0)  # antialias: widen when downscaling
  sample = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  centre = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  w = jnp.maximum(0.0, 1.0 - jnp.abs(sample[:, None] - centre) / kernel_scale)
  inside = (centre >= start) & (centre < start + length) & (centre < valid)
  w = jnp.where(inside, w, 0.0)
  total = jnp.sum(w, axis=1, keepdims=True)
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def crop_batch(image, size, windows, out_size: int):
  """Cuts and resizes every window of every image.

  Args:
    image: uint8 [B, M, M, 3] padded buffers.
    size: int32 [B, 2] valid (h, w) of each buffer.
    windows: float [B, n, 4] (y, x, h, w) in buffer pixels.
    out_size: S, the crops' side.

  Returns:
    uint8 [B, n, S, S, 3] crops (rounded like the host path).
  """
  m = image.shape[1]
  if image.shape[2] != m:
    raise ValueError(f'expected square [B, M, M, 3] buffers, got {image.shape}')
  win = windows.astype(jnp.float32)
  size = size.astype(jnp.float32)
  weights = jax.vmap(jax.vmap(axis_weights, (0, 0, None, None, None)),
                     (0, 0, 0, None, None))
  wy = weights(win[..., 0], win[..., 2], size[:, 0], out_size, m)  # [B,n,S,M]
  wx = weights(win[..., 1], win[..., 3], size[:, 1], out_size, m)
  x = image.astype(jnp.float32)
  hi = jax.lax.Precision.HIGH
  # Rows first (the buffer is shared by the n crops), then columns.
  rows = jnp.einsum('bkoh,bhwc->bkowc', wy, x, precision=hi)
  crops = jnp.einsum('bkowc,bkpw->bkopc', rows, wx, precision=hi)
  return jnp.clip(jnp.round(crops), 0, 255).astype(jnp.uint8)


def step_images(batch: dict, crop_on: str):
  """What the train step takes as its images argument, from a batch dict.

  Args:
    batch: a (global) batch of the input pipeline.
    crop_on: `config.data.crop_on`.

  Returns:
    'host': the uint8 crops [B, n, S, S, 3]; 'device': the dict of
    `DEVICE_KEYS` ('image', 'size', 'windows').
  """
  if crop_on == 'device':
    return {k: batch[k] for k in DEVICE_KEYS}
  return batch['crops']


def crops_of(images, data_cfg):
  """The uint8 crops [B, n, S, S, 3] of `step_images`' output (jittable)."""
  if data_cfg.crop_on == 'device':
    return crop_batch(images['image'], images['size'], images['windows'],
                      data_cfg.image_size)
  return images
