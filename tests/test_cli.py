"""Every command line fails in one clear line, with the right exit status (issue 16).

Each case runs a real entry point as a subprocess and asserts its exit
status, that stderr is exactly one `error: ...` line matching the case, and
that no traceback was printed. Most cases fail before JAX starts (a second
or so each); the data-source cases need JAX (they are found after start-up,
before anything is compiled) and also check that no workdir is left behind.
A last group checks the console of real runs: one line per step and per
checkpoint, library messages in WORKDIR/train.log only, and a rerun of a
finished run.
"""

import os
import re
import subprocess
import sys

import pytest

from tests import subprocess_runs as runs

REPO = runs.REPO
MAIN = os.path.join(REPO, 'main.py')
TINY = '--config=configs/test_tiny.py'


def _run(args, tmp_path, env_extra=None, timeout=300):
  env = runs.env(1, **(env_extra or {}))
  env.pop('MCL_VERBOSE', None)
  if env_extra:
    env.update(env_extra)
  p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=timeout)
  return p


def _assert_one_line(p, status: int, pattern: str):
  both = p.stdout + p.stderr
  assert p.returncode == status, both[-3000:]
  assert 'Traceback' not in both, both[-3000:]
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, p.stderr
  assert lines[0].startswith('error: '), lines[0]
  assert re.search(pattern, lines[0]), lines[0]
  return lines[0]


def _workdir_with_config_only(tmp_path):
  """A workdir whose run wrote config.json but no checkpoint yet."""
  from configs import test_tiny  # pylint: disable=import-outside-toplevel
  w = tmp_path / 'no_checkpoints'
  w.mkdir()
  (w / 'config.json').write_text(test_tiny.get_config().to_json_best_effort())
  return str(w)


# (name, argv after python, exit status, pattern of the error line). {tmp},
# {nockpt} and {empty} are filled in per test. None of these start JAX.
FAST_CASES = [
    ('main: config field typo', [MAIN, TINY, '--config.optim.global_bach=64'], 2,
     r"^error: --config\.optim\.global_bach: the config has no field 'global_bach'; "
     r'did you mean --config\.optim\.global_batch\?$'),
    ('main: nested typo', [MAIN, TINY, '--config.optm.base_lr=1'], 2,
     r"no field 'optm'; did you mean --config\.optim\.base_lr\?"),
    ('main: missing config file', [MAIN, '--config=configs/nope.py'], 2,
     r'^error: --config=configs/nope\.py: no such file .*configs/demo\.py'),
    ('main: bad override value', [MAIN, TINY, '--config.optim.global_batch=abc'], 2,
     r"--config\.optim\.global_batch=abc: invalid literal for int\(\).*'abc'"),
    ('main: unknown flag', [MAIN, TINY, '--wrkdir=/tmp/x'], 2,
     r"Unknown command line flag 'wrkdir'\. Did you mean: workdir"),
    ('main: impossible config', [MAIN, TINY, '--config.optim.momentum=1.5'], 2,
     r'^error: config\.optim\.momentum=1\.5: must be in \[0, 1\)$'),
    ('main: group does not divide the batch', [MAIN, TINY, '--config.optim.global_batch=12'],
     2, r'config\.montage\.group_size=8: must divide the per-device batch'),
    ('main: stray argument', [MAIN, TINY, 'runs/x'], 2, r"unexpected arguments \['runs/x'\]"),
    ('main: distributed flags alone', [MAIN, TINY, '--num_processes=2'], 2,
     r'need --distributed'),
    ('export: missing workdir', ['-m', 'mcl_jax.export', '--workdir={tmp}/nowhere',
                                 '--format=detectron2', '--out={tmp}/m.pkl'], 1,
     r"workdir '.*nowhere' does not exist: pass the --workdir of a pretraining run"),
    ('export: empty workdir', ['-m', 'mcl_jax.export', '--workdir={empty}',
                               '--format=detectron2', '--out={tmp}/m.pkl'], 1,
     r'has no config\.json, so it is not a pretraining workdir'),
    ('export: no checkpoints', ['-m', 'mcl_jax.export', '--workdir={nockpt}',
                                '--format=detectron2', '--out={tmp}/m.pkl'], 1,
     r'has no checkpoint yet \(the run saves one every 2 steps'),
    ('export: detectron2 needs .pkl', ['-m', 'mcl_jax.export', '--workdir={nockpt}',
                                       '--format=detectron2', '--out={tmp}/m.pth'], 2,
     r'--out=.*m\.pth: detectron2 reads pickled weights only from a \*\.pkl file'),
    ('export: unknown format', ['-m', 'mcl_jax.export', '--workdir=w', '--format=onnx',
                                '--out=m.pkl'], 2, r"invalid choice: 'onnx'"),
    ('export: missing flags', ['-m', 'mcl_jax.export', '--format=detectron2'], 2,
     r'required: --workdir, --out \(see python -m mcl_jax\.export --help\)'),
    ('evaluate: missing workdir', ['-m', 'mcl_jax.evaluate', '--workdir={tmp}/nowhere'], 1,
     r'does not exist'),
    ('evaluate: no checkpoints', ['-m', 'mcl_jax.evaluate', '--workdir={nockpt}'], 1,
     r'has no checkpoint yet'),
    ('evaluate: bad number', ['-m', 'mcl_jax.evaluate', '--workdir=w', '--k=many'], 2,
     r"argument --k: invalid int value: 'many'"),
    ('visualize: missing config file', ['-m', 'mcl_jax.visualize', '--config=nope.py'], 2,
     r'--config=nope\.py: no such file'),
    ('visualize: config typo', ['-m', 'mcl_jax.visualize', '--config=configs/demo.py',
                                '--config.data.image_sise=64'], 2,
     r"no field 'image_sise'; did you mean --config\.data\.image_size\?"),
    ('visualize: bad count', ['-m', 'mcl_jax.visualize', '--num_images=0'], 2,
     r'--num_images=0: must be at least 1'),
]


