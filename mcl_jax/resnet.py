"""ResNet in torchvision's layout, returning C2..C5.

Module and parameter names follow torchvision (conv1/bn1, layerS.B.convK,
downsample) closely enough that `export.py` maps them one-to-one, and every
padding is explicit and symmetric as in PyTorch: Flax's 'SAME' pads stride-2
convolutions asymmetrically, which silently shifts exported features.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

# Kaiming normal, fan_out, for ReLU: torchvision's / the reference's conv init.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# PyTorch BatchNorm momentum 0.1 is Flax momentum 0.9; eps as in PyTorch.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5

STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}


def pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric PyTorch padding for a k x k kernel."""
  p = (k - 1) // 2
  return ((p, p), (p, p))


# Convolutions whose output has at most this many pixels run as one dense
# matmul per image (see `Conv`); 0 sends every conv to XLA's convolution (the
# benchmarks' before/after switch).
DENSE_MAX_OUTPUT_PIXELS = 4


def dense_conv(x, kernel, strides: tuple[int, int], padding) -> jnp.ndarray:
  """NHWC convolution computed as one dense matmul per image.

  Input pixel q reaches output pixel p through tap t when q = s * p + t - pad
  (per axis), so the whole conv is a linear map [H*W*C_in] -> [H'*W'*C_out]
  whose weight is assembled from the kernel with a static 0/1 selection. The
  padding's zeros are never multiplied, and on maps of a few pixels this is
  much faster than XLA's CPU convolution (docs/PERFORMANCE.md). The weight has
  H*W*H'*W' * C_in*C_out entries, so this only pays for tiny maps.

  Args:
    x: [N, H, W, C_in].
    kernel: [kh, kw, C_in, C_out] (HWIO, as nn.Conv).
    strides: (sy, sx).
    padding: ((top, bottom), (left, right)).

  Returns:
    [N, H', W', C_out], equal to the convolution up to summation order.
  """
  n, h, w, cin = x.shape
  kh, kw, _, cout = kernel.shape
  (pt, pb), (pl, pr) = padding
  ho, wo = (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1
  sel = np.zeros((h * w, ho * wo, kh * kw), np.float32)  # [input pixel, output pixel, tap]
  for py in range(ho):
    for px in range(wo):
      for ty in range(kh):
        for tx in range(kw):
          qy, qx = strides[0] * py + ty - pt, strides[1] * px + tx - pl
          if 0 <= qy < h and 0 <= qx < w:
            sel[qy * w + qx, py * wo + px, ty * kw + tx] = 1.0
  big = jnp.einsum('qpt,tcd->qcpd', jnp.asarray(sel, kernel.dtype),
                   kernel.reshape(kh * kw, cin, cout)).reshape(h * w * cin, ho * wo * cout)
  return (x.reshape(n, h * w * cin) @ big).reshape(n, ho, wo, cout)


class Conv(nn.Conv):
  """`nn.Conv` with a dense-matmul path for maps of at most 2 x 2 output pixels.

  Same parameter ('kernel', HWIO) and same function. Kernels larger than 1x1
  with explicit padding and tiny outputs (ResNet layer3/4, FPN P4/P5 and the
  neck's regions on 32-64 px canvases) go through `dense_conv`: XLA's CPU
  convolution runs 10-70x slower than PyTorch's on such maps
  (benchmarks/conv_micro.py). The reference 224 px canvases never take this
  path (their smallest maps are 7 x 7), so accelerator runs are unaffected.
  """

  @nn.compact
  def __call__(self, inputs):
    ks = tuple(self.kernel_size)
    st = self.strides if self.strides is not None else 1
    strides = (st, st) if isinstance(st, int) else tuple(st)
    pad_ = self.padding
    explicit = (isinstance(pad_, (tuple, list)) and len(pad_) == 2
                and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pad_))
    plain = (inputs.ndim == 4 and ks[0] * ks[1] > 1 and explicit and not self.use_bias
             and self.feature_group_count == 1 and self.kernel_dilation in (None, 1, (1, 1))
             and self.input_dilation in (None, 1, (1, 1)))
    if plain:
      ho = (inputs.shape[1] + sum(pad_[0]) - ks[0]) // strides[0] + 1
      wo = (inputs.shape[2] + sum(pad_[1]) - ks[1]) // strides[1] + 1
      if ho * wo <= DENSE_MAX_OUTPUT_PIXELS:
        kernel = self.param('kernel', self.kernel_init, ks + (inputs.shape[-1], self.features),
                            self.param_dtype)
        dtype = self.dtype or jnp.result_type(inputs.dtype, self.param_dtype)
        return dense_conv(inputs.astype(dtype), kernel.astype(dtype), strides,
                          tuple(tuple(p) for p in pad_))
    return super().__call__(inputs)


