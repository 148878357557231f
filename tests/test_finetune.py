"""Detection fine-tuning: the optimizer, the state, the run (python -m mcl_jax.finetune).

The optimizer is checked against independent references: the schedule
against a NumPy transcription of detectron2's WarmupMultiStepLR, a few
update steps against torch.optim.SGD. The run tests fine-tune
configs/detect_test_tiny.py on tiny digit scenes.
"""

import bisect
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcl_jax.detection import optim
from tests import tolerance


# ------------------------------------------------------------------ optimizer --

def _optim_config(**kw):
  c = ml_collections.ConfigDict()
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=0.02, momentum=0.9, weight_decay=1e-4, weight_decay_norm=0.0,
      warmup_iters=1000, warmup_factor=0.001, lr_steps=(60_000, 80_000), gamma=0.1,
      num_steps=90_000, global_batch=16))
  c.optim.update(kw)
  return c


def _warmup_multistep(step, base, warmup_iters, warmup_factor, milestones, gamma):
  """detectron2's WarmupMultiStepLR ('linear'), transcribed, in float64."""
  factor = 1.0
  if step < warmup_iters:
    alpha = step / warmup_iters
    factor = warmup_factor * (1 - alpha) + alpha
  return base * factor * gamma ** bisect.bisect_right(list(milestones), step)


@pytest.mark.parametrize('kw', [{}, {'warmup_iters': 0, 'lr_steps': (5, 7), 'base_lr': 0.5},
                                {'warmup_iters': 17, 'warmup_factor': 0.25, 'gamma': 0.5,
                                 'lr_steps': (17, 40, 41)}])
def test_schedule_is_warmup_multistep(kw):
  c = _optim_config(**kw)
  o = c.optim
  rng = np.random.default_rng(0)
  edges = [0, 1, o.warmup_iters - 1, o.warmup_iters, o.warmup_iters + 1]
  edges += [m + d for m in o.lr_steps for d in (-1, 0, 1)]
  steps = sorted({s for s in edges + list(rng.integers(0, o.num_steps, 500)) if s >= 0})
  got = np.asarray(jax.jit(jax.vmap(optim.lr_schedule(c)))(jnp.asarray(steps)))
  want = np.array([_warmup_multistep(s, o.base_lr, o.warmup_iters, o.warmup_factor,
                                     o.lr_steps, o.gamma) for s in steps])
  # float32: t and the milestones are exact; t / warmup, 1 - alpha, the
  # product, the sum, x base, and one product per milestone each round once.
  roundings = 5 + len(o.lr_steps) + 2  # + base and gamma stored in float32
  tolerance.assert_close(got, want, atol=0.0, rtol=tolerance.tol(
      np.float32, roundings, worst_case=True), what='lr vs WarmupMultiStepLR')


def _params(rng):
  """A parameter tree with convs, a dense layer and norms (Flax names)."""
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {'conv1': {'kernel': f(3, 3, 4, 8)},
          'bn1': {'scale': 1 + 0.1 * f(8), 'bias': f(8)},
          'head': {'conv': {'kernel': f(3, 3, 8, 8), 'bias': f(8)},
                   'norm': {'scale': 1 + 0.1 * f(8), 'bias': f(8)},
                   'fc': {'kernel': f(8, 5), 'bias': f(5)}}}