@pytest.mark.parametrize('name, argv, status, pattern', FAST_CASES,
                         ids=[c[0] for c in FAST_CASES])
def test_fails_in_one_line(name, argv, status, pattern, tmp_path):
  del name
  (tmp_path / 'empty').mkdir()
  fill = {'tmp': str(tmp_path), 'empty': str(tmp_path / 'empty'),
          'nockpt': _workdir_with_config_only(tmp_path)}
  workdir = tmp_path / 'run'
  args = [a.format(**fill) for a in argv]
  if args[0] == MAIN:
    args.append(f'--workdir={workdir}')
  before = sorted(os.listdir(fill['nockpt']))
  _assert_one_line(_run(args, tmp_path), status, pattern)
  assert not workdir.exists()  # a failed start leaves no workdir behind
  assert sorted(os.listdir(fill['nockpt'])) == before  # tools create nothing
  assert not os.listdir(fill['empty'])


def test_torchvision_export_without_torch_says_what_to_install(tmp_path):
  """Without PyTorch (an optional extra) the export fails at once, naming the install."""
  block = ('import sys, runpy\n'
           'class NoTorch:\n'
           '  def find_spec(self, name, path=None, target=None):\n'
           '    if name == "torch" or name.startswith("torch."):\n'
           '      raise ModuleNotFoundError("No module named " + repr(name))\n'
           'sys.meta_path.insert(0, NoTorch())\n'
           'sys.argv = ["mcl_jax.export"] + sys.argv[1:]\n'
           'runpy.run_module("mcl_jax.export", run_name="__main__", alter_sys=True)\n')
  p = _run(['-c', block, f'--workdir={_workdir_with_config_only(tmp_path)}',
            '--format=torchvision', f'--out={tmp_path}/m.pth'], tmp_path)
  _assert_one_line(p, 1, r"the torchvision export needs 'torch', which is not installed.*"
                   r'pip install -e "\.\[torch\]"')


