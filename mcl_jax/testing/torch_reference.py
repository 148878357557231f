"""A PyTorch implementation of one MCL step, written from docs/METHOD.md: the tests' oracle.

It imports nothing from mcl_jax. Two users:

* Numerical cross-check (tests/test_torch_reference.py): weights copied from a
  JAX init, the same pre-assembled canvases and tile labels, float32 and
  train-mode BatchNorm; `loss_from_canvases` must reproduce
  `mcl_jax.pretext.objective.self_supervised_batch_loss` (loss and per-level loss / pos_cos / neg_cos)
  and its gradients.
* Speed ratio (benchmarks/torch_reference.py): JAX step time over the time of
  `step` here for identical work.

The PyTorch model follows the reference layout, not the JAX code:
torchvision ResNet (layerS.B.convK, downsample.0/.1), mmdetection FPN with BN
(lateral_convs.i / fpn_convs.i, each ConvModule conv + bn), the reference
region neck `DetConvGpNonLinearHead` (convs.k = [3x3 conv no bias, BN, ReLU],
7x7 average pool, fc1 / fc1_bn / ReLU / fc2 / fc2_bn(affine=False)) called
once per FPN level on every canvas's regions of that level (neck_regions =
'all', the reference semantics: per-level BN statistics come for free), and
per-level predictors `NonLinearNeckV2` (fc1 / fc1_bn / ReLU / fc2).

`activation` is the network's nonlinearity (ReLU everywhere, as in the
reference). The gradient cross-check swaps a smooth one in on both sides:
ReLU's gradient jumps at 0, and a pre-activation within float32 noise of 0
can land on opposite sides in JAX and PyTorch.

Only torch is needed to build and run the PyTorch model; copying weights from
a Flax tree imports JAX lazily.
"""

import dataclasses
import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention (Flax 0.9)
STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
activation = F.relu  # the network's nonlinearity; see the module docstring


# ------------------------------------------------------------------ layout --

@dataclasses.dataclass(frozen=True)
class GridLayout:
  """The canvases of one montage group (grid layouts only, as the reference).

  blocks: ((count, grid), ...) in concatenation order; a block of grid r
  holds montage level log2(r), r x r tiles per canvas, row-major.
  """
  image_size: int
  group_size: int
  blocks: tuple[tuple[int, int], ...]

  @property
  def num_canvases(self) -> int:
    return sum(c for c, _ in self.blocks)

  @property
  def num_levels(self) -> int:
    return len(self.blocks)

  def block_of(self, level: int) -> tuple[int, int]:
    """(first canvas, count) of the block holding montage level `level`."""
    start = 0
    for count, grid in self.blocks:
      if grid == 2**level:
        return start, count
      start += count
    raise ValueError(f'no block for level {level}')

  @staticmethod
  def from_jax(layout) -> 'GridLayout':
    """From an `mcl_jax.pretext.montage.Layout` with layout='grid'."""
    if not layout.is_grid:
      raise ValueError('the PyTorch reference supports grid layouts only')
    return GridLayout(layout.image_size, layout.group_size,
                      tuple((b.count, b.grid) for b in layout.blocks))


def assemble(crops: Sequence[torch.Tensor], layout: GridLayout,
             generator: torch.Generator | None = None):
  """Torch montage assembly (docs/METHOD.md section 2) of G groups.

  crops[i]: [G * B, 3, S, S] crops of level i. Returns canvases
  [G * num_canvases, 3, S, S] (group-major) and per-level global labels.
  """
  b = layout.group_size
  g = crops[0].shape[0] // b
  per_group = [[] for _ in range(g)]
  labels = []
  for level, (count, grid) in enumerate(layout.blocks):
    small = crops[level][:, :, ::grid, ::grid] if grid > 1 else crops[level]
    n = count * grid * grid
    if level == 0:
      lab = torch.arange(g * b).reshape(g, b)
    else:
      perm = torch.argsort(torch.rand(g, n, generator=generator), dim=1)
      lab = perm % b + torch.arange(g)[:, None] * b
    labels.append(lab.reshape(-1))
    t = small[lab.reshape(-1)]  # [G * n, 3, s, s]
    _, ch, s, _ = t.shape
    t = t.reshape(g, count, grid, grid, ch, s, s).permute(0, 1, 4, 2, 5, 3, 6)
    t = t.reshape(g, count, ch, grid * s, grid * s)
    for j in range(g):
      per_group[j].append(t[j])
  canvases = torch.cat([torch.cat(p, 0) for p in per_group], 0)
  return canvases, labels


