"""Image decoding and cropping shared by the sources.

Owns RandomResizedCrop (`sample_crop_windows`, torchvision's sampling, as
stateless TensorFlow ops), the decode of encoded bytes into an element's
image features (`decode_features`: fused JPEG decode of the crop windows'
union in TensorFlow, PNG in TensorFlow, anything else in PIL; then either the
resized crops, data.crop_on='host', or the padded buffer and windows that the
device crops from, 'device': `device_buffer`), PIL's conversion of odd formats (`pil_to_rgb_uint8`),
the evaluation resize + centre crop, and `DecodeStats`, the count of files
that could not be decoded.
"""

import io
import math
import threading
from typing import Any, Callable

from absl import logging
import numpy as np

from mcl_jax.data.lazy_tf import tf as _tf
from mcl_jax.data.spec import DataSpec

_JPEG_MAGIC = b'\xff\xd8\xff'
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


class DecodeStats:
  """Thread-safe counts of files skipped because they could not be decoded.

  Attributes:
    skipped_at_scan: files that PIL could not identify when the folder was
      listed (never enter the stream).
    failed_decodes: decode failures while streaming (counted per occurrence,
      i.e. again each epoch); those elements are dropped.
  """

  def __init__(self, skipped_at_scan: int = 0):
    self.skipped_at_scan = skipped_at_scan
    self.failed_decodes = 0
    self._lock = threading.Lock()

  def add_failure(self):
    with self._lock:
      self.failed_decodes += 1
      n = self.failed_decodes
    # Power-of-two logging: visible, but never floods the log.
    if n & (n - 1) == 0:
      logging.warning('input pipeline: %d undecodable image(s) skipped', n)

  @property
  def total(self) -> int:
    return self.skipped_at_scan + self.failed_decodes


def pil_to_rgb_uint8(im) -> np.ndarray:
  """Converts any PIL image to RGB uint8 [H, W, 3].

  16-bit (and 32-bit integer) grayscale is rescaled from 0..65535, not
  clipped at 255 as `convert('RGB')` would do; alpha is dropped (like
  torchvision's `pil_loader`); CMYK, palette and the rest go through PIL's
  own conversion.
  """
  if im.mode.startswith('I;16') or im.mode == 'I':
    x = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
    x = ((x * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1)
  if im.mode == 'F':
    x = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1)
  return np.asarray(im.convert('RGB'), dtype=np.uint8)


