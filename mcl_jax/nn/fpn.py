"""Feature pyramid network, mmdetection style with BatchNorm (docs/METHOD.md section 3)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.nn.resnet import Conv, batch_norm, conv_init, pad


def upsample_nearest(x, factor: int = 2):
  """Nearest-neighbour upsampling of NHWC maps by an integer factor."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class FPN(nn.Module):
  """Lateral 1x1 conv + BN per C_l, nearest top-down sum, 3x3 output conv + BN.

  No biases and no activations, as in the reference `FPN(norm_cfg=BN)`.
  Submodule names (lateralL / outputL, L = 2..5) map to detectron2's
  fpn_lateralL / fpn_outputL.
  """
  channels: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: dict[str, jax.Array], train: bool = True) -> dict[str, jax.Array]:
    """Maps {'C2'..'C5'} to {'P2'..'P5'} (strides 4..32)."""
    lat = {}
    for level in range(2, 6):
      y = Conv(self.channels, (1, 1), use_bias=False, dtype=self.dtype,
              param_dtype=jnp.float32, kernel_init=conv_init,
              name=f'lateral{level}_conv')(feats[f'C{level}'])
      lat[level] = batch_norm(train, self.dtype, f'lateral{level}_bn')(y)
    # Top-down: each level adds the (already summed) coarser one.
    for level in (4, 3, 2):
      lat[level] = lat[level] + upsample_nearest(lat[level + 1])
    outs = {}
    for level in range(2, 6):
      y = Conv(self.channels, (3, 3), padding=pad(3), use_bias=False,
              dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init,
              name=f'output{level}_conv')(lat[level])
      outs[f'P{level}'] = batch_norm(train, self.dtype, f'output{level}_bn')(y)
    return outs
