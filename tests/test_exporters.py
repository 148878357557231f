"""Export to detectron2 / torchvision: key sets, shapes and forward parity in torch.

The torch models are written here from the torchvision and detectron2 naming
rules (stride on the 3x3 conv; mmdet-style FPN with BN, no bias; 4-conv box
head with BN + ReLU), loaded with strict=True and compared in eval mode with
MCLNet.features / the neck's convs on random inputs and randomised BN state.
"""

import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

# requirements-test.txt installs PyTorch (a CPU wheel) on Python 3.11 only.
torch = pytest.importorskip('torch', reason='the torch side of these tests needs PyTorch')
import torch.nn.functional as F  # noqa: E402
from torch import nn as tnn  # noqa: E402

from mcl_jax import export as export_cmd
from mcl_jax.eval import exporters
from mcl_jax.nn import model as model_lib
from mcl_jax.pretext import montage
from mcl_jax.nn.model import MCLNet
from tests import tolerance

NORM = ('weight', 'bias', 'running_mean', 'running_var')

# ---------------------------------------------------------------- JAX side --


def one_level_layout(image_size, group_size=2):
  cfg = ml_collections.ConfigDict(dict(grids=(1, 2, 4, 8), canvas_divisors=(1, 4, 16, 32),
                                       group_size=group_size, layout='grid'))
  return montage.make_layout(cfg, image_size, num_levels=1)


def tiny_model(block):
  stages = (2, 1, 1, 1) if block == 'bottleneck' else (1, 2, 1, 1)
  return MCLNet(depth=50 if block == 'bottleneck' else 18, width=8, stage_sizes=stages,
                block=block, fpn_channels=16, neck_hidden=32, embed_dim=16,
                predictor_hidden=32, num_levels=1)


def random_fill(shapes, seed):
  """Random variables of a shape tree (from jax.eval_shape of init_variables).

  Kernels ~ N(0, 2 / fan_in); BN scales ~U(.5,1.5), biases / means ~N(0,.2),
  vars ~U(.5,2), so the exported running statistics are non-trivial. Drawn in
  NumPy: compiling the real initialiser costs tens of seconds on a busy CPU.
  """
  rng = np.random.default_rng(seed)

  def f(path, s):
    name = path[-1].key
    if name == 'kernel':
      x = rng.normal(0.0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape)
    elif name == 'scale':
      x = rng.uniform(0.5, 1.5, s.shape)
    elif name in ('bias', 'mean'):
      x = rng.normal(0.0, 0.2, s.shape)
    elif name == 'var':
      x = rng.uniform(0.5, 2.0, s.shape)
    else:
      raise AssertionError(f'unexpected variable {path}')
    return jnp.asarray(x, s.dtype)
  return jax.tree_util.tree_map_with_path(f, shapes)


def init_shapes(model, image_size, group_size=2):
  """Shapes of `model_lib.init_variables` (no compute)."""
  layout = one_level_layout(image_size, group_size)
  return jax.eval_shape(lambda k: model_lib.init_variables(model, layout, k, image_size),
                        jax.random.key(0))


@pytest.fixture(scope='module', params=['bottleneck', 'basic'])
def tiny(request):
  model = tiny_model(request.param)
  return request.param, model, random_fill(init_shapes(model, 64), 1)


def abstract_variables(depth):
  """Zero variables of a full-size MCLNet (shapes via jax.eval_shape, no compute)."""
  shapes = init_shapes(MCLNet(depth=depth, num_levels=1), 64, 1)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# -------------------------------------------------------------- torch side --


class TVBottleneck(tnn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, downsample):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TVBasic(tnn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, downsample):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


def stage_plan(stage_sizes, width, expansion):
  """(stage 0..3, block, cin, planes, stride, has_shortcut) as torchvision builds them."""
  cin = width
  for s, n in enumerate(stage_sizes):
    planes = width * 2**s
    for b in range(n):
      stride = 2 if s > 0 and b == 0 else 1
      yield s, b, cin, planes, stride, b == 0 and (stride != 1 or cin != planes * expansion)
      cin = planes * expansion