def test_verbose_shows_the_traceback(tmp_path):
  args = ['-m', 'mcl_jax.export', f'--workdir={tmp_path}/nowhere', '--format=detectron2',
          f'--out={tmp_path}/m.pkl']
  for extra, env in ((['--verbose'], None), ([], {'MCL_VERBOSE': '1'})):
    p = _run(args + extra, tmp_path, env_extra=env)
    assert p.returncode == 1
    assert 'Traceback' in p.stderr and 'CheckpointError' in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith('error: workdir'), p.stderr


def test_help_exits_zero(tmp_path):
  p = _run([MAIN, '--help'], tmp_path)
  assert p.returncode == 0 and '--workdir' in p.stdout and '--verbose' in p.stdout


# ------------------------------------------- data-source errors (start JAX) --

DATA_CASES = [
    ('folder unset', ['--config.data.source=folder'], r'data\.folder is not set'),
    ('folder missing', ['--config.data.source=folder', '--config.data.folder={tmp}/none'],
     r'none is not a directory'),
    ('folder empty', ['--config.data.source=folder', '--config.data.folder={tmp}/empty'],
     r'no image files found in .*empty'),
]


@pytest.mark.parametrize('name, flags, pattern', DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_errors_come_before_setup_and_leave_nothing(name, flags, pattern, tmp_path):
  del name
  (tmp_path / 'empty').mkdir()
  workdir = tmp_path / 'run'
  p = _run([MAIN, TINY, *[f.format(tmp=tmp_path) for f in flags], f'--workdir={workdir}'],
           tmp_path)
  line = _assert_one_line(p, 1, pattern)
  assert 'Set --config.data.folder=' in line
  assert 'Starting a new run' not in p.stdout and 'workdir:' not in p.stdout, p.stdout
  assert not workdir.exists()


# ------------------------------------------------------------- the console --

def test_console_shows_the_run_and_the_log_file_the_rest(tmp_path):
  """The reference run's console: start-up, one line per step and per checkpoint."""
  ref = runs.reference()
  out = ref['output']
  steps = [int(s) for s in re.findall(r'^step (\d+)/\d+ ', out, re.M)]
  assert steps == list(range(1, runs.NUM_STEPS + 1)), out  # each step once
  saved = [int(s) for s in re.findall(r'^checkpoint of step (\d+) -> ', out, re.M)]
  assert saved == list(range(1, runs.NUM_STEPS + 1)), out  # checkpoint_every=1
  for start_line in (r'^config: configs/test_tiny\.py --config\.optim\.num_steps=12 ',
                     r'^devices: 2 x cpu ', r'^workdir: .*log file train\.log; '
                     r'TensorBoard: tensorboard --logdir ',
                     r'^==> Starting a new run: 12 steps of 16 images'):
    assert re.search(start_line, out, re.M), (start_line, out)
  # TensorFlow's import-time banners (oneDNN's is printed only on CPUs with
  # AVX-512 VNNI / BF16 or AMX) must not reach the console; that native
  # output goes to the log is the next test's, on every CPU.
  for chatter in ('orbax', 'oneDNN', 'absl::InitializeLog', 'I0000', 'Traceback'):
    assert chatter not in out, (chatter, out)
  with open(os.path.join(ref['workdir'], 'train.log')) as f:
    log = f.read()
  assert re.search(r'orbax|checkpoint_manager', log, re.I), log
  assert len(re.findall(r'step 12/12 ', log)) == 1


def test_native_stderr_goes_to_the_log_file_unless_the_block_fails(tmp_path, capfd):
  """What C++ code writes to file descriptor 2 (TensorFlow's import banners)."""
  from mcl_jax import cli  # pylint: disable=import-outside-toplevel
  cli.setup_logging()
  try:
    with cli.native_stderr_to_log('test'):
      os.write(2, b'native banner\n')
    with pytest.raises(RuntimeError):
      with cli.native_stderr_to_log('test'):
        os.write(2, b'native detail of a failure\n')
        raise RuntimeError('import failed')
    log = cli.log_to_file(str(tmp_path / 'train.log'))
  finally:
    cli.reset_logging()
  out, err = capfd.readouterr()
  assert 'native banner' not in out + err
  assert 'native detail of a failure' in err  # the failure's context stays on the console
  with open(log) as f:
    text = f.read()
  assert re.search(r' native\.test .*\] native banner$', text, re.M), text


def test_rerun_of_a_finished_run_says_so(tmp_path):
  workdir = runs.copy_workdir(runs.reference()['workdir'], str(tmp_path / 'done'))
  r = runs.run(workdir, name='finished')
  out = r.output()
  assert r.rc == 0, out
  assert re.search(r'^==> Already finished at step 12 \(of 12\): nothing to train\.$', out,
                   re.M), out
  assert f'Evaluate it with: python -m mcl_jax.evaluate --workdir={workdir}' in out
  assert not re.search(r'^step \d+/', out, re.M)
  assert runs.checkpoint_steps(workdir) == runs.checkpoint_steps(runs.reference()['workdir'])


@pytest.mark.parametrize('existed', [False, True])
def test_a_failed_start_removes_only_the_workdir_it_created(existed, tmp_path, monkeypatch):
  """A failure after the workdir is made, before any step: a new workdir goes away."""
  from configs import test_tiny  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import loop  # pylint: disable=import-outside-toplevel
  config = test_tiny.get_config()
  config.optim.global_batch = 64  # 8 simulated devices x groups of 8
  workdir = tmp_path / 'w'
  if existed:
    workdir.mkdir()
    (workdir / 'notes.txt').write_text('keep me')

  def fail(setup, manager, stop):
    del manager, stop
    assert os.path.isdir(os.path.join(setup.workdir, 'checkpoints'))
    raise MemoryError('out of memory while compiling')

  monkeypatch.setattr(loop, '_train', fail)
  with pytest.raises(MemoryError):
    loop.train_and_evaluate(config, str(workdir))
  assert (sorted(os.listdir(workdir)) == ['checkpoints', 'notes.txt'] if existed
          else not workdir.exists())


def test_the_tensorboard_command_the_console_names_is_installed():
  """The start-up line says `tensorboard --logdir WORKDIR`: requirements.txt installs it."""
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  scripts = importlib.metadata.entry_points(group='console_scripts', name='tensorboard')
  assert scripts, 'no `tensorboard` command: add tensorboard to requirements.txt'
  assert 'tensorboard' in {s.dist.name.lower() for s in scripts}


@pytest.mark.parametrize('override, says', [
    ('--config.optim.base_lrr=1', "--config.optim.base_lrr: the config has no field 'base_lrr'; "
     'did you mean --config.optim.base_lr?'),
    ('--config.optm.base_lr=1', "--config.optm.base_lr: the config has no field 'optm'; "
     'did you mean --config.optim.base_lr?'),
])
def test_config_error_reads_the_installed_ml_collections_messages(override, says):
  """ml_collections says 'Did you mean' only in its message text: read the real one."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from mcl_jax import cli, cli_flags  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({'optim': {'base_lr': 0.5}})
  node, *fields = override.split('=')[0][len('--config.'):].split('.')
  with pytest.raises((AttributeError, KeyError)) as e:
    value = config[node]
    for field in fields:
      value = value[field]
  assert cli_flags._DID_YOU_MEAN.search(str(e.value).replace('\\"', '"'))  # pylint: disable=protected-access
  error = cli_flags._config_error(e.value, ['main.py', override], 'config')  # pylint: disable=protected-access
  assert isinstance(error, cli.UsageError) and str(error) == says

