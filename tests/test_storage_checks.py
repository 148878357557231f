"""mcl_jax.storage_checks for the tools, and every command's first line on a bad path.

The commands (main.py and each tool) are real processes, started in an empty
current directory: a malformed bucket URL must end in one `error:` line
with exit status 2 and leave nothing behind (a `gs:` folder was the old
symptom), and a gs:// path without credentials in one line naming the cause,
with no line of the storage library's own. The in-process tests point gcsfs
at a proxy in front of the session's fake-gcs-server that refuses reads.
"""

import concurrent.futures
import os
import subprocess
import sys
import time

import pytest

from mcl_jax import paths, storage_checks
from mcl_jax.testing import gcs_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f'--config={os.path.join(REPO, "configs", "test_tiny.py")}'
DETECT_CONFIG = f'--config={os.path.join(REPO, "configs", "detect_test_tiny.py")}'
MALFORMED = ('gs:/bucket/run', 'gs:bucket/run', 'gs://', 'GS://bucket/run')

# Every command, with {} where the user path goes; the flag it is given to.
COMMANDS = {
    'main.py --workdir': ['main.py', CONFIG, '--workdir={}'],
    'main.py data.folder': ['main.py', CONFIG, '--workdir=run', '--config.data.source=folder',
                            '--config.data.folder={}'],
    'evaluate --workdir': ['-m', 'mcl_jax.evaluate', '--workdir={}'],
    'evaluate --folder': ['-m', 'mcl_jax.evaluate', '--workdir=run', '--dataset=folder',
                          '--folder={}'],
    'dense_eval --workdir': ['-m', 'mcl_jax.dense_eval', '--workdir={}'],
    'dense_eval --voc_root': ['-m', 'mcl_jax.dense_eval', '--workdir=run', '--dataset=voc',
                              '--voc_root={}'],
    'export --workdir': ['-m', 'mcl_jax.export', '--workdir={}', '--format=detectron2',
                         '--out=mcl.pkl'],
    'export --out': ['-m', 'mcl_jax.export', '--workdir=run', '--format=detectron2',
                     '--out={}'],
    'visualize --out': ['-m', 'mcl_jax.visualize', CONFIG, '--out={}'],
    'finetune --workdir': ['-m', 'mcl_jax.finetune', DETECT_CONFIG, '--pretrained=none',
                           '--workdir={}'],
    'finetune --pretrained': ['-m', 'mcl_jax.finetune', DETECT_CONFIG, '--workdir=run',
                              '--pretrained={}'],
}


def _run(args, cwd, env=None):
  """(CompletedProcess, seconds) of `python ARGS` in `cwd`, the worktree importable."""
  env = dict(env if env is not None else os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  args = [os.path.join(REPO, a) if a == 'main.py' else a for a in args]
  start = time.monotonic()
  p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                     timeout=120)
  return p, time.monotonic() - start


def _runs(jobs: dict, cwd_of, env=None) -> dict:
  """Runs the {name: args} jobs, two at a time (the suite's 2 cores), in cwd_of(name)."""
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {k: pool.submit(_run, args, cwd_of(k), env) for k, args in jobs.items()}
    return {k: f.result() for k, f in futures.items()}


def _only_line(p) -> str:
  """The one line on stderr (stdout holds at most main.py's start-up lines)."""
  lines = p.stderr.splitlines()
  assert len(lines) == 1, p.stdout + p.stderr
  assert all(l.startswith(('config: ', 'devices: ')) for l in p.stdout.splitlines()), p.stdout
  return lines[0]


def test_malformed_urls_fail_in_one_line_and_create_nothing(tmp_path):
  """Each malformed form, given to each command's path flags: exit 2 in seconds, cwd empty."""
  jobs = {}
  for i, (name, args) in enumerate(COMMANDS.items()):
    # main.py (fast to start) gets every form; each tool one of them here, and
    # every form in-process below (the tools import JAX before they parse).
    for form in MALFORMED if name.startswith('main.py') else MALFORMED[i % 4:i % 4 + 1]:
      jobs[(name, form)] = [a.replace('{}', form) for a in args]
  cwds = {key: str(i) for i, key in enumerate(jobs)}  # an empty folder each
  for cwd in cwds.values():
    (tmp_path / cwd).mkdir()
  done = _runs(jobs, lambda k: str(tmp_path / cwds[k]))
  for (name, form), (p, seconds) in done.items():
    line = _only_line(p)
    print(f'{name} {form}: {seconds:.1f}s: {line}')
    assert p.returncode == 2, (name, form, p.stderr)
    assert line.startswith('error: --') and f'={form}: ' in line, line
    assert line.endswith('expected gs://BUCKET/path for a Cloud Storage bucket, or a local path')
    assert os.listdir(tmp_path / cwds[(name, form)]) == [], (name, form)


