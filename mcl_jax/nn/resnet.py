"""ResNet in torchvision's layout, returning C2..C5.

Module and parameter names follow torchvision (conv1/bn1, layerS.B.convK,
downsample) closely enough that `export.py` maps them one-to-one, and every
padding is explicit and symmetric as in PyTorch: Flax's 'SAME' pads stride-2
convolutions asymmetrically, which silently shifts exported features.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax.nn import remat as remat_lib
from mcl_jax.nn.batch_norm import BatchNorm

# Kaiming normal, fan_out, for ReLU: torchvision's / the reference's conv init.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


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


# Backbone recomputation settings (`ResNet.remat`).
REMAT = ('none', 'blocks', 'stages')

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

  def weight(kernel):
    return jnp.einsum('qpt,tcd->qcpd', jnp.asarray(sel, kernel.dtype),
                      kernel.reshape(kh * kw, cin, cout)).reshape(h * w * cin, ho * wo * cout)
  # The backward pass rebuilds the weight from the kernel rather than keeping
  # it: it is (H*W*H'*W') / (kh*kw) times the kernel's size.
  big = remat_lib.checkpoint(weight, remat_lib.RECOMPUTE)(kernel)
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


@jax.custom_vjp
def max_pool(x):
  """3 x 3 max pooling, stride 2, padding 1 (the torchvision stem) of NHWC maps.

  Equal to `nn.max_pool` forward and backward: the gradient goes to the first
  maximum of each window in row-major order, as XLA's select-and-scatter
  sends it. It is computed from nine strided slices instead, because XLA's
  CPU compiler expands select-and-scatter with an int32 index map of the
  padded input that it computes at the start of the program and keeps alive
  to the end (a quarter of the stem's output per canvas).
  """
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=pad(3))


def _max_pool_fwd(x):
  return max_pool(x), x


def _max_pool_bwd(x, g):
  x = remat_lib.tie(x, g)  # nothing below may run before g exists
  n, h, w, c = x.shape
  _, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  taps = [jax.lax.slice(xp, (0, ty, tx, 0), (n, ty + 2 * ho - 1, tx + 2 * wo - 1, c),
                        (1, 2, 2, 1)) for ty in range(3) for tx in range(3)]
  # The maximum again, from the same saved x: XLA may fuse the forward's
  # producer into the pooling and round it differently from the saved copy,
  # so the forward output cannot be compared with these taps.
  y = functools.reduce(jnp.maximum, taps)
  taken = jnp.zeros(y.shape, bool)
  dx = jnp.zeros(xp.shape, jnp.float32)  # overlapping windows add up: in float32
  g, zero = g.astype(jnp.float32), jnp.zeros((), jnp.float32)
  for t, tap in enumerate(taps):
    ty, tx = divmod(t, 3)
    hit = (tap == y) & ~taken
    taken = taken | hit
    # Back onto the padded input grid: every second row / column from (ty, tx).
    dx = dx + jax.lax.pad(jnp.where(hit, g, zero), zero,
                          ((0, 0, 0), (ty, h + 2 - ty - 2 * ho + 1, 1),
                           (tx, w + 2 - tx - 2 * wo + 1, 1), (0, 0, 0)))
  return (dx[:, 1:h + 1, 1:w + 1].astype(x.dtype),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def batch_norm(train: bool, dtype: Any, name: str, scale_init=nn.initializers.ones, **kw):
  return BatchNorm(use_running_average=not train, dtype=dtype, scale_init=scale_init, name=name,
                   **kw)


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
    y = batch_norm(train, self.dtype, 'bn1')(y, relu=True)
    y = conv(self.features, (3, 3), padding=pad(3), name='conv2')(y)
    return batch_norm(train, self.dtype, 'bn2')(
        y, _shortcut(self, x, self.features, train), relu=True)


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
    y = batch_norm(train, self.dtype, 'bn1')(y, relu=True)
    y = conv(self.features, (3, 3), (self.stride, self.stride), pad(3), name='conv2')(y)
    y = batch_norm(train, self.dtype, 'bn2')(y, relu=True)
    y = conv(self.features * 4, (1, 1), name='conv3')(y)
    # relu(bn3(y) + shortcut) in one BatchNorm call: its backward recomputes from y.
    return batch_norm(train, self.dtype, 'bn3')(
        y, _shortcut(self, x, self.features * 4, train), relu=True)


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
    remat: what the backward pass recomputes instead of keeping (see REMAT):
      'none', 'blocks' (keeps each block's input) or 'stages' (keeps each
      stage's input).
  """
  depth: int = 50
  width: int = 64
  stage_sizes: Sequence[int] | None = None
  block: str | None = None
  dtype: Any = jnp.float32
  remat: str = 'none'

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
    if self.remat not in REMAT:
      raise ValueError(f'ResNet remat={self.remat!r}: must be one of {REMAT}')
    stages = tuple(self.stage_sizes or STAGE_SIZES[self.depth])
    # Every block (and the stem) is a unit whose backward pass waits for its
    # cotangent; 'blocks' recomputes its inside, 'stages' a whole stage.
    unit = remat_lib.RECOMPUTE if self.remat == 'blocks' else remat_lib.KEEP
    # `self` is argument 0 of the lifted __call__(self, x, train).
    block_cls = remat_lib.remat(self.block_cls, static_argnums=(2,), policy=unit)

    def stem(mdl, x):
      x = Conv(self.width, (7, 7), (2, 2), padding=pad(7), use_bias=False,
               dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init,
               name='conv1', parent=mdl)(x)
      x = batch_norm(train, self.dtype, 'bn1', parent=mdl)(x, relu=True)
      return max_pool(x)

    def stage(s):
      def run(mdl, x):
        for b in range(stages[s]):
          stride = 2 if (s > 0 and b == 0) else 1
          x = block_cls(self.width * 2**s, stride, self.dtype, name=f'layer{s + 1}_{b}',
                        parent=mdl)(x, train)
        return x
      return run

    # The functions' modules are this module's children: the same parameter
    # names with and without remat.
    policy = remat_lib.KEEP if self.remat == 'none' else remat_lib.RECOMPUTE
    # Cast before the stem: a recomputed stem keeps its input in the compute dtype.
    x = remat_lib.remat(stem, policy=policy)(self, x.astype(self.dtype))
    outs = {}
    for s in range(len(stages)):
      run = stage(s)
      x = (remat_lib.remat(run) if self.remat == 'stages' else run)(self, x)
      outs[f'C{s + 2}'] = x
    return outs