def pil_decode_bytes(data: bytes) -> np.ndarray:
  """Encoded image bytes -> RGB uint8 [H, W, 3], with PIL."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as im:
    im.load()
    return pil_to_rgb_uint8(im)


def make_pil_decoder(stats: DecodeStats) -> Callable[[bytes], Any]:
  """A numpy_function body: bytes -> (image, ok), counting failures."""
  def decode(data):
    try:
      img = pil_decode_bytes(bytes(data))
      if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError('empty image')
      return img, np.bool_(True)
    except Exception:  # pylint: disable=broad-except
      # Any failure means an unusable file: count it and drop the element.
      stats.add_failure()
      return np.zeros((1, 1, 3), np.uint8), np.bool_(False)
  return decode


def sample_crop_windows(seed, height, width, num_crops: int, scale, ratio,
                        tries: int = 10):
  """torchvision `RandomResizedCrop.get_params`, for num_crops crops at once.

  Each crop draws `tries` (area, log-aspect) candidates; the first that fits
  is used with a uniform offset; if none fits the crop falls back to the
  largest centred crop with the aspect ratio clamped into `ratio`. Sizes are
  rounded half-to-even like Python's round().

  Args:
    seed: int [2] stateless seed.
    height: image height (scalar tensor).
    width: image width (scalar tensor).
    num_crops: number of crops.
    scale: (min, max) fraction of the image area.
    ratio: (min, max) aspect ratio w / h.
    tries: candidates per crop (torchvision: 10).

  Returns:
    int32 [num_crops, 4] windows (y, x, h, w).
  """
  tf = _tf()
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  shape = [num_crops, tries]
  area = h * w * tf.random.stateless_uniform(
      shape, seeds[0], scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      shape, seeds[1], math.log(ratio[0]), math.log(ratio[1])))
  cw = tf.round(tf.sqrt(area * aspect))
  ch = tf.round(tf.sqrt(area / aspect))
  valid = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  first = tf.argmax(tf.cast(valid, tf.int32), axis=1, output_type=tf.int32)
  found = tf.reduce_any(valid, axis=1)
  cw = tf.gather(cw, first, axis=1, batch_dims=1)
  ch = tf.gather(ch, first, axis=1, batch_dims=1)
  in_ratio = w / h
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  cw = tf.where(found, cw, fb_w)
  ch = tf.where(found, ch, fb_h)
  # torch.randint(0, H - h + 1); min() guards against float rounding at 1.0.
  uy = tf.random.stateless_uniform([num_crops], seeds[2])
  ux = tf.random.stateless_uniform([num_crops], seeds[3])
  y = tf.where(found, tf.minimum(tf.floor(uy * (h - ch + 1)), h - ch),
               tf.floor((h - ch) / 2))
  x = tf.where(found, tf.minimum(tf.floor(ux * (w - cw + 1)), w - cw),
               tf.floor((w - cw) / 2))
  return tf.cast(tf.stack([y, x, ch, cw], axis=1), tf.int32)


def _resize_windows(image, origin, windows, size: int):
  """Cuts each window out of `image` and resizes it to size x size uint8.

  Bilinear with antialiasing, i.e. PIL's resize as torchvision uses it.

  Args:
    image: uint8 [H, W, 3] holding (at least) the union of the windows.
    origin: (y, x) of image's top-left corner in full-image coordinates.
    windows: int32 [n, 4] (y, x, h, w) in full-image coordinates.
    size: output side.

  Returns:
    uint8 [n, size, size, 3].
  """
  tf = _tf()
  out = []
  for k in range(windows.shape[0]):
    y, x, h, w = tf.unstack(windows[k])
    crop = image[y - origin[0]:y - origin[0] + h,
                 x - origin[1]:x - origin[1] + w]
    out.append(tf.image.resize(crop, [size, size], method='bilinear',
                               antialias=True))
  crops = tf.stack(out)
  return tf.cast(tf.clip_by_value(tf.round(crops), 0.0, 255.0), tf.uint8)


def window_union(windows):
  """(y0, x0, y1, x1): the smallest box holding every (y, x, h, w) window."""
  tf = _tf()
  return (tf.reduce_min(windows[:, 0]), tf.reduce_min(windows[:, 1]),
          tf.reduce_max(windows[:, 0] + windows[:, 2]),
          tf.reduce_max(windows[:, 1] + windows[:, 3]))


def device_buffer(region, origin, windows, max_side: int):
  """What crosses to the device when it cuts the crops (crop_on='device').

  The region (the decoded union of the windows) is downscaled, bilinear with
  antialiasing, so that its longer side is at most `max_side`; the windows
  move into its coordinates (floats once downscaled). It is not padded here:
  `stream.batched` pads it at the bottom and right into the fixed
  max_side^2 buffer while batching (`padded_batch` writes each image once,
  straight into the batch; padding each element first cost a third of the
  host's time).

  Args:
    region: uint8 [h, w, 3], the decoded union of the windows.
    origin: (y, x) of region's top-left corner in full-image coordinates.
    windows: int32 [n, 4] (y, x, h, w) in full-image coordinates.
    max_side: the buffer's side.

  Returns:
    {'image': uint8 [h, w, 3] with h, w <= max_side, 'size': int32 [2] its
     (h, w), 'windows': float32 [n, 4] (y, x, h, w) in its pixels}.
  """
  tf = _tf()
  hw = tf.shape(region)[:2]
  hw_f = tf.cast(hw, tf.float32)
  scale = tf.minimum(1.0, max_side / tf.reduce_max(hw_f))
  new_hw = tf.clip_by_value(tf.cast(tf.round(hw_f * scale), tf.int32), 1,
                            max_side)

  def downscale():
    small = tf.image.resize(region, new_hw, method='bilinear', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(small), 0.0, 255.0), tf.uint8)

  region = tf.cond(tf.reduce_any(new_hw < hw), downscale, lambda: region)
  # Per-axis factors: rounding new_hw makes them differ slightly.
  f = tf.cast(new_hw, tf.float32) / hw_f
  f = tf.concat([f, f], 0)
  shift = tf.cast(tf.stack([origin[0], origin[1], 0, 0]), tf.float32)
  buffer_windows = (tf.cast(windows, tf.float32) - shift) * f
  return {'image': region, 'size': new_hw, 'windows': buffer_windows}


def _finish(region, origin, windows, spec: DataSpec):
  """The element's image features from its decoded union of windows.

  'host': {'crops': uint8 [n, S, S, 3]}; 'device': `device_buffer`.
  """
  if spec.crop_on == 'device':
    return device_buffer(region, origin, windows, spec.max_side)
  return {'crops': _resize_windows(region, origin, windows, spec.image_size)}


def image_features(image, seed, spec: DataSpec):
  """The image features (see `_finish`) of a decoded uint8 [H, W, 3] image."""
  tf = _tf()
  shape = tf.shape(image)
  windows = sample_crop_windows(seed, shape[0], shape[1], spec.num_crops,
                                spec.crop_scale, spec.crop_ratio)
  y0, x0, y1, x1 = window_union(windows)
  return _finish(image[y0:y1, x0:x1], (y0, x0), windows, spec)


def _jpeg_features(data, seed, spec: DataSpec):
  """A JPEG's image features, decoding only the union of the crop windows."""
  tf = _tf()
  shape = tf.image.extract_jpeg_shape(data)
  windows = sample_crop_windows(seed, shape[0], shape[1], spec.num_crops,
                                spec.crop_scale, spec.crop_ratio)
  y0, x0, y1, x1 = window_union(windows)
  region = tf.image.decode_and_crop_jpeg(
      data, tf.stack([y0, x0, y1 - y0, x1 - x0]), channels=3)
  return _finish(region, (y0, x0), windows, spec)


def _png_to_uint8(data):
  # Decoding as uint16 handles 8- and 16-bit PNGs alike: 8-bit values come
  # back as x * 257, which the rescale maps back to x exactly.
  tf = _tf()
  x = tf.cast(tf.io.decode_png(data, channels=3, dtype=tf.uint16), tf.int32)
  return tf.cast((x * 255 + 32767) // 65535, tf.uint8)


def decode_features(data, force_pil, seed, spec: DataSpec, pil_decoder):
  """Encoded image bytes -> (image features, ok).

  The features are {'crops': uint8 [n, S, S, 3]} when `spec.crop_on` is
  'host', else `device_buffer`'s dict. JPEG: fused decode + crop in
  TensorFlow. PNG: TensorFlow. Anything else, or when `force_pil`: PIL in a
  numpy_function, which reports failures as ok = False instead of raising.
  """
  tf = _tf()
  magic = tf.strings.substr(data, 0, 8)
  is_jpeg = tf.strings.substr(magic, 0, 3) == _JPEG_MAGIC
  is_png = magic == _PNG_MAGIC

  def tf_jpeg():
    return _jpeg_features(data, seed, spec), tf.constant(True)

  def tf_png():
    return image_features(_png_to_uint8(data), seed, spec), tf.constant(True)

  def pil():
    image, ok = tf.numpy_function(pil_decoder, [data], [tf.uint8, tf.bool],
                                  stateful=False)
    image.set_shape([None, None, 3])
    ok.set_shape([])
    return image_features(image, seed, spec), ok

  return tf.cond(
      is_jpeg & ~force_pil, tf_jpeg,
      lambda: tf.cond(is_png & ~force_pil, tf_png, pil))


def eval_resize_size(spec: DataSpec) -> int:
  """Shorter side before the evaluation centre crop: 256 for 224 at 0.875."""
  return int(round(spec.image_size / spec.eval_crop_fraction))


def pil_center_resize(img: np.ndarray, size: int, resize: int) -> np.ndarray:
  """Shorter side -> resize (bilinear, antialiased), then centre crop."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = Image.fromarray(img)
  w, h = im.size
  scale = resize / min(w, h)
  nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
  im = im.resize((nw, nh), Image.BILINEAR)
  # torchvision CenterCrop offsets.
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  return np.asarray(im.crop((left, top, left + size, top + size)))