@pytest.mark.parametrize('form', MALFORMED)
def test_every_tool_parser_refuses_every_form(form, tmp_path, monkeypatch):
  """The argparse tools check each path flag at parse time (before any import of JAX work)."""
  from mcl_jax import dense_eval, evaluate, export
  monkeypatch.chdir(tmp_path)
  cases = [(evaluate.parse_args, ['--workdir', form]),
           (evaluate.parse_args, ['--workdir', 'run', '--folder', form]),
           (evaluate.parse_args, ['--workdir', 'run', '--tfds_data_dir', form]),
           (dense_eval.parse_args, ['--workdir', form]),
           (dense_eval.parse_args, ['--workdir', 'run', '--dataset', 'voc', '--voc_root', form]),
           (dense_eval.parse_args, ['--workdir', 'run', '--png', form]),
           (export.parse_args, ['--workdir', form, '--format', 'detectron2', '--out', 'a.pkl']),
           (export.parse_args, ['--workdir', 'run', '--format', 'detectron2', '--out', form])]
  for parse, argv in cases:
    with pytest.raises(paths.PathSyntaxError, match=rf'^--\w+={form}: '):
      parse(argv)
  assert os.listdir(tmp_path) == []


def _no_credentials_env(config_dir: str) -> dict:
  """This environment without the test server and without any Google credentials."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL',
                      'GOOGLE_AUTH_TOKEN_FOR_TESTING', 'GOOGLE_APPLICATION_CREDENTIALS')}
  # An empty gcloud folder (no application-default file); no metadata server.
  env.update(CLOUDSDK_CONFIG=config_dir, NO_GCE_CHECK='true', JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return env


def test_every_tool_without_credentials_says_so_in_one_line(tmp_path):
  """gs:// paths on a machine without credentials: one line, that cause, no gcsfs line."""
  gcloud = tmp_path / 'gcloud'
  gcloud.mkdir()
  run = 'gs://some-bucket/run'
  jobs = {
      'main.py': ['main.py', CONFIG, f'--workdir={run}'],
      'evaluate': ['-m', 'mcl_jax.evaluate', f'--workdir={run}'],
      'dense_eval': ['-m', 'mcl_jax.dense_eval', f'--workdir={run}'],
      'export': ['-m', 'mcl_jax.export', f'--workdir={run}', '--format=detectron2',
                 '--out=mcl.pkl'],
      'visualize': ['-m', 'mcl_jax.visualize', CONFIG, f'--out={run}/crops.png'],
      'finetune': ['-m', 'mcl_jax.finetune', DETECT_CONFIG, '--pretrained=none',
                   f'--workdir={run}'],
  }
  for name in jobs:
    (tmp_path / name).mkdir()
  done = _runs(jobs, lambda k: str(tmp_path / k), _no_credentials_env(str(gcloud)))
  for name, (p, seconds) in done.items():
    line = _only_line(p)
    print(f'{name}: {seconds:.1f}s: {line}')
    assert p.returncode == 1, (name, p.stderr)
    assert f'{run}' in line and 'no Google Cloud credentials found: run `gcloud auth ' \
        'application-default login`' in line, line
    assert 'retries' not in p.stderr and 'does not exist' not in line
    assert os.listdir(tmp_path / name) == [], name


def test_tool_path_no_credentials_makes_no_request(monkeypatch):
  monkeypatch.delenv('STORAGE_EMULATOR_HOST')
  monkeypatch.setattr(paths, '_FS', None)
  monkeypatch.setattr(paths, 'gcs', lambda: pytest.fail('a request was attempted'))
  for write in (False, True):
    with pytest.raises(paths.StorageError, match=r'^--out gs://b-x/a.png: no Google Cloud '
                                                 r'credentials found'):
      storage_checks.check_tool_path('gs://b-x/a.png', '--out', write=write)


def test_tool_path_reads_and_writes(gcs, gs_bucket, tmp_path):
  """A readable path (present or not) and a writable folder pass; the probe is removed."""
  paths.write_atomic(gs_bucket + '/run/config.json', '{}')
  for path in (gs_bucket + '/run', gs_bucket + '/absent', str(tmp_path / 'none'), None):
    storage_checks.check_tool_path(path, '--workdir')
  storage_checks.check_tool_path(gs_bucket + '/out/mcl.pkl', '--out', write=True)
  assert paths.find(gs_bucket) == ['run/config.json']
  assert not os.path.exists(tmp_path / 'none')
  with pytest.raises(paths.StorageError, match=r'^bucket gs://no-such-bucket-y does '
                                               r'not exist \(--out=gs://no-such-bucket-y/mcl'
                                               r'\.pkl\): create it'):
    storage_checks.check_tool_path('gs://no-such-bucket-y/mcl.pkl', '--out', write=True)


@pytest.mark.parametrize('status,says', [
    (403, r'permission denied .*Storage Object User role'),
    (401, r'the credentials were refused .*gcloud auth application-default login'),
])
def test_tool_path_says_when_reads_are_refused(gcs, gs_bucket, monkeypatch, status, says):
  gcs_server.fast_gcsfs_retries(monkeypatch)  # gcsfs retries a 401 before it gives up
  proxy = gcs_server.RefusingProxy(gcs.url, lambda method, path: status)
  try:
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
    monkeypatch.setattr(paths, '_FS', None)
    with pytest.raises(paths.StorageError,
                       match=rf'^--workdir {gs_bucket}/run cannot be read: {says}'):
      storage_checks.check_tool_path(gs_bucket + '/run', '--workdir')
  finally:
    proxy.close()
