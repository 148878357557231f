"""Initialising the detector from a pretraining run or a ResNet-50 file.

Sources (`config.pretrained`):

* a pretraining workdir: the online network's backbone and FPN, and the
  region neck's convK / bnK (kernels, scale, bias, running statistics) as
  the box head's convK / bnK, exactly the arrays the detectron2 exporter
  (`mcl_jax.eval.exporters.to_detectron2`) writes for the reference converter;
* 'none': the initialisation as it is;
* 'torchvision:PATH.pth': a torchvision ResNet state dict (backbone only;
  needs PyTorch);
* 'detectron2:PATH.pkl': a detectron2 checkpoint with ResNet names (with or
  without the backbone.bottom_up. prefix); its FPN and box-head convs too
  when it has them (the pretraining exporter's files do).

Everything else keeps detectron2's fresh initialisation.
"""

import copy
import io
import pickle
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from mcl_jax import errors, paths
from mcl_jax.eval import exporters as export_lib

# Pretraining config.model fields that decide the backbone's, FPN's and box head's shapes.
MATCHING_FIELDS = ('depth', 'width', 'stage_sizes', 'block', 'fpn_channels')


class PretrainedMismatchError(errors.UsageError):
  """The pretrained weights do not fit the detection config."""


class PretrainedFileError(errors.RunError):
  """A torchvision / detectron2 weights file that cannot be read or lacks names."""