def test_decay_mask_is_every_leaf_but_norm_scales():
  params = _params(np.random.default_rng(0))
  mask = optim.decay_mask(params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  want = {k: not k.endswith("['scale']") for k in flat}
  assert flat == want
  assert sum(flat.values()) == 7 and len(flat) == 9


def test_decay_mask_on_the_backbone_follows_its_norms():
  """On a real ResNet + FPN: no decay exactly where a module keeps BN statistics."""
  from mcl_jax.nn import fpn, resnet
  import flax.linen as nn

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      feats = resnet.ResNet(stage_sizes=(1, 1, 1, 1), block='basic', width=8)(x, train=train)
      return fpn.FPN(channels=16)(feats, train=train)

  variables = jax.eval_shape(Net().init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  mask = optim.decay_mask(variables['params'])
  norm_modules = {jax.tree_util.keystr(p[:-1])
                  for p, _ in jax.tree_util.tree_leaves_with_path(variables['batch_stats'])}
  n_scales = 0
  for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
    module, leaf = jax.tree_util.keystr(path[:-1]), path[-1].key
    is_scale = module in norm_modules and leaf == 'scale'
    n_scales += is_scale
    assert decayed == (not is_scale), (module, leaf)
  assert n_scales == len(norm_modules) > 0


def test_sgd_steps_match_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  params = _params(rng)
  c = _optim_config(base_lr=0.1, warmup_iters=2, warmup_factor=0.5, lr_steps=(3,),
                    weight_decay=0.05, weight_decay_norm=0.01)
  tx = optim.create_optimizer(c)
  leaves, treedef = jax.tree.flatten(params)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  tparams = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float32)) for x in leaves]
  groups = [{'params': [p], 'weight_decay': 0.01 if n.endswith("['scale']") else 0.05}
            for p, n in zip(tparams, names)]
  topt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
  sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda t: _warmup_multistep(
      t, 1.0, 2, 0.5, (3,), 0.1))
  state = tx.init(params)
  update = jax.jit(tx.update)
  steps = 5
  for _ in range(steps):
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    updates, state = update(grads, state, params)
    params = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)
    for p, g in zip(tparams, jax.tree.leaves(grads)):
      p.grad = torch.tensor(g)
    topt.step()
    sched.step()
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(params))
  # Per step and side: + wd w (2 roundings), the momentum buffer (2), x lr
  # and the parameter update (2), and the lr itself (a few): each step's
  # error is carried into the next, so the bound grows with the steps.
  bound = tolerance.tol(np.float32, 10 * steps, scale, sides=2, worst_case=True)
  for name, got, want in zip(names, jax.tree.leaves(params), tparams):
    tolerance.assert_close(got, want.detach().numpy(), atol=bound,
                           what=f'{name} after {steps} SGD steps vs torch.optim.SGD')


def test_decay_mask_on_the_detector_follows_its_norms():
  """Every leaf of the tiny detector decays but the scales of modules with BN statistics."""
  from configs import detect_test_tiny
  from mcl_jax.detection import model as model_lib
  config = detect_test_tiny.get_config()
  variables = model_lib.abstract_variables(model_lib.create_detector(config), (64, 64))
  mask = optim.decay_mask(variables['params'])
  norm_modules = {jax.tree_util.keystr(p[:-1])
                  for p, _ in jax.tree_util.tree_leaves_with_path(variables['batch_stats'])}
  scales = 0
  for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
    module, leaf = jax.tree_util.keystr(path[:-1]), path[-1].key
    is_scale = module in norm_modules and leaf == 'scale'
    scales += is_scale
    assert decayed == (not is_scale), (module, leaf)
  assert scales == len(norm_modules) > 0
  # Biases (norm biases included) decay.
  biases = [d for p, d in jax.tree_util.tree_leaves_with_path(mask) if p[-1].key == 'bias']
  assert biases and all(biases)


# ------------------------------------------------------------------ the runs --
# `python -m mcl_jax.finetune` on configs/detect_test_tiny.py in subprocesses
# (2 simulated devices, the session's shared compilation cache of
# tests/subprocess_runs.py): every run has the same train step program (only
# the step count and the bookkeeping differ), so it compiles once.

import json
import os
import signal
import subprocess
import sys
import time

from tests import subprocess_runs as runs

LEARN_STEPS = 500  # the config's lr drops x0.1 at step 400
FIRST, LAST = 5, 10  # the loss means compared: the first FIRST and the last LAST steps
RESUME_STEPS = 8
# The requirement: a short fine-tune on scenes of a few large, well-separated
# digits reaches box AP50 >= 0.5 on held-out scenes of the same kind (a random
# init scores 0.0). Measured in-process on 1 device: 0.672 after 500 steps
# (0.41 after 400 and 0.93 after 800 steps with the drop at 4/5; this test
# on 2 devices: 0.776 after 500, 0.81 after 600): localisation is learnt within ~100 steps
# (class-agnostic AP50 0.89), the ten digit classes take the rest.
MIN_AP50 = 0.5
LOSSES = ('loss', 'loss_rpn_cls', 'loss_rpn_loc', 'loss_cls', 'loss_box_reg', 'loss_mask')


