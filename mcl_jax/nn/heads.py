"""Region neck and per-level predictors, with per-group BatchNorm statistics.

The reference applies its neck (`DetConvGpNonLinearHead`) once per FPN level,
so every BatchNorm in the neck normalises each level's regions with that
level's own batch statistics (docs/METHOD.md section 3). Here the neck runs once
over the regions of all levels (one batched conv per layer) and
`batch_norm.GroupedBatchNorm` keeps the per-level statistics: rows are split
into statically sized groups, each normalised with its own mean and variance.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mcl_jax.nn.batch_norm import GroupedBatchNorm
from mcl_jax.nn import remat as remat_lib
from mcl_jax.nn.resnet import Conv, conv_init

# Reference neck Linear layers: kaiming_init(mode='fan_in', relu), bias 0.
neck_dense_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
# Reference predictor Linear layers: normal_init(std=0.01), bias 0.
predictor_dense_init = nn.initializers.normal(0.01)


class RegionNeck(nn.Module):
  """The reference `DetConvGpNonLinearHead`: convs on each region, pool, MLP.

  Each region is its own image of region_size x region_size, so the 3x3
  convs zero-pad at the region border, as in the reference.

  Attributes:
    remat: recompute each conv + BN + ReLU layer in the backward pass,
      keeping only its input (one layer's activations at a time instead of
      the whole stack's; the BN statistics span all regions, so a layer is
      the smallest unit).
  """
  channels: int = 256
  num_convs: int = 4
  hidden: int = 2048
  out_dim: int = 256
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, regions, group_sizes: Sequence[int], train: bool = True):
    """Maps regions [R, k, k, C] to embeddings [R, out_dim] (float32)."""

    def layer(k):
      def run(mdl, x):
        # Regions of <= 2 x 2 (canvases of <= 64 px) take Conv's dense-matmul path.
        x = Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                 dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init,
                 name=f'conv{k}', parent=mdl)(x)
        return GroupedBatchNorm(dtype=self.dtype, name=f'bn{k}', parent=mdl)(
            x, group_sizes, train, relu=True)
      # Each layer's backward pass waits for its cotangent (see remat.py).
      return remat_lib.remat(run, policy=remat_lib.RECOMPUTE if self.remat else remat_lib.KEEP)

    x = regions
    for k in range(1, self.num_convs + 1):
      x = layer(k)(self, x)

    def head(mdl, x):
      x = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
      x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=neck_dense_init, name='fc1', parent=mdl)(x)
      x = GroupedBatchNorm(dtype=self.dtype, name='fc1_bn', parent=mdl)(
          x, group_sizes, train, relu=True)
      x = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=neck_dense_init, name='fc2', parent=mdl)(x)
      return GroupedBatchNorm(use_scale=False, use_bias=False, dtype=jnp.float32,
                              name='fc2_bn', parent=mdl)(x, group_sizes, train)
    return remat_lib.remat(head, policy=remat_lib.KEEP)(self, x)


class Predictor(nn.Module):
  """Linear -> BN -> ReLU -> Linear (the reference `NonLinearNeckV2`)."""
  hidden: int = 2048
  out_dim: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, group_sizes: Sequence[int], train: bool = True):
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=predictor_dense_init, name='fc1')(x)
    x = GroupedBatchNorm(dtype=self.dtype, name='fc1_bn')(x, group_sizes, train, relu=True)
    x = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=predictor_dense_init, name='fc2')(x)
    return x.astype(jnp.float32)
