"""Export of MCLNet weights to detectron2 (.pkl) and torchvision (.pth) layouts.

Pure functions from a Flax variables dict {'params', 'batch_stats'} of an
MCLNet (the online network, or the target's encoder subtree backbone / fpn /
neck) to flat name -> array dicts, plus two writers (docs/METHOD.md section 6):

* `to_detectron2`: stem / resS.B / fpn_lateralL / fpn_outputL / box_head.convK
  names, for detectron2's Mask R-CNN R50-FPN with a 4conv1fc box head; the MCL
  neck's four region convs (and their BatchNorms) become the box head's convs.
* `to_torchvision`: a torchvision ResNet state dict without `fc`.

The command line is `python -m mcl_jax.export` (mcl_jax/export.py).

Convolution kernels go from Flax HWIO to torch OIHW, BatchNorm scale / bias
become weight / bias and batch_stats mean / var become running_mean /
running_var. Every array is float32 NumPy (num_batches_tracked: int64 0-d).
"""

import io
import pickle
import re
from typing import Any, Mapping

import numpy as np

from mcl_jax import cli, errors, paths

NORM_SUFFIXES = ('weight', 'bias', 'running_mean', 'running_var')
_BLOCK_RE = re.compile(r'^layer(\d+)_(\d+)$')


class ExportError(errors.RunError, ValueError):
  """Variables that do not hold what the requested export needs."""


def _subtree(variables: Mapping[str, Any], collection: str, name: str) -> Mapping[str, Any]:
  """variables[collection][name], or an ExportError saying what is missing."""
  if collection not in variables:
    raise ExportError(f"variables have no '{collection}' collection (have "
                      f"{sorted(variables)}); pass {{'params': ..., 'batch_stats': ...}}")
  tree = variables[collection]
  if name not in tree:
    raise ExportError(f"variables['{collection}'] has no '{name}' subtree (have "
                      f"{sorted(tree)}); export needs an MCLNet's or its encoder's variables")
  return tree[name]


def conv_weight(kernel) -> np.ndarray:
  """Flax conv kernel HWIO -> torch weight OIHW, float32."""
  k = np.asarray(kernel, dtype=np.float32)
  if k.ndim != 4:
    raise ExportError(f'expected a 4-d HWIO conv kernel, got shape {k.shape}')
  return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