def _scenes_root():
  return os.path.join(runs.root(), 'detection_scenes')


def _command(workdir, *extra):
  return [sys.executable, '-m', 'mcl_jax.finetune', '--config=configs/detect_test_tiny.py',
          '--pretrained=none', f'--workdir={workdir}',
          f'--config.data.scenes_root={_scenes_root()}', *extra]


def _finetune(workdir, *extra, timeout=900):
  """Runs the command to its end: (exit status, console output)."""
  p = subprocess.run(_command(workdir, *extra), cwd=runs.REPO, env=runs.env(1),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                     timeout=timeout, check=False)
  return p.returncode, p.stdout


@pytest.fixture(scope='module')
def learned(tmp_path_factory):
  """LEARN_STEPS steps from a random init, evaluated on held-out scenes at the end."""
  workdir = str(tmp_path_factory.mktemp('learn') / 'run')
  t0 = time.monotonic()
  rc, out = _finetune(workdir, f'--config.optim.num_steps={LEARN_STEPS}',
                      f'--config.checkpoint_every={LEARN_STEPS}', '--config.log_every=100')
  print(f'{LEARN_STEPS} steps + evaluation: {time.monotonic() - t0:.1f}s (compile included)')
  assert rc == 0, out[-3000:]
  return {'workdir': workdir, 'output': out, 'metrics': runs.metrics_by_step(workdir)}


def test_console_shows_the_run_and_the_coco_table(learned):
  out = learned['output']
  assert '==> Starting a new run' in out
  assert f'step {LEARN_STEPS}/{LEARN_STEPS}  loss' in out
  assert 'box AP50' in out and 'mask AP' in out and f'step {LEARN_STEPS} |' in out
  scores = json.load(open(os.path.join(learned['workdir'], 'coco_eval.json')))
  assert scores['step'] == LEARN_STEPS and set(scores['scores']) == {'bbox', 'segm'}
  for name in ('config.json', 'train.log', 'metrics.jsonl'):
    assert os.path.exists(os.path.join(learned['workdir'], name)), name
  assert any(n.startswith('events.') for n in os.listdir(learned['workdir']))


def test_every_loss_falls(learned):
  """The total and the classification / mask losses fall from the first steps to the last.

  The two box-regression losses are printed, not asserted: each is divided
  by all sampled anchors / RoIs, so it grows with the number of foreground
  ones, which rises while the RPN learns (from a random init it rises over
  the first steps).
  """
  m = learned['metrics']
  assert sorted(m) == list(range(1, LEARN_STEPS + 1))
  for name in LOSSES:
    first = np.mean([m[s][name] for s in range(1, FIRST + 1)])
    last = np.mean([m[s][name] for s in range(LEARN_STEPS - LAST + 1, LEARN_STEPS + 1)])
    print(f'{name}: first {FIRST} steps {first:.4f} -> last {LAST} {last:.4f}')
    assert np.isfinite(first) and np.isfinite(last)
    if name not in ('loss_box_reg', 'loss_rpn_loc'):
      assert last < first, (name, first, last)


def test_detects_held_out_digits(learned):
  box = json.load(open(os.path.join(learned['workdir'], 'coco_eval.json')))['scores']['bbox']
  print(f'held-out scenes after {LEARN_STEPS} steps: box AP50 {box["AP50"]:.3f}, '
        f'AP {box["AP"]:.3f}')
  assert box['AP50'] >= MIN_AP50, box