# ------------------------------------------------------------------- model --

def _bn2d(c):
  return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = _bn2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = _bn2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      _bn2d(planes))

  def forward(self, x):
    y = activation(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return activation(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  """torchvision Bottleneck: the stride sits on the 3x3 conv."""
  expansion = 4

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = _bn2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = _bn2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = _bn2d(planes * 4)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                      _bn2d(planes * 4))

  def forward(self, x):
    y = activation(self.bn1(self.conv1(x)))
    y = activation(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return activation(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
  """torchvision ResNet trunk returning C2..C5."""

  def __init__(self, depth=50, width=64, stage_sizes=None, block=None):
    super().__init__()
    kind = block or ('bottleneck' if depth >= 50 else 'basic')
    cls = {'bottleneck': Bottleneck, 'basic': BasicBlock}[kind]
    stages = tuple(stage_sizes or STAGE_SIZES[depth])
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = _bn2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes, self.out_channels = width, []
    for s, n in enumerate(stages):
      planes = width * 2**s
      blocks = []
      for b in range(n):
        blocks.append(cls(inplanes, planes, 2 if (s > 0 and b == 0) else 1))
        inplanes = planes * cls.expansion
      setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))
      self.out_channels.append(inplanes)

  def forward(self, x):
    x = self.maxpool(activation(self.bn1(self.conv1(x))))
    outs = []
    for s in range(4):
      x = getattr(self, f'layer{s + 1}')(x)
      outs.append(x)
    return outs  # C2..C5


class ConvModule(nn.Module):
  """mmcv ConvModule(conv (no bias), BN[, ReLU])."""

  def __init__(self, cin, cout, k, act=False):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, 1, (k - 1) // 2, bias=False)
    self.bn = _bn2d(cout)
    self.act = act

  def forward(self, x):
    x = self.bn(self.conv(x))
    return activation(x) if self.act else x


class FPN(nn.Module):
  """mmdetection FPN(norm_cfg=BN): no biases, no activations, no P6."""

  def __init__(self, in_channels, channels=256):
    super().__init__()
    self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels)
    self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels)

  def forward(self, feats):
    lat = [l(f) for l, f in zip(self.lateral_convs, feats)]
    for i in range(len(lat) - 1, 0, -1):
      lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode='nearest')
    return [c(x) for c, x in zip(self.fpn_convs, lat)]  # P2..P5


class RegionNeck(nn.Module):
  """The reference `DetConvGpNonLinearHead`."""

  def __init__(self, channels=256, num_convs=4, hidden=2048, out_dim=256):
    super().__init__()
    self.convs = nn.ModuleList(ConvModule(channels, channels, 3, act=True)
                               for _ in range(num_convs))
    self.fc1 = nn.Linear(channels, hidden)
    self.fc1_bn = nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
    self.fc2 = nn.Linear(hidden, out_dim)
    self.fc2_bn = nn.BatchNorm1d(out_dim, eps=BN_EPS, momentum=BN_MOMENTUM, affine=False)

  def forward(self, regions):
    x = regions
    for c in self.convs:
      x = c(x)
    x = x.mean(dim=(2, 3))  # k x k average pool
    x = activation(self.fc1_bn(self.fc1(x)))
    return self.fc2_bn(self.fc2(x))


class Predictor(nn.Module):
  """The reference `NonLinearNeckV2`: Linear, BN, ReLU, Linear."""

  def __init__(self, dim=256, hidden=2048, out_dim=256):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc1_bn = nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
    self.fc2 = nn.Linear(hidden, out_dim)

  def forward(self, x):
    return self.fc2(activation(self.fc1_bn(self.fc1(x))))


def _grid_regions(fmap, grid: int):
  """[N, C, g*k, g*k] -> [N*g*g, C, k, k]: canvas-major, row-major tiles."""
  n, c, h, w = fmap.shape
  k = h // grid
  x = fmap.reshape(n, c, grid, k, grid, k).permute(0, 2, 4, 1, 3, 5)
  return x.reshape(n * grid * grid, c, k, k)