def batch_norm(train: bool, dtype: Any, name: str, scale_init=nn.initializers.ones):
  return nn.BatchNorm(
      use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
      dtype=dtype, param_dtype=jnp.float32, scale_init=scale_init, name=name)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: 3x3 (stride) -> 3x3, projection on shape change."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=conv_init)
    y = conv(self.features, (3, 3), (self.stride, self.stride), pad(3), name='conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    y = conv(self.features, (3, 3), padding=pad(3), name='conv2')(y)
    y = batch_norm(train, self.dtype, 'bn2')(y)
    return nn.relu(y + _shortcut(self, x, self.features, train))


class Bottleneck(nn.Module):
  """torchvision Bottleneck ("pytorch" style: the stride sits on the 3x3 conv)."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=conv_init)
    y = conv(self.features, (1, 1), name='conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    y = conv(self.features, (3, 3), (self.stride, self.stride), pad(3), name='conv2')(y)
    y = nn.relu(batch_norm(train, self.dtype, 'bn2')(y))
    y = conv(self.features * 4, (1, 1), name='conv3')(y)
    y = batch_norm(train, self.dtype, 'bn3')(y)
    return nn.relu(y + _shortcut(self, x, self.features * 4, train))


def _shortcut(block: nn.Module, x, out_features: int, train: bool):
  """Identity, or 1x1 conv (stride) + BN when the shape changes (torchvision 'downsample')."""
  if x.shape[-1] == out_features and block.stride == 1:
    return x
  y = Conv(out_features, (1, 1), (block.stride, block.stride), use_bias=False,
              dtype=block.dtype, param_dtype=jnp.float32, kernel_init=conv_init,
              name='downsample_conv')(x)
  return batch_norm(train, block.dtype, 'downsample_bn')(y)


class ResNet(nn.Module):
  """ResNet trunk without the classifier.

  Attributes:
    depth: 18, 34, 50 or 101 (torchvision stage sizes), unless `stage_sizes`
      is given (tiny test variants).
    width: channels of the stem and of the first stage's bottleneck (64 in
      torchvision); stage s uses width * 2**s.
    stage_sizes: overrides the blocks per stage, e.g. (1, 1, 1, 1).
    block: 'bottleneck' or 'basic'; default from depth (>= 50: bottleneck).
    dtype: compute dtype; parameters are float32.
  """
  depth: int = 50
  width: int = 64
  stage_sizes: Sequence[int] | None = None
  block: str | None = None
  dtype: Any = jnp.float32

  @property
  def block_cls(self):
    kind = self.block or ('bottleneck' if self.depth >= 50 else 'basic')
    return {'bottleneck': Bottleneck, 'basic': BasicBlock}[kind]

  @property
  def out_channels(self) -> tuple[int, ...]:
    """Channels of C2..C5."""
    return tuple(self.width * 2**s * self.block_cls.expansion for s in range(4))

  @nn.compact
  def __call__(self, x, train: bool = True) -> dict[str, Any]:
    """Maps NHWC images to {'C2': stride 4, ..., 'C5': stride 32}."""
    if self.depth not in STAGE_SIZES and self.stage_sizes is None:
      raise ValueError(f'model.depth={self.depth}: must be one of {sorted(STAGE_SIZES)}')
    stages = tuple(self.stage_sizes or STAGE_SIZES[self.depth])
    x = x.astype(self.dtype)
    x = Conv(self.width, (7, 7), (2, 2), padding=pad(7), use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init,
                name='conv1')(x)
    x = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=pad(3))
    outs = {}
    for s, num_blocks in enumerate(stages):
      for b in range(num_blocks):
        stride = 2 if (s > 0 and b == 0) else 1
        x = self.block_cls(self.width * 2**s, stride, self.dtype,
                           name=f'layer{s + 1}_{b}')(x, train)
      outs[f'C{s + 2}'] = x
    return outs