def test_export_writes_the_whole_fine_tuned_detector(learned, tmp_path):
  """`python -m mcl_jax.export` on a fine-tune's workdir: every part of the Mask R-CNN, its weights."""
  import pickle  # pylint: disable=import-outside-toplevel
  from mcl_jax.detection import state as detection_state  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / 'mask_rcnn.pkl')
  p = subprocess.run([sys.executable, '-m', 'mcl_jax.export', f'--workdir={learned["workdir"]}',
                      '--format=detectron2', f'--out={out}'], cwd=runs.REPO, env=runs.env(1),
                     capture_output=True, text=True, timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-2000:]
  with open(out, 'rb') as f:
    model = pickle.load(f)['model']
  parts = ('backbone.bottom_up.stem.conv1.', 'backbone.fpn_lateral2.', 'backbone.fpn_output5.',
           'proposal_generator.rpn_head.conv.', 'proposal_generator.rpn_head.objectness_logits.',
           'proposal_generator.rpn_head.anchor_deltas.', 'roi_heads.box_head.conv4.norm.',
           'roi_heads.box_head.fc1.', 'roi_heads.box_predictor.cls_score.',
           'roi_heads.box_predictor.bbox_pred.', 'roi_heads.mask_head.mask_fcn4.',
           'roi_heads.mask_head.deconv.', 'roi_heads.mask_head.predictor.')
  for part in parts:
    assert any(k.startswith(part) for k in model), part
  # The trained weights, not an initialisation: torch Linear [out, in] of the checkpoint's kernel.
  _, variables = detection_state.load_variables(learned['workdir'])
  kernel = np.asarray(variables['params']['box_predictor']['cls_score']['kernel'])
  np.testing.assert_array_equal(model['roi_heads.box_predictor.cls_score.weight'], kernel.T)
  assert model['roi_heads.box_predictor.cls_score.weight'].shape[0] == 10 + 1