def _norm(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def check_matching(pre_model, model, source: str):
  """Raises PretrainedMismatchError naming the first differing config.model field."""
  for field in MATCHING_FIELDS:
    a, b = _norm(pre_model.get(field)), _norm(model.get(field))
    if a != b:
      raise PretrainedMismatchError(
          f'pretrained {source!r} has model.{field}={a!r} but the detection config has '
          f'{b!r}: set config.model.{field}={a!r} (the backbone must match the pretraining)')


def _put(tree: dict, path: tuple, value, source: str):
  """tree[path] = value (float32), refusing a shape mismatch."""
  node = tree
  for key in path[:-1]:
    node = node[key]
  old = node[path[-1]]
  value = np.asarray(value, np.float32)
  if tuple(old.shape) != value.shape:
    raise PretrainedMismatchError(
        f'{source}: {"/".join(path)} has shape {value.shape} but the detector needs '
        f'{tuple(old.shape)}: use weights of the configured model')
  node[path[-1]] = jnp.asarray(value)


def _copy_subtree(dst: dict, src: Mapping, prefix: tuple, source: str) -> int:
  """Copies every leaf of src into dst at the same paths; returns the count."""
  count = 0
  for key, value in src.items():
    if isinstance(value, Mapping):
      count += _copy_subtree(dst, value, prefix + (key,), source)
    else:
      _put(dst, prefix + (key,), value, source)
      count += 1
  return count


def _from_workdir(workdir: str, config, params: dict, stats: dict) -> dict:
  from mcl_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  pre_config = checkpointing.check_readable(workdir)
  check_matching(pre_config.model, config.model, workdir)
  convs = int(config.model.roi.num_convs)
  if int(pre_config.model.neck_convs) < convs:
    raise PretrainedMismatchError(
        f'pretrained {workdir!r} has model.neck_convs={pre_config.model.neck_convs} but the box '
        f'head needs {convs} convs: set config.model.roi.num_convs={pre_config.model.neck_convs}')
  _, pre = checkpointing.load_variables(workdir)
  counts = {}
  for part in ('backbone', 'fpn'):
    counts[part] = (_copy_subtree(params, pre['params'][part], (part,), workdir)
                    + _copy_subtree(stats, pre['batch_stats'][part], (part,), workdir))
  n = 0
  for k in range(1, convs + 1):
    neck_p, neck_s = pre['params']['neck'], pre['batch_stats']['neck']
    _put(params, ('box_head', f'conv{k}', 'kernel'), neck_p[f'conv{k}']['kernel'], workdir)
    for name in ('scale', 'bias'):
      _put(params, ('box_head', f'bn{k}', name), neck_p[f'bn{k}'][name], workdir)
    for name in ('mean', 'var'):
      _put(stats, ('box_head', f'bn{k}', name), neck_s[f'bn{k}'][name], workdir)
    n += 5
  counts['box_head'] = n
  return counts


def _backbone_slots(backbone_params: Mapping[str, Any]):
  """(torchvision conv name, torchvision norm prefix, detectron2 name, flax conv path,
  flax bn path) of every conv of the backbone."""
  yield 'conv1.weight', 'bn1.', 'stem.conv1', ('conv1',), ('bn1',)
  for stage, block, name in export_lib.resnet_blocks(backbone_params):
    p = backbone_params[name]
    for k in export_lib.block_convs(p):
      yield (f'layer{stage}.{block}.conv{k}.weight', f'layer{stage}.{block}.bn{k}.',
             f'res{stage + 1}.{block}.conv{k}', (name, f'conv{k}'), (name, f'bn{k}'))
    if 'downsample_conv' in p:
      yield (f'layer{stage}.{block}.downsample.0.weight', f'layer{stage}.{block}.downsample.1.',
             f'res{stage + 1}.{block}.shortcut', (name, 'downsample_conv'),
             (name, 'downsample_bn'))


def _array(sd: Mapping[str, Any], name: str, source: str) -> np.ndarray:
  if name not in sd:
    raise PretrainedFileError(f'{source} has no {name!r}: not a weights file of the '
                              'configured ResNet')
  value = sd[name]
  if hasattr(value, 'detach'):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def _load_conv_norm(params, stats, part: str, conv_path, bn_path, sd, weight: str,
                    norm_prefix: str, source: str) -> int:
  """One OIHW conv and its torch BatchNorm into params/stats[part]."""
  kernel = _array(sd, weight, source).transpose(2, 3, 1, 0)  # OIHW -> HWIO
  _put(params, (part, *conv_path, 'kernel'), kernel, source)
  for flax_name, torch_name, tree in (('scale', 'weight', params), ('bias', 'bias', params),
                                      ('mean', 'running_mean', stats),
                                      ('var', 'running_var', stats)):
    _put(tree, (part, *bn_path, flax_name), _array(sd, norm_prefix + torch_name, source), source)
  return 5


def _from_torchvision(path: str, params, stats) -> dict:
  torch = export_lib.torch_module()
  try:
    sd = torch.load(io.BytesIO(paths.read_bytes(path)), map_location='cpu', weights_only=True)
  except (OSError, RuntimeError, paths.StorageError, pickle.UnpicklingError) as e:
    raise PretrainedFileError(f'{path}: cannot read a torchvision state dict '
                              f'({type(e).__name__}: {e})') from e
  sd = sd.get('state_dict', sd)
  n = sum(_load_conv_norm(params, stats, 'backbone', conv, bn, sd, w, norm, path)
          for w, norm, _, conv, bn in _backbone_slots(params['backbone']))
  return {'backbone': n}


def _from_detectron2(path: str, params, stats) -> dict:
  try:
    data = pickle.loads(paths.read_bytes(path), encoding='latin1')
  except (OSError, paths.StorageError, pickle.UnpicklingError, EOFError) as e:
    raise PretrainedFileError(f'{path}: cannot read a detectron2 .pkl ({type(e).__name__}: '
                              f'{e})') from e
  sd = data.get('model', data) if isinstance(data, dict) else None
  if not isinstance(sd, dict):
    raise PretrainedFileError(f'{path}: not a detectron2 checkpoint (a dict of arrays)')
  # Full names and the matching-heuristics short names alike.
  for prefix in ('backbone.bottom_up.', 'backbone.', 'roi_heads.'):
    sd = {**{k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, **sd}
  counts = {'backbone': sum(
      _load_conv_norm(params, stats, 'backbone', conv, bn, sd, f'{d2}.weight', f'{d2}.norm.', path)
      for _, _, d2, conv, bn in _backbone_slots(params['backbone']))}
  if 'fpn_lateral2.weight' in sd:
    counts['fpn'] = sum(
        _load_conv_norm(params, stats, 'fpn', (f'{kind}{lvl}_conv',), (f'{kind}{lvl}_bn',), sd,
                        f'fpn_{kind}{lvl}.weight', f'fpn_{kind}{lvl}.norm.', path)
        for lvl in range(2, 6) for kind in ('lateral', 'output'))
  if 'box_head.conv1.weight' in sd:
    k, n = 1, 0
    while f'conv{k}' in params['box_head'] and f'box_head.conv{k}.weight' in sd:
      n += _load_conv_norm(params, stats, 'box_head', (f'conv{k}',), (f'bn{k}',), sd,
                           f'box_head.conv{k}.weight', f'box_head.conv{k}.norm.', path)
      k += 1
    counts['box_head'] = n
  return counts


def load_pretrained(source: str, config, variables: Mapping[str, Any]):
  """Initialises the detector's variables from `source`.

  Args:
    source: a pretraining workdir, 'none', 'torchvision:PATH' or 'detectron2:PATH'.
    config: the detection config (its model must match the pretraining's).
    variables: {'params', 'batch_stats'} of the MaskRCNN (not modified).

  Returns:
    (variables, report): the new variables and {'source', 'kind', 'arrays':
    {part: number of arrays loaded}}.

  Raises:
    PretrainedMismatchError: another backbone / FPN configuration or shape.
    CheckpointError: a workdir without a checkpoint.
    PretrainedFileError: an unreadable or incomplete weights file.
  """
  source = str(source or 'none')
  params = copy.copy(dict(variables['params']))
  stats = copy.copy(dict(variables['batch_stats']))
  # Copy-on-write of the touched subtrees (the leaves are immutable arrays).
  for tree in (params, stats):
    for part in ('backbone', 'fpn', 'box_head'):
      if part in tree:
        tree[part] = _deep_copy_dicts(tree[part])
  if source == 'none':
    kind, counts = 'none', {}
  elif source.startswith('torchvision:'):
    kind, counts = 'torchvision', _from_torchvision(source.split(':', 1)[1], params, stats)
  elif source.startswith('detectron2:'):
    kind, counts = 'detectron2', _from_detectron2(source.split(':', 1)[1], params, stats)
  else:
    kind, counts = 'workdir', _from_workdir(source, config, params, stats)
  return ({'params': params, 'batch_stats': stats},
          {'source': source, 'kind': kind, 'arrays': counts})


def _deep_copy_dicts(tree):
  if isinstance(tree, Mapping):
    return {k: _deep_copy_dicts(v) for k, v in tree.items()}
  return tree
