"""Export of a fine-tuned MaskRCNN to a detectron2 Mask R-CNN R50-FPN checkpoint (.pkl).

Every name is detectron2's full module path (backbone.bottom_up.*,
backbone.fpn_*, proposal_generator.rpn_head.*, roi_heads.*), so the file
loads by exact name (`matching_heuristics` False): a fine-tuned detector is a
whole model, and exact names leave no suffix matching to guess. The
backbone, FPN and box-head convs reuse the pretraining exporter's mappings
(`mcl_jax.eval.exporters`); the layouts:

* conv kernels HWIO -> OIHW; Dense kernels [in, out] -> Linear [out, in];
* fc1 reads the pooled 7 x 7 x C map flattened in (h, w, c) order here and
  (c, h, w) order in detectron2, so its input axis is permuted;
* Flax's ConvTranspose is torch's ConvTranspose2d with the kernel flipped
  spatially: [kh, kw, in, out] -> flip -> [in, out, kh, kw];
* BatchNorm scale / bias / mean / var -> norm.weight / bias / running_mean /
  running_var.
"""

from typing import Any, Mapping

import numpy as np

from mcl_jax.eval import exporters as export_lib


def _np(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def _linear(dense: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
  return {f'{prefix}.weight': np.ascontiguousarray(_np(dense['kernel']).T),
          f'{prefix}.bias': _np(dense['bias'])}


def _conv(conv: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
  out = {f'{prefix}.weight': export_lib.conv_weight(conv['kernel'])}
  if 'bias' in conv:
    out[f'{prefix}.bias'] = _np(conv['bias'])
  return out


def _conv_norm(params, stats, k: int, prefix: str) -> dict[str, np.ndarray]:
  out = _conv(params[f'conv{k}'], prefix)
  for suffix, value in export_lib.norm_arrays(params[f'bn{k}'], stats[f'bn{k}']).items():
    out[f'{prefix}.norm.{suffix}'] = value
  return out


def fc1_weight(kernel, pooled: int, channels: int) -> np.ndarray:
  """fc1's Dense kernel [h*w*c, out] (h, w, c order) as detectron2's Linear [out, c*h*w]."""
  k = _np(kernel)
  out = k.shape[1]
  k = k.reshape(pooled, pooled, channels, out).transpose(3, 2, 0, 1)
  return np.ascontiguousarray(k.reshape(out, channels * pooled * pooled))


def deconv_weight(kernel) -> np.ndarray:
  """Flax ConvTranspose kernel [kh, kw, in, out] -> torch ConvTranspose2d [in, out, kh, kw]."""
  return np.ascontiguousarray(_np(kernel)[::-1, ::-1].transpose(2, 3, 0, 1))


def to_detectron2_maskrcnn(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Every weight of a MaskRCNN under detectron2's full Mask R-CNN names.

  Args:
    variables: {'params', 'batch_stats'} of `model.MaskRCNN`.

  Returns:
    {name: float32 array}.
  """
  params, stats = variables['params'], variables['batch_stats']
  out = {f'backbone.bottom_up.{k}': v for k, v in export_lib.detectron2_resnet(variables).items()}
  out.update({f'backbone.{k}': v for k, v in export_lib.detectron2_fpn(variables).items()})
  rpn = params['rpn_head']
  for name in ('conv', 'objectness_logits', 'anchor_deltas'):
    out.update(_conv(rpn[name], f'proposal_generator.rpn_head.{name}'))
  # The box head's convK / bnK are named as the pretraining neck's.
  head = export_lib.detectron2_box_head({'params': {'neck': params['box_head']},
                                         'batch_stats': {'neck': stats['box_head']}})
  out.update({f'roi_heads.{k}': v for k, v in head.items()})
  fc1 = params['box_head']['fc1']
  channels = params['box_head']['conv1']['kernel'].shape[-1]
  pooled = int(round((fc1['kernel'].shape[0] // channels)**0.5))
  out['roi_heads.box_head.fc1.weight'] = fc1_weight(fc1['kernel'], pooled, channels)
  out['roi_heads.box_head.fc1.bias'] = _np(fc1['bias'])
  for name in ('cls_score', 'bbox_pred'):
    out.update(_linear(params['box_predictor'][name], f'roi_heads.box_predictor.{name}'))
  mask, mask_stats = params['mask_head'], stats['mask_head']
  k = 1
  while f'conv{k}' in mask:
    out.update(_conv_norm(mask, mask_stats, k, f'roi_heads.mask_head.mask_fcn{k}'))
    k += 1
  out['roi_heads.mask_head.deconv.weight'] = deconv_weight(mask['deconv']['kernel'])
  out['roi_heads.mask_head.deconv.bias'] = _np(mask['deconv']['bias'])
  out.update(_conv(mask['predictor'], 'roi_heads.mask_head.predictor'))
  return out


def save_detectron2_maskrcnn(variables: Mapping[str, Any], path: str) -> list[str]:
  """Writes a detectron2 .pkl ({'model', '__author__', 'matching_heuristics': False}).

  Returns:
    The names written.
  """
  model = to_detectron2_maskrcnn(variables)
  export_lib.save_detectron2({'model': model, '__author__': 'mcl_jax',
                              'matching_heuristics': False}, path)
  return sorted(model)