def _start(workdir, extra):
  return subprocess.Popen(_command(workdir, *extra), cwd=runs.REPO, env=runs.env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_until(proc, done, what, timeout=600):
  deadline = time.monotonic() + timeout
  while not done():
    assert proc.poll() is None, f'the run ended before {what}: {proc.stdout.read()[-3000:]}'
    assert time.monotonic() < deadline, f'not {what} within {timeout} s'
    time.sleep(0.01)


def _checkpoints(workdir):
  return runs.checkpoint_steps(workdir) if os.path.isdir(
      os.path.join(workdir, 'checkpoints')) else []


def test_stop_kill_and_resume_equal_the_uninterrupted_run(tmp_path, learned):
  """SIGTERM (save, exit 0), rerun, SIGKILL after a newer checkpoint, rerun: the
  losses of every step equal the uninterrupted run's (the same program on the
  same restored state)."""
  want = learned['metrics']
  workdir = str(tmp_path / 'run')
  extra = (f'--config.optim.num_steps={RESUME_STEPS}', '--config.checkpoint_every=2',
           '--config.log_every=1')
  proc = _start(workdir, extra)
  try:
    _wait_until(proc, lambda: max(runs.logged_steps(workdir) or [0]) >= 2, 'step 2')
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
  finally:
    proc.kill()
  stopped = max(runs.logged_steps(workdir))
  print(f'SIGTERM: stopped after step {stopped}; checkpoints {_checkpoints(workdir)}')
  assert proc.returncode == 0 and f'Stopped after step {stopped}' in out, out[-3000:]
  assert max(_checkpoints(workdir)) == stopped

  proc = _start(workdir, extra)
  try:
    _wait_until(proc, lambda: max(_checkpoints(workdir)) > stopped and max(
        runs.logged_steps(workdir)) > max(_checkpoints(workdir)), 'a newer checkpoint')
  finally:
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
  assert f'Resumed from the checkpoint of step {stopped}' in out, out[-3000:]
  saved = max(_checkpoints(workdir))
  print(f'SIGKILL after step {max(runs.logged_steps(workdir))}; checkpoints '
        f'{_checkpoints(workdir)}')

  rc, out = _finetune(workdir, *extra)
  assert rc == 0, out[-3000:]
  assert f'Resumed from the checkpoint of step {saved}' in out, out[-3000:]
  got = runs.metrics_by_step(workdir)
  steps = list(range(1, RESUME_STEPS + 1))
  assert sorted(got) == steps
  runs.same_up_to_rounding(got, want, steps, LOSSES, 'stopped, killed, resumed vs uninterrupted')


# ------------------------------------------------------------------ bad input --

def _in_process(config, workdir):
  """finetune() in this process: (the one error line, exit status) of what it raised."""
  from mcl_jax import cli
  from mcl_jax.detection import train
  with pytest.raises(Exception) as e:
    train.finetune(config, workdir)
  line, status = cli.error_report(e.value)
  assert '\n' not in line
  return line, status


def _tiny(**overrides):
  from configs import detect_test_tiny
  c = detect_test_tiny.get_config()
  c.data.scenes_root = _scenes_root()
  for dotted, value in overrides.items():
    node = c
    *path, leaf = dotted.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def test_misspelt_config_field_gets_a_suggestion(tmp_path):
  p = subprocess.run(_command(str(tmp_path / 'w'), '--config.optim.base_lrr=0.1'),
                     cwd=runs.REPO, env=runs.env(2), capture_output=True, text=True,
                     timeout=300, check=False)
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1, p.stderr
  assert lines[0].startswith('error: --config.optim.base_lrr') and (
      'did you mean --config.optim.base_lr?' in lines[0]), lines[0]
  assert not (tmp_path / 'w').exists()


def test_preflight_prints_the_step_memory_and_refuses_a_small_budget(tmp_path):
  """--preflight compiles without data or a workdir; a budget below its bytes: exit 1, one line."""
  p = subprocess.run(_command(str(tmp_path / 'w'), '--preflight', '--preflight_devices=2',
                              '--preflight_budget_gib=0.0001'),
                     cwd=runs.REPO, env=runs.env(1), capture_output=True, text=True,
                     timeout=600, check=False)
  assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
  assert 'Train step per device (64x64, batch 4, float32)' in p.stdout, p.stdout
  errors_ = p.stderr.strip().splitlines()
  assert len(errors_) == 1 and errors_[0].startswith('error: the train step needs'), p.stderr
  assert not (tmp_path / 'w').exists()


def test_canvas_not_a_multiple_of_32(tmp_path):
  line, status = _in_process(_tiny(**{'data.canvas_sizes': ((64, 80),)}), str(tmp_path / 'w'))
  assert status == 2 and line.startswith('config.data.canvas_sizes=((64, 80),): every side '
                                         'must be a multiple of 32'), line
  assert not (tmp_path / 'w').exists()


def test_pretraining_workdir_without_a_checkpoint(tmp_path):
  pre = tmp_path / 'pretrain'
  pre.mkdir()
  (pre / 'config.json').write_text(json.dumps({'checkpoint_every': 100}))
  line, status = _in_process(_tiny(pretrained=str(pre)), str(tmp_path / 'w'))
  assert status == 1 and 'has no checkpoint' in line, line
  assert not (tmp_path / 'w').exists() and sorted(os.listdir(pre)) == ['config.json']


def test_coco_folder_without_annotations(tmp_path):
  coco = tmp_path / 'coco'
  coco.mkdir()
  line, status = _in_process(_tiny(**{'data.source': 'coco', 'data.coco_root': str(coco)}),
                             str(tmp_path / 'w'))
  assert status == 1 and 'instances_train2017.json' in line, line
  assert not (tmp_path / 'w').exists() and os.listdir(coco) == []


def test_a_batch_without_ground_truth_trains_on():
  """Images with no valid box (background only): a train step with finite losses."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mcl_jax.detection import inputs, model as model_lib, state as state_lib, train
  from mcl_jax.training import state as training_state
  config = _tiny()
  mesh = training_state.make_mesh(2)
  config.optim.global_batch = 2
  tx = optim.create_optimizer(config)
  model = model_lib.create_detector(config)
  variables, _ = state_lib.initial_variables(config, 'none')
  state = state_lib.create_train_state(variables, tx, mesh)
  canvas = tuple(config.data.canvas_sizes[0])
  ex = inputs.padding_example(canvas, config.data.max_gt, config.data.mask_size)
  ex['images'][:] = np.random.default_rng(0).integers(0, 255, ex['images'].shape)
  ex['image_hw'] = np.array(canvas, np.int32)
  batch = inputs.make_batch([ex] * config.optim.global_batch)
  step = train.make_train_step(config, model, tx, mesh)
  state, metrics = step(state, train._global_batch(batch, NamedSharding(mesh, P('data'))))  # pylint: disable=protected-access
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  print('zero-gt step:', metrics)
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert metrics['loss_box_reg'] == 0 and metrics['loss_mask'] == 0
  assert metrics['loss_rpn_loc'] == 0 and metrics['loss_rpn_cls'] > 0
