"""Device-side image augmentation for MCL (docs/METHOD.md section 1, steps 2-7).

The host pipeline (`input_pipeline.py`) delivers uint8 random-resized crops;
everything after the crop runs here, on the accelerator, as jittable JAX:

  2. horizontal flip,
  3. colour jitter (brightness, contrast, saturation, hue in a random order,
     torchvision semantics),
  4. grayscale,
  5. Gaussian blur,
  6. solarize,
  7. mean/std normalisation.

Crops `0 .. num_crops // 2 - 1` use view A ("view q"), the others view B
("view k"); the two views' settings live in one table, `view_params`.

Randomness is split in two stages so that tests and previews can see what was
drawn: `sample_decisions` draws every random choice (key -> one key per example
-> one key per crop) and `apply_decisions` applies them. `augment_crops` is
the two together. Every op is computed for every crop and selected with
`jnp.where`, so the whole batch stays one vectorised computation under `vmap`
(no per-example Python control flow, no `lax.cond` turning into selects anyway).

All colour ops work on float32 images in [0, 1] of shape [H, W, 3] and clip to
[0, 1] after each op, like torchvision on float tensors. The reference applies
them to 8-bit PIL images, which rounds after every op; the float version
differs from it by at most about one grey level per op.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

# ITU-R 601-2 luma, as PIL's convert('L') (torchvision uses 0.2989 for red).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Jitter op ids, in the order torchvision's ColorJitter lists them.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class ViewParams:
  """Augmentation settings of one view (docs/METHOD.md section 1).

  Attributes:
    flip_p: probability of a horizontal flip.
    jitter_p: probability of applying colour jitter.
    brightness: brightness factor range is U[max(0, 1 - b), 1 + b].
    contrast: contrast factor range is U[max(0, 1 - c), 1 + c].
    saturation: saturation factor range is U[max(0, 1 - s), 1 + s].
    hue: hue shift range is U[-h, h] (fraction of a full turn).
    grayscale_p: probability of converting to grayscale.
    blur_p: probability of a Gaussian blur.
    blur_sigma: (low, high) of the uniform blur sigma, in pixels.
    solarize_p: probability of solarization.
  """
  flip_p: float
  jitter_p: float
  brightness: float
  contrast: float
  saturation: float
  hue: float
  grayscale_p: float
  blur_p: float
  blur_sigma: tuple[float, float]
  solarize_p: float


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """Everything `augment_crops` needs, hashable so it can be a static arg.

  Attributes:
    view_a: settings of crops 0 .. num_crops // 2 - 1.
    view_b: settings of the remaining crops.
    mean: per-channel normalisation mean, [0, 1] units.
    std: per-channel normalisation std, [0, 1] units.
    blur_kernel_fraction: blur kernel size as a fraction of the image side.
  """
  view_a: ViewParams
  view_b: ViewParams
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  blur_kernel_fraction: float


def view_params(aug_cfg) -> tuple[ViewParams, ViewParams]:
  """The A/B table: one `ViewParams` per view from `config.augment`.

  Every `*_p` field of the config is a pair (A, B); the jitter strengths and
  the blur sigma range are shared by both views.

  Args:
    aug_cfg: the `augment` section of the config.

  Returns:
    (view A settings, view B settings).
  """
  def view(i):
    return ViewParams(
        flip_p=float(aug_cfg.flip_p[i]),
        jitter_p=float(aug_cfg.jitter_p[i]),
        brightness=float(aug_cfg.brightness),
        contrast=float(aug_cfg.contrast),
        saturation=float(aug_cfg.saturation),
        hue=float(aug_cfg.hue),
        grayscale_p=float(aug_cfg.grayscale_p[i]),
        blur_p=float(aug_cfg.blur_p[i]),
        blur_sigma=tuple(float(s) for s in aug_cfg.blur_sigma),
        solarize_p=float(aug_cfg.solarize_p[i]),
    )
  return view(0), view(1)


def settings_from_config(aug_cfg) -> AugmentSettings:
  """Builds the hashable `AugmentSettings` from `config.augment`."""
  view_a, view_b = view_params(aug_cfg)
  return AugmentSettings(
      view_a=view_a,
      view_b=view_b,
      mean=tuple(float(m) for m in aug_cfg.mean),
      std=tuple(float(s) for s in aug_cfg.std),
      blur_kernel_fraction=float(aug_cfg.blur_kernel_fraction),
  )


def blur_kernel_size(image_size: int, fraction: float = 0.1) -> int:
  """Odd blur kernel size of about `fraction` of the image side, at least 3.

  Matches BYOL/SimCLR: 23 taps at 224 px for fraction 0.1.
  """
  return max(3, 2 * int(fraction * image_size / 2) + 1)


# ---------------------------------------------------------------------------
# Individual ops: float32 [H, W, 3] images in [0, 1], explicit factors.
# ---------------------------------------------------------------------------


def rgb_to_grayscale(img: jax.Array) -> jax.Array:
  """Luma of an RGB image, [..., H, W, 1]."""
  w = jnp.asarray(LUMA_WEIGHTS, img.dtype)
  return jnp.sum(img * w, axis=-1, keepdims=True)


def _blend(img, ref, factor):
  # torchvision's _blend for float images: factor * img + (1 - factor) * ref.
  return jnp.clip(factor * img + (1.0 - factor) * ref, 0.0, 1.0)


def adjust_brightness(img: jax.Array, factor) -> jax.Array:
  """Blend with black: torchvision `adjust_brightness`."""
  return _blend(img, jnp.zeros((), img.dtype), factor)


def adjust_contrast(img: jax.Array, factor) -> jax.Array:
  """Blend with the mean luma of the whole image: `adjust_contrast`."""
  mean = jnp.mean(rgb_to_grayscale(img), axis=(-3, -2, -1), keepdims=True)
  return _blend(img, mean, factor)


def adjust_saturation(img: jax.Array, factor) -> jax.Array:
  """Blend with the image's own grayscale: `adjust_saturation`."""
  return _blend(img, rgb_to_grayscale(img), factor)