class Encoder(nn.Module):
  """ResNet + FPN + region neck: online (with predictors outside) or target."""

  def __init__(self, depth=50, width=64, stage_sizes=None, block=None, fpn_channels=256,
               neck_convs=4, neck_hidden=2048, embed_dim=256):
    super().__init__()
    self.backbone = ResNet(depth, width, stage_sizes, block)
    self.fpn = FPN(self.backbone.out_channels, fpn_channels)
    self.neck = RegionNeck(fpn_channels, neck_convs, neck_hidden, embed_dim)

  def embed(self, canvases, layout: GridLayout, levels: Sequence[int],
            neck_regions: str = 'all'):
    """Tile embeddings per montage level, one neck call per FPN level.

    'all' (the reference): the neck sees every canvas's regions of the FPN
    level and the rows of the level's own canvases are kept afterwards.
    'used': the neck sees only the level's own canvases.
    The calls run in ascending FPN level (P2 first), as the reference.
    """
    feats = self.fpn(self.backbone(canvases))  # P2..P5
    nc = layout.num_canvases
    g = canvases.shape[0] // nc
    out = {}
    for level in sorted(levels, reverse=True):  # montage level 3 = P2 first
      fmap = feats[3 - level]  # montage level i reads P(5 - i)
      grid = 2**level
      start, count = layout.block_of(level)
      if neck_regions == 'used':
        sub = fmap.reshape(g, nc, *fmap.shape[1:])[:, start:start + count]
        out[level] = self.neck(_grid_regions(sub.reshape(-1, *fmap.shape[1:]), grid))
      else:
        emb = self.neck(_grid_regions(fmap, grid))
        emb = emb.reshape(g, nc, grid * grid, -1)[:, start:start + count]
        out[level] = emb.reshape(g * count * grid * grid, -1)
    return [out[i] for i in levels]


class MCLTorch(nn.Module):
  """Online encoder + per-level predictors, and the target encoder."""

  def __init__(self, num_levels=4, predictor_hidden=2048, **encoder_kw):
    super().__init__()
    self.online = Encoder(**encoder_kw)
    self.target = Encoder(**encoder_kw)
    dim = encoder_kw.get('embed_dim', 256)
    self.predictors = nn.ModuleList(Predictor(dim, predictor_hidden, dim)
                                    for _ in range(num_levels))
    for p in self.target.parameters():
      p.requires_grad_(False)

  @staticmethod
  def from_config(config) -> 'MCLTorch':
    """Same shapes as `mcl_jax.nn.model.create_model(config)`."""
    m = config.model
    return MCLTorch(
        num_levels=len(config.loss.level_weights), predictor_hidden=m.predictor_hidden,
        depth=m.depth, width=m.width,
        stage_sizes=tuple(m.stage_sizes) if m.get('stage_sizes') else None,
        block=m.get('block'), fpn_channels=m.fpn_channels, neck_convs=m.neck_convs,
        neck_hidden=m.neck_hidden, embed_dim=m.embed_dim)


# -------------------------------------------------------------------- loss --

def infonce(pred, targets, labels, tau: float, weight: float):
  logits = F.normalize(pred, dim=1) @ targets.T
  loss = F.cross_entropy(logits / tau, labels)
  pos = logits.gather(1, labels[:, None]).mean()
  t, m = logits.shape
  neg = (logits.sum() - pos * t) / (t * m - t)
  return loss * 2.0 * tau * weight, pos, neg


def loss_from_canvases(model: MCLTorch, canvases: Sequence[torch.Tensor],
                       labels: Sequence[Sequence[torch.Tensor]], layout: GridLayout,
                       tau: float, level_weights: Sequence[float],
                       neck_regions: str = 'all'):
  """The MCL loss (docs/METHOD.md section 4) from pre-assembled canvases of both views.

  canvases: (view q, view k), each [G * num_canvases, 3, S, S] float32.
  labels: (view q, view k), each per level [G * T_i] int64 global labels.
  Returns (loss, metrics dict of 0-d tensors).
  """
  levels = tuple(range(len(level_weights)))
  targets, preds = [], []
  for c in canvases:
    with torch.no_grad():
      (t,) = model.target.embed(c, layout, (0,), neck_regions)
    targets.append(F.normalize(t, dim=1))
    emb = model.online.embed(c, layout, levels, neck_regions)
    preds.append([model.predictors[i](e) for i, e in zip(levels, emb)])
  total, metrics = 0.0, {}
  for i, w in enumerate(level_weights):
    lq, pq, nq = infonce(preds[0][i], targets[1], labels[0][i], tau, w)
    lk, pk, nk = infonce(preds[1][i], targets[0], labels[1][i], tau, w)
    total = total + lq + lk
    metrics[f'loss_level{i}'] = (lq + lk).detach()
    metrics[f'pos_cos_level{i}'] = ((pq + pk) / 2).detach()
    metrics[f'neg_cos_level{i}'] = ((nq + nk) / 2).detach()
  metrics['loss'] = total.detach()
  return total, metrics