class TVResNet(tnn.Module):
  """torchvision's ResNet trunk (names conv1/bn1/layerS.B...), returning C2..C5."""

  def __init__(self, block, stage_sizes, width=64):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    stages = [[] for _ in stage_sizes]
    for s, _, cin, planes, stride, short in stage_plan(stage_sizes, width, block.expansion):
      down = tnn.Sequential(tnn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                            tnn.BatchNorm2d(planes * block.expansion)) if short else None
      stages[s].append(block(cin, planes, stride, down))
    for s, blocks in enumerate(stages):
      setattr(self, f'layer{s + 1}', tnn.Sequential(*blocks))

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    outs = []
    for s in range(1, 5):
      x = getattr(self, f'layer{s}')(x)
      outs.append(x)
    return outs


class D2Norm(tnn.Module):
  """Eval-mode BatchNorm with exactly detectron2's four norm keys (FrozenBatchNorm2d)."""

  def __init__(self, c):
    super().__init__()
    self.weight = tnn.Parameter(torch.ones(c))
    self.bias = tnn.Parameter(torch.zeros(c))
    self.register_buffer('running_mean', torch.zeros(c))
    self.register_buffer('running_var', torch.ones(c))

  def forward(self, x):
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                        training=False, eps=1e-5)


class D2Conv(tnn.Conv2d):
  """detectron2's Conv2d wrapper: conv (no bias) -> .norm -> optional ReLU."""

  def __init__(self, cin, cout, k, stride=1, relu=False):
    super().__init__(cin, cout, k, stride, (k - 1) // 2, bias=False)
    self.norm = D2Norm(cout)
    self.use_relu = relu

  def forward(self, x):
    x = self.norm(super().forward(x))
    return F.relu(x) if self.use_relu else x


class D2Block(tnn.Module):
  """detectron2 Bottleneck (conv1..3) or BasicBlock (conv1, conv2), stride on the 3x3."""

  def __init__(self, cin, planes, stride, shortcut, bottleneck):
    super().__init__()
    if bottleneck:
      self.conv1 = D2Conv(cin, planes, 1, relu=True)
      self.conv2 = D2Conv(planes, planes, 3, stride, relu=True)
      self.conv3 = D2Conv(planes, planes * 4, 1)
      cout = planes * 4
    else:
      self.conv1 = D2Conv(cin, planes, 3, stride, relu=True)
      self.conv2 = D2Conv(planes, planes, 3)
      cout = planes
    self.shortcut = D2Conv(cin, cout, 1, stride) if shortcut else None

  def forward(self, x):
    y = x
    for name in ('conv1', 'conv2', 'conv3'):
      if hasattr(self, name):
        y = getattr(self, name)(y)
    return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class D2Stem(tnn.Module):

  def __init__(self, width):
    super().__init__()
    self.conv1 = D2Conv(3, width, 7, 2, relu=True)

  def forward(self, x):
    return F.max_pool2d(self.conv1(x), 3, 2, 1)


class D2BoxHead(tnn.Module):

  def __init__(self, channels, num_convs):
    super().__init__()
    self.num_convs = num_convs
    for k in range(1, num_convs + 1):
      setattr(self, f'conv{k}', D2Conv(channels, channels, 3, relu=True))

  def forward(self, x):
    for k in range(1, self.num_convs + 1):
      x = getattr(self, f'conv{k}')(x)
    return x


class D2Model(tnn.Module):
  """ResNet + FPN (with norms) + 4-conv box head under detectron2's checkpoint names."""

  def __init__(self, bottleneck, stage_sizes, width=64, fpn_channels=256, num_convs=4):
    super().__init__()
    exp = 4 if bottleneck else 1
    self.stem = D2Stem(width)
    stages = [[] for _ in stage_sizes]
    for s, _, cin, planes, stride, short in stage_plan(stage_sizes, width, exp):
      stages[s].append(D2Block(cin, planes, stride, short, bottleneck))
    for s, blocks in enumerate(stages):
      setattr(self, f'res{s + 2}', tnn.Sequential(*blocks))
    for level in range(2, 6):
      setattr(self, f'fpn_lateral{level}', D2Conv(width * 2**(level - 2) * exp, fpn_channels, 1))
      setattr(self, f'fpn_output{level}', D2Conv(fpn_channels, fpn_channels, 3))
    self.box_head = D2BoxHead(fpn_channels, num_convs)

  def forward(self, x):
    x = self.stem(x)
    out = {}
    for level in range(2, 6):
      x = getattr(self, f'res{level}')(x)
      out[f'C{level}'] = x
    lat = {l: getattr(self, f'fpn_lateral{l}')(out[f'C{l}']) for l in range(2, 6)}
    for level in (4, 3, 2):
      lat[level] = lat[level] + F.interpolate(lat[level + 1], scale_factor=2, mode='nearest')
    for level in range(2, 6):
      out[f'P{level}'] = getattr(self, f'fpn_output{level}')(lat[level])
    return out


def torch_state(d):
  return {k: torch.from_numpy(np.array(v)) for k, v in d.items()}


def rel_err(a, b):
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def to_nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


# ----------------------------------------------------------- expectations --


def conv_entry(out, name, cout, cin, k, norm_fmt):
  out[f'{name}.weight'] = (cout, cin, k, k)
  for s in NORM:
    out[norm_fmt.format(s)] = (cout,)


def expected_detectron2_r50_fpn():
  """Every key (-> shape) of detectron2's R-50-FPN + 4conv box head checkpoint."""
  out = {}
  conv_entry(out, 'stem.conv1', 64, 3, 7, 'stem.conv1.norm.{}')
  cin = 64
  for stage, n in zip(range(2, 6), (3, 4, 6, 3)):
    planes = 64 * 2**(stage - 2)
    for b in range(n):
      p = f'res{stage}.{b}'
      conv_entry(out, f'{p}.conv1', planes, cin, 1, p + '.conv1.norm.{}')
      conv_entry(out, f'{p}.conv2', planes, planes, 3, p + '.conv2.norm.{}')
      conv_entry(out, f'{p}.conv3', planes * 4, planes, 1, p + '.conv3.norm.{}')
      if b == 0:
        conv_entry(out, f'{p}.shortcut', planes * 4, cin, 1, p + '.shortcut.norm.{}')
      cin = planes * 4
  for level, c in zip(range(2, 6), (256, 512, 1024, 2048)):
    conv_entry(out, f'fpn_lateral{level}', 256, c, 1, f'fpn_lateral{level}.norm.{{}}')
    conv_entry(out, f'fpn_output{level}', 256, 256, 3, f'fpn_output{level}.norm.{{}}')
  for k in range(1, 5):
    conv_entry(out, f'box_head.conv{k}', 256, 256, 3, f'box_head.conv{k}.norm.{{}}')
  return out


def expected_torchvision(stage_sizes, bottleneck):
  """torchvision resnet{18,50} state_dict keys (-> shape), minus fc."""
  out = {}

  def conv(name, bn, cout, cin, k):
    out[f'{name}.weight'] = (cout, cin, k, k)
    for s in NORM:
      out[f'{bn}.{s}'] = (cout,)
    out[f'{bn}.num_batches_tracked'] = ()

  conv('conv1', 'bn1', 64, 3, 7)
  cin = 64
  for stage, n in enumerate(stage_sizes, start=1):
    planes = 64 * 2**(stage - 1)
    cout = planes * 4 if bottleneck else planes
    for b in range(n):
      p = f'layer{stage}.{b}'
      if bottleneck:
        conv(f'{p}.conv1', f'{p}.bn1', planes, cin, 1)
        conv(f'{p}.conv2', f'{p}.bn2', planes, planes, 3)
        conv(f'{p}.conv3', f'{p}.bn3', cout, planes, 1)
      else:
        conv(f'{p}.conv1', f'{p}.bn1', planes, cin, 3)
        conv(f'{p}.conv2', f'{p}.bn2', planes, planes, 3)
      if b == 0 and cin != cout:
        conv(f'{p}.downsample.0', f'{p}.downsample.1', cout, cin, 1)
      cin = cout
  return out


# ------------------------------------------------------------------ tests --


def test_detectron2_r50_key_set_and_shapes():
  ckpt = exporters.to_detectron2(abstract_variables(50))
  assert ckpt['__author__'] == 'mcl_jax' and ckpt['matching_heuristics'] is True
  got = {k: v.shape for k, v in ckpt['model'].items()}
  want = expected_detectron2_r50_fpn()
  assert len(want) == 325
  assert sorted(set(want) - set(got)) == [], 'missing keys'
  assert sorted(set(got) - set(want)) == [], 'extra keys'
  assert got == want
  assert all(v.dtype == np.float32 for v in ckpt['model'].values())
  assert got['stem.conv1.weight'] == (64, 3, 7, 7)
  # The detectron2-named torch model takes it strictly.
  torch_model = D2Model(True, (3, 4, 6, 3))
  assert set(torch_model.state_dict()) == set(want)
  torch_model.load_state_dict(torch_state(ckpt['model']), strict=True)


@pytest.mark.parametrize('depth', [50, 18])
def test_torchvision_key_set_and_shapes(depth):
  sd = exporters.to_torchvision(abstract_variables(depth))
  want = expected_torchvision((3, 4, 6, 3) if depth == 50 else (2, 2, 2, 2), depth == 50)
  assert len(want) == {50: 318, 18: 120}[depth]  # torchvision's count, fc excluded
  assert {k: v.shape for k, v in sd.items()} == want
  nbt = [v for k, v in sd.items() if k.endswith('num_batches_tracked')]
  assert nbt and all(v.dtype == np.int64 and v.ndim == 0 for v in nbt)


def test_parity_with_torch(tiny, tmp_path):
  block, model, variables = tiny
  bottleneck = block == 'bottleneck'
  rng = np.random.default_rng(2)
  images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  regions = rng.normal(size=(3, 7, 7, model.fpn_channels)).astype(np.float32)

  feats = model.apply(variables, jnp.asarray(images), train=False, method=MCLNet.features)
  _, state = model.apply(variables, jnp.asarray(regions),
                         method=lambda m, r: m.neck(r, (r.shape[0],), False),
                         capture_intermediates=True, mutable=['intermediates'])
  bn_last = state['intermediates']['neck'][f'bn{model.neck_convs}']['__call__'][0]
  head = jax.nn.relu(bn_last)

  # torchvision: write and read back through torch.save / torch.load.
  pth = tmp_path / 'tv.pth'
  exporters.save_torchvision(exporters.to_torchvision(variables), str(pth))
  tv = TVResNet(TVBottleneck if bottleneck else TVBasic, model.stage_sizes, model.width)
  tv.load_state_dict(torch.load(pth), strict=True)
  # detectron2: through pickle.
  pkl = tmp_path / 'd2.pkl'
  exporters.save_detectron2(exporters.to_detectron2(variables), str(pkl))
  with open(pkl, 'rb') as f:
    ckpt = pickle.load(f)
  d2 = D2Model(bottleneck, model.stage_sizes, model.width, model.fpn_channels, model.neck_convs)
  assert set(d2.state_dict()) == set(ckpt['model'])
  d2.load_state_dict(torch_state(ckpt['model']), strict=True)

  tv.eval()
  d2.eval()
  errs = {}
  with torch.no_grad():
    tv_c = tv(nchw(images))
    d2_out = d2(nchw(images))
    d2_head = d2.box_head(nchw(regions))
  for level in range(2, 6):
    errs[f'tv C{level}'] = rel_err(feats[f'C{level}'], to_nhwc(tv_c[level - 2]))
    errs[f'd2 C{level}'] = rel_err(feats[f'C{level}'], to_nhwc(d2_out[f'C{level}']))
    errs[f'd2 P{level}'] = rel_err(feats[f'P{level}'], to_nhwc(d2_out[f'P{level}']))
  errs['d2 box_head'] = rel_err(head, to_nhwc(d2_head))
  # Two float32 implementations (XLA, PyTorch) of the same eval-mode network:
  # every conv's fan-in and the BN's elementwise roundings along the chain
  # (no batch statistics), relative to each output's largest value.
  tol = tolerance.tol(np.float32, tolerance.network_chain(variables['params'], 1), 1.0, sides=2,
                      walk=True)
  for k, v in errs.items():
    tolerance.check(v, tol, f'[{block}] export {k} vs JAX, relative to max |ref|')


def test_encoder_subtree_exports_the_same(tiny):
  _, _, variables = tiny
  enc = {c: model_lib.encoder_subtree(variables[c]) for c in ('params', 'batch_stats')}
  full, sub = exporters.to_detectron2(variables)['model'], exporters.to_detectron2(enc)['model']
  assert set(full) == set(sub)
  assert all(np.array_equal(full[k], sub[k]) for k in full)
  # Kernels are transposed HWIO -> OIHW and BN state lands under the torch names.
  p, s = variables['params']['backbone'], variables['batch_stats']['backbone']
  np.testing.assert_array_equal(full['stem.conv1.weight'],
                                np.asarray(p['conv1']['kernel']).transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(full['res2.0.conv1.norm.running_var'],
                                np.asarray(s['layer1_0']['bn1']['var']))


def test_missing_subtrees_are_clear_errors(tiny):
  _, _, variables = tiny
  backbone_only = {c: {'backbone': variables[c]['backbone']} for c in ('params', 'batch_stats')}
  with pytest.raises(exporters.ExportError, match="no 'fpn' subtree"):
    exporters.to_detectron2(backbone_only)
  assert exporters.to_detectron2(backbone_only, fpn=False, box_head=False)['model']
  assert exporters.to_torchvision(backbone_only)
  with pytest.raises(exporters.ExportError, match="no 'batch_stats' collection"):
    exporters.to_torchvision({'params': variables['params']})
  with pytest.raises(exporters.ExportError, match="no 'backbone' subtree"):
    exporters.to_torchvision({'params': {}, 'batch_stats': {}})
  with pytest.raises(exporters.ExportError, match='format'):
    exporters.export(variables, 'onnx', 'x.onnx')


def test_convert_script_calls_checkpointing(tiny, tmp_path, monkeypatch):
  checkpointing = pytest.importorskip('mcl_jax.training.checkpointing')
  block, model, variables = tiny
  script = export_cmd  # `python -m mcl_jax.export`
  calls = []

  def fake_load(workdir, step=None, which='online'):
    calls.append((workdir, step, which))
    return ml_collections.ConfigDict(), variables

  monkeypatch.setattr(checkpointing, 'load_variables', fake_load)
  pkl, pth = str(tmp_path / 'out' / 'm.pkl'), str(tmp_path / 'm.pth')
  assert script.main(['--workdir', 'W', '--step', '3', '--which', 'target',
                      '--format', 'detectron2', '--out', pkl]) == 0
  assert script.main(['--workdir', 'W', '--format', 'torchvision', '--out', pth]) == 0
  assert calls == [('W', 3, 'target'), ('W', None, 'online')]
  with open(pkl, 'rb') as f:
    ckpt = pickle.load(f)
  want = exporters.to_detectron2(variables)['model']
  assert set(ckpt['model']) == set(want)
  assert all(np.array_equal(ckpt['model'][k], want[k]) for k in want)
  tv = TVResNet(TVBottleneck if block == 'bottleneck' else TVBasic, model.stage_sizes, model.width)
  tv.load_state_dict(torch.load(pth), strict=True)


def tiny_config():
  from configs import mcl_100ep  # pylint: disable=import-outside-toplevel
  c = mcl_100ep.get_config()
  c.model.depth, c.model.width, c.model.stage_sizes = 18, 8, (1, 1, 1, 1)
  c.model.fpn_channels, c.model.neck_hidden = 16, 32
  c.model.embed_dim, c.model.predictor_hidden = 16, 32
  c.model.dtype = 'float32'
  c.data.image_size = 64
  c.montage.group_size = 32
  c.optim.global_batch = 32
  c.optim.num_steps = 2
  c.optim.warmup_steps = 1
  c.keep_checkpoints = 1
  return c


def test_convert_script_end_to_end_orbax(tmp_path):
  """Real Orbax round trip through mcl_jax.training.checkpointing."""
  from mcl_jax.training import checkpointing, state as state_lib  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import optim  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  workdir = str(tmp_path / 'run')
  checkpointing.check_workdir(workdir)
  checkpointing.save_config(workdir, config)
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda s: (rng.normal(size=s.shape).astype(s.dtype)
                 if jnp.issubdtype(s.dtype, jnp.floating) else np.zeros(s.shape, s.dtype)),
      state_lib.abstract_train_state(config, optim.create_optimizer(config, 1)))
  manager = checkpointing.make_manager(workdir, 1, async_save=False)
  checkpointing.save(manager, 5, state, force=True)
  manager.wait_until_finished()
  manager.close()

  script = export_cmd  # `python -m mcl_jax.export`
  for which, params, stats in (('online', state.params, state.batch_stats),
                               ('target', state.target_params, state.target_batch_stats)):
    out = str(tmp_path / f'{which}.pkl')
    assert script.main(['--workdir', workdir, '--which', which, '--format', 'detectron2',
                        '--out', out]) == 0
    with open(out, 'rb') as f:
      got = pickle.load(f)['model']
    want = exporters.to_detectron2({'params': params, 'batch_stats': stats})['model']
    assert set(got) == set(want)
    for k in want:  # the same arrays relaid (transposes, renames): no rounding
      tolerance.assert_close(got[k], want[k], atol=0, what=f'export {which} {k} from a checkpoint')
  out = str(tmp_path / 'online.pth')
  assert script.main(['--workdir', workdir, '--step', '5', '--format', 'torchvision',
                      '--out', out]) == 0
  tv = TVResNet(TVBasic, (1, 1, 1, 1), 8)
  tv.load_state_dict(torch.load(out), strict=True)