def rgb_to_hsv(img: jax.Array) -> jax.Array:
  """RGB -> HSV, all channels in [0, 1] (torchvision `_rgb2hsv`)."""
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc = jnp.max(img, axis=-1)
  minc = jnp.min(img, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  # Guard the divisions where they would be 0/0; those pixels get s = h = 0.
  s = cr / jnp.where(eqc, 1.0, maxc)
  cr_div = jnp.where(eqc, 1.0, cr)
  rc = (maxc - r) / cr_div
  gc = (maxc - g) / cr_div
  bc = (maxc - b) / cr_div
  is_r = maxc == r
  is_g = (maxc == g) & ~is_r
  is_b = ~is_g & ~is_r
  h = (jnp.where(is_r, bc - gc, 0.0) + jnp.where(is_g, 2.0 + rc - bc, 0.0) +
       jnp.where(is_b, 4.0 + gc - rc, 0.0))
  h = jnp.mod(h / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """HSV -> RGB, all channels in [0, 1] (torchvision `_hsv2rgb`)."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = jnp.mod(i.astype(jnp.int32), 6)
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  # Sector i of the hue circle picks which of (v, q, p, t) feeds each channel.
  table = (
      (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
  out = [jnp.select([i == k for k in range(6)], [row[c] for row in table])
         for c in range(3)]
  return jnp.stack(out, axis=-1)


def adjust_hue(img: jax.Array, delta) -> jax.Array:
  """Rotates hue by `delta` (fraction of a turn): torchvision `adjust_hue`."""
  hsv = rgb_to_hsv(img)
  h = jnp.mod(hsv[..., 0] + delta, 1.0)
  rgb = hsv_to_rgb(jnp.concatenate([h[..., None], hsv[..., 1:]], axis=-1))
  return jnp.clip(rgb, 0.0, 1.0)


def to_grayscale(img: jax.Array) -> jax.Array:
  """Grayscale with three equal channels."""
  return jnp.broadcast_to(rgb_to_grayscale(img), img.shape)


def gaussian_kernel(sigma, kernel_size: int) -> jax.Array:
  """Normalised 1-D Gaussian taps at integer offsets -k//2 .. k//2."""
  x = jnp.arange(kernel_size, dtype=jnp.float32) - kernel_size // 2
  w = jnp.exp(-0.5 * jnp.square(x / sigma))
  return w / jnp.sum(w)


def gaussian_blur(img: jax.Array, sigma, kernel_size: int) -> jax.Array:
  """Separable Gaussian blur of an [H, W, C] image with reflect padding.

  Reflect padding (edge pixel not repeated) is what torchvision's
  `gaussian_blur` uses. The blur is a sum of shifted slices rather than a
  convolution so that a per-crop sigma vectorises under `vmap` into one fused
  elementwise loop.

  Args:
    img: float [H, W, C] image; H and W must exceed kernel_size // 2.
    sigma: scalar standard deviation in pixels.
    kernel_size: odd number of taps.

  Returns:
    The blurred image, same shape and dtype.
  """
  w = gaussian_kernel(sigma, kernel_size).astype(img.dtype)
  r = kernel_size // 2
  h, wd = img.shape[0], img.shape[1]
  xp = jnp.pad(img, ((r, r), (0, 0), (0, 0)), mode='reflect')
  img = sum(w[i] * xp[i:i + h] for i in range(kernel_size))
  xp = jnp.pad(img, ((0, 0), (r, r), (0, 0)), mode='reflect')
  return sum(w[i] * xp[:, i:i + wd] for i in range(kernel_size))


def solarize(img: jax.Array, threshold: float = 0.5) -> jax.Array:
  """Inverts pixels >= threshold (0.5 here == 128 in 8-bit units)."""
  return jnp.where(img >= threshold, 1.0 - img, img)


def normalize(img: jax.Array, mean, std) -> jax.Array:
  """(img - mean) / std per channel."""
  return (img - jnp.asarray(mean, img.dtype)) / jnp.asarray(std, img.dtype)


def denormalize(x: jax.Array, aug_cfg) -> jax.Array:
  """Inverse of the normalisation, clipped to [0, 1] (previews, PNGs).

  Args:
    x: normalised images [..., 3].
    aug_cfg: the `augment` config section (for mean and std).

  Returns:
    float32 images in [0, 1].
  """
  mean = jnp.asarray(aug_cfg.mean, jnp.float32)
  std = jnp.asarray(aug_cfg.std, jnp.float32)
  return jnp.clip(jnp.asarray(x, jnp.float32) * std + mean, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Random decisions.
# ---------------------------------------------------------------------------


def _per_crop_params(settings: AugmentSettings, num_crops: int):
  """Stacks the A/B table into arrays of length num_crops (A first)."""
  half = num_crops // 2
  views = [settings.view_a] * half + [settings.view_b] * (num_crops - half)

  def col(fn):
    return jnp.asarray([fn(v) for v in views], jnp.float32)

  return {
      'flip_p': col(lambda v: v.flip_p),
      'jitter_p': col(lambda v: v.jitter_p),
      'brightness': col(lambda v: v.brightness),
      'contrast': col(lambda v: v.contrast),
      'saturation': col(lambda v: v.saturation),
      'hue': col(lambda v: v.hue),
      'grayscale_p': col(lambda v: v.grayscale_p),
      'blur_p': col(lambda v: v.blur_p),
      'sigma_lo': col(lambda v: v.blur_sigma[0]),
      'sigma_hi': col(lambda v: v.blur_sigma[1]),
      'solarize_p': col(lambda v: v.solarize_p),
  }


def _sample_one_crop(key, p):
  """All random choices of one crop; p holds that crop's scalar settings.

  One uniform draw of 14 numbers per crop (rather than a key split per
  choice) keeps the traced program, and so compile time, small.
  """
  u = jax.random.uniform(key, (14,), jnp.float32)

  def between(i, lo, hi):
    return lo + (hi - lo) * u[i]

  def strength(i, s):
    # torchvision: factor ~ U[max(0, 1 - s), 1 + s].
    return between(i, jnp.maximum(0.0, 1.0 - s), 1.0 + s)

  # u < p: never fires for p = 0, always for p = 1 (u is in [0, 1)).
  return {
      'flip': u[0] < p['flip_p'],
      'jitter': u[1] < p['jitter_p'],
      # Ranks of four uniforms: a uniformly random permutation of the ops.
      'order': jnp.argsort(u[10:14]).astype(jnp.int32),
      'brightness': strength(2, p['brightness']),
      'contrast': strength(3, p['contrast']),
      'saturation': strength(4, p['saturation']),
      'hue': between(5, -p['hue'], p['hue']),
      'grayscale': u[6] < p['grayscale_p'],
      'blur': u[7] < p['blur_p'],
      'sigma': between(8, p['sigma_lo'], p['sigma_hi']),
      'solarize': u[9] < p['solarize_p'],
  }


def _sample(key, batch_size: int, settings: AugmentSettings, num_crops: int):
  params = _per_crop_params(settings, num_crops)
  example_keys = jax.random.split(key, batch_size)
  crop_keys = jax.vmap(lambda k: jax.random.split(k, num_crops))(example_keys)
  per_example = jax.vmap(_sample_one_crop, in_axes=(0, 0))
  return jax.vmap(per_example, in_axes=(0, None))(crop_keys, params)


_sample_jit = jax.jit(_sample, static_argnames=('batch_size', 'settings',
                                                'num_crops'))


def sample_decisions(key, batch_size: int, aug_cfg,
                     num_crops: int = 8) -> dict[str, jax.Array]:
  """Draws every random choice of `augment_crops` (same key derivation).

  Args:
    key: PRNG key (typed or raw) for the whole batch.
    batch_size: number of examples B.
    aug_cfg: the `augment` config section.
    num_crops: crops per example; the first half uses view A.

  Returns:
    Dict of [B, num_crops] arrays: booleans 'flip', 'jitter', 'grayscale',
    'blur', 'solarize'; floats 'brightness', 'contrast', 'saturation', 'hue',
    'sigma'; and int32 'order' [B, num_crops, 4] (op applied at each jitter
    round: 0 brightness, 1 contrast, 2 saturation, 3 hue).
  """
  return _sample_jit(key, batch_size, settings_from_config(aug_cfg),
                     num_crops)


# ---------------------------------------------------------------------------
# Applying decisions.
# ---------------------------------------------------------------------------


def _color_jitter(x, d):
  """Brightness/contrast/saturation/hue in the order d['order'].

  The three blend ops are cheap, hue (an HSV round trip) is not; instead of
  evaluating all four ops at each of four rounds, the blends that come before
  hue run first, then hue once, then the blends after it. Each blend slot is
  made an exact no-op when it is not its turn by setting its factor to 1.
  """
  order = d['order']
  hue_pos = jnp.argmax(order == HUE)
  # The three blend ops in their sampled relative order.
  blend_ops = jnp.sort(jnp.where(order == HUE, 4, jnp.arange(4)))[:3]
  blend_ops = order[blend_ops]
  factors = jnp.stack([d['brightness'], d['contrast'], d['saturation']])

  def blend_round(x, j, active):
    op = blend_ops[j]
    gray = rgb_to_grayscale(x)
    ref = jnp.where(op == BRIGHTNESS, 0.0,
                    jnp.where(op == CONTRAST, jnp.mean(gray), gray))
    f = jnp.where(active, factors[op], 1.0)
    return _blend(x, ref, f)

  for j in range(3):
    x = blend_round(x, j, j < hue_pos)
  x = adjust_hue(x, d['hue'])
  for j in range(3):
    x = blend_round(x, j, j >= hue_pos)
  return x


def _apply_one_crop(img_u8, d, settings: AugmentSettings, kernel_size: int):
  x = img_u8.astype(jnp.float32) * (1.0 / 255.0)
  x = jnp.where(d['flip'], x[:, ::-1], x)
  x = jnp.where(d['jitter'], _color_jitter(x, d), x)
  x = jnp.where(d['grayscale'], to_grayscale(x), x)
  x = jnp.where(d['blur'], gaussian_blur(x, d['sigma'], kernel_size), x)
  x = jnp.where(d['solarize'], solarize(x), x)
  return normalize(x, settings.mean, settings.std)


def _apply(crops_uint8, decisions, settings: AugmentSettings):
  kernel_size = blur_kernel_size(crops_uint8.shape[-2],
                                 settings.blur_kernel_fraction)
  fn = functools.partial(_apply_one_crop, settings=settings,
                         kernel_size=kernel_size)
  return jax.vmap(jax.vmap(fn))(crops_uint8, decisions)


def apply_decisions(crops_uint8: jax.Array, decisions: dict[str, jax.Array],
                    aug_cfg) -> jax.Array:
  """Applies sampled decisions (see `sample_decisions`) to uint8 crops.

  Args:
    crops_uint8: [B, num_crops, S, S, 3] uint8.
    decisions: output of `sample_decisions` for the same B and num_crops.
    aug_cfg: the `augment` config section.

  Returns:
    float32 [B, num_crops, S, S, 3], normalised.
  """
  return _apply(crops_uint8, decisions, settings_from_config(aug_cfg))


@functools.partial(jax.jit, static_argnames=('settings', 'num_crops',
                                             'return_flags'))
def _augment_jit(crops_uint8, key, settings, num_crops, return_flags):
  decisions = _sample(key, crops_uint8.shape[0], settings, num_crops)
  out = _apply(crops_uint8, decisions, settings)
  return (out, decisions) if return_flags else out


def augment_crops(crops_uint8: jax.Array, key, aug_cfg, num_crops: int = 8,
                  return_flags: bool = False) -> Any:
  """Augments a batch of host crops (docs/METHOD.md section 1, steps 2-7).

  Jittable: call it directly (it is jitted with the settings as a static
  argument) or inside a jitted train step.

  Args:
    crops_uint8: [B, num_crops, S, S, 3] uint8 random-resized crops.
    key: PRNG key for the batch; split per example, then per crop.
    aug_cfg: the `augment` config section.
    num_crops: crops per example; crops < num_crops // 2 use view A.
    return_flags: also return the decisions dict of `sample_decisions`.

  Returns:
    float32 [B, num_crops, S, S, 3] normalised crops, or (crops, decisions)
    when return_flags.
  """
  if crops_uint8.ndim != 5 or crops_uint8.shape[1] != num_crops:
    raise ValueError(f'expected [B, {num_crops}, S, S, 3] crops, got '
                     f'{crops_uint8.shape}')
  return _augment_jit(crops_uint8, key, settings_from_config(aug_cfg),
                      num_crops, return_flags)