def norm_arrays(params: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A Flax BatchNorm's scale / bias / mean / var as torch BatchNorm names."""
  values = (params['scale'], params['bias'], stats['mean'], stats['var'])
  return {s: np.asarray(v, dtype=np.float32) for s, v in zip(NORM_SUFFIXES, values)}


def _conv_bn(params, stats, conv: str, bn: str, conv_name: str, norm_prefix: str):
  """One conv + its BatchNorm: {conv_name: OIHW, norm_prefix + suffix: ...}."""
  out = {conv_name: conv_weight(params[conv]['kernel'])}
  for suffix, value in norm_arrays(params[bn], stats[bn]).items():
    out[f'{norm_prefix}{suffix}'] = value
  return out


def resnet_blocks(backbone_params: Mapping[str, Any]) -> list[tuple[int, int, str]]:
  """(stage 1..4, block, flax name) of every residual block, in order."""
  blocks = []
  for name in backbone_params:
    m = _BLOCK_RE.match(name)
    if m:
      blocks.append((int(m.group(1)), int(m.group(2)), name))
  if not blocks:
    raise ExportError('backbone params hold no layer{S}_{B} blocks: not an mcl_jax ResNet')
  return sorted(blocks)


def block_convs(block_params: Mapping[str, Any]) -> tuple[int, ...]:
  """Conv indices of a block: (1, 2, 3) for Bottleneck, (1, 2) for BasicBlock."""
  return (1, 2, 3) if 'conv3' in block_params else (1, 2)


def _resnet_entries(variables: Mapping[str, Any]):
  """Yields (kind, stage, block, k, params, stats, conv, bn) for every conv of the backbone.

  kind is 'stem', 'conv' or 'shortcut'; stage / block / k are None where
  they do not apply.
  """
  params = _subtree(variables, 'params', 'backbone')
  stats = _subtree(variables, 'batch_stats', 'backbone')
  yield 'stem', None, None, None, params, stats, 'conv1', 'bn1'
  for stage, block, name in resnet_blocks(params):
    p, s = params[name], stats[name]
    for k in block_convs(p):
      yield 'conv', stage, block, k, p, s, f'conv{k}', f'bn{k}'
    if 'downsample_conv' in p:
      yield 'shortcut', stage, block, None, p, s, 'downsample_conv', 'downsample_bn'


def detectron2_resnet(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The backbone as detectron2 ResNet names (stem, res2..res5)."""
  out = {}
  for kind, stage, block, k, p, s, conv, bn in _resnet_entries(variables):
    if kind == 'stem':
      name = 'stem.conv1'
    elif kind == 'conv':
      name = f'res{stage + 1}.{block}.conv{k}'
    else:
      name = f'res{stage + 1}.{block}.shortcut'
    out.update(_conv_bn(p, s, conv, bn, f'{name}.weight', f'{name}.norm.'))
  return out


def detectron2_fpn(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The FPN as detectron2 names: fpn_lateralL / fpn_outputL (L = 2..5), with norms."""
  params = _subtree(variables, 'params', 'fpn')
  stats = _subtree(variables, 'batch_stats', 'fpn')
  out = {}
  for level in range(2, 6):
    for flax_name, d2_name in (('lateral', 'fpn_lateral'), ('output', 'fpn_output')):
      name = f'{d2_name}{level}'
      out.update(_conv_bn(params, stats, f'{flax_name}{level}_conv', f'{flax_name}{level}_bn',
                          f'{name}.weight', f'{name}.norm.'))
  return out


def detectron2_box_head(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The neck's region convs as detectron2's box_head.convK (K = 1..num_convs)."""
  params = _subtree(variables, 'params', 'neck')
  stats = _subtree(variables, 'batch_stats', 'neck')
  convs = sorted(int(n[4:]) for n in params if re.fullmatch(r'conv\d+', n))
  if not convs:
    raise ExportError('neck params hold no conv{K} layers')
  out = {}
  for k in convs:
    name = f'box_head.conv{k}'
    out.update(_conv_bn(params, stats, f'conv{k}', f'bn{k}', f'{name}.weight', f'{name}.norm.'))
  return out


def to_detectron2(variables: Mapping[str, Any], fpn: bool = True,
                  box_head: bool = True) -> dict[str, Any]:
  """The detectron2 checkpoint dict of an MCLNet (or its encoder) variables.

  Args:
    variables: {'params': ..., 'batch_stats': ...} with 'backbone' (and 'fpn',
      'neck' when exported) subtrees.
    fpn: export the FPN (fpn_lateralL / fpn_outputL).
    box_head: export the neck's region convs as box_head.convK.

  Returns:
    {'model': {name: float32 array}, '__author__': 'mcl_jax',
     'matching_heuristics': True}, ready for `save_detectron2`.

  Raises:
    ExportError: a needed subtree is missing.
  """
  model = detectron2_resnet(variables)
  if fpn:
    model.update(detectron2_fpn(variables))
  if box_head:
    model.update(detectron2_box_head(variables))
  return {'model': model, '__author__': 'mcl_jax', 'matching_heuristics': True}


def to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The backbone as a torchvision ResNet state dict (no fc), NumPy arrays.

  BasicBlock backbones (depth 18 / 34) give conv1 / conv2 per block,
  Bottleneck ones conv1..conv3. Each BatchNorm also gets a 0-d int64
  `num_batches_tracked` of 0.

  Raises:
    ExportError: the variables have no backbone params / batch_stats.
  """
  out = {}
  for kind, stage, block, k, p, s, conv, bn in _resnet_entries(variables):
    if kind == 'stem':
      conv_name, norm_prefix = 'conv1.weight', 'bn1.'
    elif kind == 'conv':
      conv_name, norm_prefix = f'layer{stage}.{block}.conv{k}.weight', f'layer{stage}.{block}.bn{k}.'
    else:
      conv_name = f'layer{stage}.{block}.downsample.0.weight'
      norm_prefix = f'layer{stage}.{block}.downsample.1.'
    out.update(_conv_bn(p, s, conv, bn, conv_name, norm_prefix))
    out[f'{norm_prefix}num_batches_tracked'] = np.array(0, dtype=np.int64)
  return out


def save_detectron2(checkpoint: Mapping[str, Any], path: str) -> None:
  """Pickles a `to_detectron2` dict (detectron2 loads .pkl files this way)."""
  if not str(path).endswith('.pkl'):
    raise ExportError(f'{path}: detectron2 only treats *.pkl files as pickled weights')
  paths.write_atomic(path, pickle.dumps(dict(checkpoint), protocol=pickle.HIGHEST_PROTOCOL))


TORCH_INSTALL = ('pip install -e ".[torch]" (the optional extra, a CPU build of '
                 'PyTorch), or any PyTorch build with pip install torch')


def torch_module():
  """PyTorch, or MissingDependencyError naming the install command."""
  return cli.require('torch', 'the torchvision export', TORCH_INSTALL)


def save_torchvision(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """torch.save of a `to_torchvision` dict as torch tensors."""
  torch = torch_module()
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
  if not paths.is_cloud(path):
    torch.save(tensors, path)
    return
  buf = io.BytesIO()  # the file torch.save writes, in memory, then one upload
  torch.save(tensors, buf)
  paths.write_atomic(path, buf.getvalue())


def export(variables: Mapping[str, Any], fmt: str, path: str) -> list[str]:
  """Writes variables in format 'detectron2' or 'torchvision'; returns the names written."""
  if fmt == 'detectron2':
    ckpt = to_detectron2(variables)
    save_detectron2(ckpt, path)
    return sorted(ckpt['model'])
  if fmt == 'torchvision':
    sd = to_torchvision(variables)
    save_torchvision(sd, path)
    return sorted(sd)
  raise ExportError(f"format={fmt!r}: must be 'detectron2' or 'torchvision'")