def step(model: MCLTorch, crops: torch.Tensor, layout: GridLayout, tau: float,
         level_weights: Sequence[float], neck_regions: str = 'all',
         generator: torch.Generator | None = None):
  """One timed step: assembly, online fwd + bwd, target fwd, loss (no optimizer).

  crops: [B, 8, 3, S, S] augmented float crops; level i uses crops i and 4 + i.
  """
  half = crops.shape[1] // 2
  canvases, labels = [], []
  for view in (0, 1):
    c, l = assemble([crops[:, view * half + i] for i in range(len(level_weights))],
                    layout, generator)
    canvases.append(c)
    labels.append(l)
  loss, metrics = loss_from_canvases(model, canvases, labels, layout, tau, level_weights,
                                     neck_regions)
  for p in model.parameters():
    p.grad = None
  loss.backward()
  return loss.detach()


# ------------------------------------------------- weights from Flax trees --

def _torch_key(path: str) -> str:
  """Flax module path (a/b/c, no leaf) -> PyTorch module path (a.b.c)."""
  p = path
  p = re.sub(r'layer(\d)_(\d+)', r'layer\1.\2', p)
  p = p.replace('downsample_conv', 'downsample.0').replace('downsample_bn', 'downsample.1')
  p = re.sub(r'lateral(\d)_(conv|bn)', lambda m: f'lateral_convs.{int(m[1]) - 2}.{m[2]}', p)
  p = re.sub(r'output(\d)_(conv|bn)', lambda m: f'fpn_convs.{int(m[1]) - 2}.{m[2]}', p)
  p = re.sub(r'neck/conv(\d)', lambda m: f'neck/convs.{int(m[1]) - 1}.conv', p)
  p = re.sub(r'neck/bn(\d)', lambda m: f'neck/convs.{int(m[1]) - 1}.bn', p)
  p = re.sub(r'predictors_(\d+)', r'predictors.\1', p)
  return p.replace('/', '.')


_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
         'var': 'running_var'}


def flax_to_state_dict(params, batch_stats, prefix: str = '') -> dict[str, torch.Tensor]:
  """Flax params / batch_stats -> PyTorch state-dict entries (float32).

  Conv kernels HWIO -> OIHW, Dense kernels [in, out] -> Linear [out, in],
  BN scale / bias / mean / var -> weight / bias / running_mean / running_var.
  """
  import jax  # late: the PyTorch model itself needs no JAX
  out = {}
  for tree in (params, batch_stats):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names = [str(getattr(k, 'key', k)) for k in path]
      *mod, leafname = names
      a = np.array(leaf, np.float32)  # a writable copy
      if leafname == 'kernel':
        a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
      out[prefix + _torch_key('/'.join(mod)) + '.' + _LEAF[leafname]] = torch.from_numpy(
          np.ascontiguousarray(a))
  return out


def load_from_flax(model: MCLTorch, params, batch_stats, target_params, target_batch_stats):
  """Copies the online (+ predictors) and target variables into `model`.

  Every parameter and buffer (but num_batches_tracked) must be covered.
  """
  sd = {}
  for k, v in flax_to_state_dict(params, batch_stats).items():
    sd[k if k.startswith('predictors.') else 'online.' + k] = v
  sd.update(flax_to_state_dict(target_params, target_batch_stats, 'target.'))
  own = {k: v for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
  missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
  if missing or extra:
    raise KeyError(f'Flax -> torch mapping: missing {missing[:5]}, unexpected {extra[:5]}')
  for k, v in sd.items():
    if tuple(own[k].shape) != tuple(v.shape):
      raise ValueError(f'{k}: torch {tuple(own[k].shape)} vs flax {tuple(v.shape)}')
  model.load_state_dict(sd, strict=False)
  return model


def flax_grads_to_torch_names(grads) -> dict[str, np.ndarray]:
  """JAX gradients (online params tree) keyed and laid out like the torch params."""
  return {(k if k.startswith('predictors.') else 'online.' + k): v.numpy()
          for k, v in flax_to_state_dict(grads, {}).items()}
