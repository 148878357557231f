"""Runs the test suite under several float paths and tabulates the margins.

XLA's CPU kernels sum in an order that depends on the thread count, the
device count and the kernels compiled for the CPU's vector ISA. Each path
below changes one of them (one_core: the scheduling); the suite must pass
under every one, and every numerical comparison records its error against
its tolerance (tests/tolerance.py, MCL_TOL_REPORT), so the table shows how
close each test family came.

  python scripts/float_paths.py                  # the numerical files, every path
  python scripts/float_paths.py --all --workers 2  # the whole suite, as the README runs it
  python scripts/float_paths.py --paths default,one_core tests/test_heads.py

Paths:
  default    what tests/conftest.py sets: 8 simulated devices, all cores
  one_core   the same, pinned to one core (taskset -c 0): every thread
             and subprocess time-sliced on one core (signals, timeouts,
             proxies). XLA's thread pool keeps its size, max(cores,
             devices): 8 threads in pytest, 2 in the main.py runs
             (tests/subprocess_runs.py pins those)
  threads16  XLA's CPU thread pool with 16 threads (NPROC=16, which XLA
             reads as the core count): its kernels split reductions 16
             ways, in pytest and in the main.py runs
  devices4   4 simulated devices: other shardings and per-device shapes
             (tests that need 8 devices skip)
  sse4       kernels compiled for SSE4.2 (--xla_cpu_max_isa=SSE4_2): the
             matmul and conv kernels of a CPU without AVX, other vector
             widths and so other summation orders
  avx2       a CPU with AVX2 but no AVX-512 (e.g. AMD EPYC before Zen 4):
             XLA's kernels for AVX2 (--xla_cpu_max_isa=AVX2), TensorFlow's
             oneDNN off (it turns it on by itself only on CPUs with
             AVX-512 VNNI / BF16 or AMX, and then prints a banner) and
             NumPy's, PyTorch's and its oneDNN's kernels capped at AVX2
  llvm_o3    LLVM's optimisation on, as outside the tests (the suite turns it
             off to compile faster)
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/conftest.py adds --xla_force_host_platform_device_count=8 and
# --xla_backend_optimization_level=0 where XLA_FLAGS does not set them.
# name: (command prefix, XLA_FLAGS, NPROC or '' for the machine's cores)
PATHS = {
    'default': ([], '', ''),
    'one_core': (['taskset', '-c', '0'], '', ''),
    'threads16': ([], '', '16'),
    'devices4': ([], '--xla_force_host_platform_device_count=4', ''),
    'sse4': ([], '--xla_cpu_max_isa=SSE4_2', ''),
    'avx2': ([], '--xla_cpu_max_isa=AVX2', ''),
    'llvm_o3': ([], '--xla_backend_optimization_level=3', ''),
}
# Other environment variables of a path.
PATH_ENV = {
    'avx2': {'TF_ENABLE_ONEDNN_OPTS': '0', 'ATEN_CPU_CAPABILITY': 'avx2',
             'ONEDNN_MAX_CPU_ISA': 'AVX2',
             # NumPy 2's names of its AVX-512 kernels (a warning if unknown).
             'NPY_DISABLE_CPU_FEATURES': 'X86_V4 AVX512_ICL AVX512_SPR'},
}


def numerical_files() -> list[str]:
  """The test files that state tolerances through tests/tolerance.py."""
  tests = os.path.join(ROOT, 'tests')
  out = []
  for name in sorted(os.listdir(tests)):
    if name.startswith('test_') and name.endswith('.py'):
      with open(os.path.join(tests, name)) as f:
        if re.search(r'^from tests import .*tolerance', f.read(), re.M):
          out.append(os.path.join('tests', name))
  return out


def run_path(name: str, files: list[str], report: str, extra: list[str],
             log: str | None = None) -> dict:
  prefix, flags, nproc = PATHS[name]
  env = dict(os.environ, XLA_FLAGS=flags, MCL_TOL_REPORT=report, PYTHONPATH=ROOT,
             **PATH_ENV.get(name, {}))
  env.pop('NPROC', None)
  if nproc:
    env['NPROC'] = nproc
  cmd = [*prefix, sys.executable, '-m', 'pytest', '-q', '-rfEs', '-p', 'no:cacheprovider', *extra,
         *files]
  start = time.monotonic()
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  seconds = time.monotonic() - start
  if log:  # the whole output: a failure's message and traceback
    with open(log, 'w') as f:
      f.write(p.stdout + p.stderr)
  lines = p.stdout.strip().splitlines()
  summary = lines[-1] if lines else p.stderr.strip()[-200:]
  failed = [l for l in lines if l.startswith(('FAILED', 'ERROR'))]
  skipped = [l for l in lines if l.startswith('SKIPPED')]
  return {'path': name, 'rc': p.returncode, 'seconds': seconds, 'summary': summary,
          'failed': failed, 'skipped': skipped, 'load': os.getloadavg()[0]}


def family(test: str) -> str:
  """file::function, parameters dropped."""
  return re.sub(r'\[.*\]$', '', test)


def margins(report: str) -> dict[str, tuple[float, str]]:
  """{family: (worst err / tol, what)} from one MCL_TOL_REPORT file."""
  worst = {}
  if not os.path.exists(report):
    return worst
  with open(report) as f:
    for line in f:
      try:
        r = json.loads(line)
      except ValueError:
        continue
      ratio = r['err'] / r['tol'] if r['tol'] > 0 else (0.0 if r['err'] == 0 else float('inf'))
      key = family(r['test'])
      if key not in worst or ratio > worst[key][0]:
        worst[key] = (ratio, r['what'])
  return worst


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('files', nargs='*', help='test files (default: the numerical ones)')
  parser.add_argument('--all', action='store_true', help='the whole suite (tests/)')
  parser.add_argument('--paths', default=','.join(PATHS), help='comma-separated, of ' +
                      ', '.join(PATHS))
  parser.add_argument('--out', help='also write the tables (markdown), the raw records and '
                      "each path's pytest output (PATH.log) here")
  parser.add_argument('--workers', type=int, default=0,
                      help='pytest-xdist workers, one test file each (-n N --dist loadfile); '
                      '0: one process')
  args, extra = parser.parse_known_args(argv)
  if args.workers:
    extra += ['-n', str(args.workers), '--dist', 'loadfile']
  files = ['tests'] if args.all else (args.files or numerical_files())
  names = args.paths.split(',')
  unknown = set(names) - set(PATHS)
  if unknown:
    parser.error(f'unknown paths {sorted(unknown)}; known: {", ".join(PATHS)}')
  if 'one_core' in names and not shutil.which('taskset'):
    parser.error('one_core needs taskset (util-linux)')
  tmp = args.out or tempfile.mkdtemp(prefix='float_paths_')
  os.makedirs(tmp, exist_ok=True)
  results, worst = [], {}
  for name in names:
    report = os.path.join(tmp, f'{name}.jsonl')
    if os.path.exists(report):
      os.remove(report)
    prefix, flags, nproc = PATHS[name]
    print(f'== {name}: {" ".join(prefix)} XLA_FLAGS={flags!r}' +
          (f' NPROC={nproc}' if nproc else '') +
          ''.join(f' {k}={v!r}' for k, v in PATH_ENV.get(name, {}).items()), flush=True)
    r = run_path(name, files, report, extra, log=os.path.join(tmp, f'{name}.log'))
    results.append(r)
    worst[name] = margins(report)
    print(f'   {r["summary"]} ({r["seconds"]:.0f} s, load {r["load"]:.1f})', flush=True)
    for line in r['failed']:
      print(f'   {line}')

  out = ['| path | result | tests | time | load (1 min, at the end) |', '|---|---|---|---|---|']
  for r in results:
    out.append(f'| {r["path"]} | {"pass" if r["rc"] == 0 else "FAIL"} | '
               f'{re.sub(r"=+", "", r["summary"]).strip()} | {r["seconds"] / 60:.1f} min | '
               f'{r["load"]:.1f} |')
  fams = sorted({f for w in worst.values() for f in w})
  out += ['', '| test family | ' + ' | '.join(names) + ' | worst comparison |',
          '|---|' + '---|' * (len(names) + 1)]
  for f in fams:
    cells = [f'{worst[n][f][0]:.3f}' if f in worst[n] else '-' for n in names]
    top = max((worst[n][f] for n in names if f in worst[n]), key=lambda x: x[0])
    out.append(f'| {f} | ' + ' | '.join(cells) + f' | {top[1]} |')
  table = '\n'.join(out)
  print('\nworst error / tolerance per test family (1.0 = at the tolerance)\n')
  print(table)
  if args.out:
    with open(os.path.join(args.out, 'float_paths.md'), 'w') as f:
      f.write(table + '\n')
  return 0 if all(r['rc'] == 0 for r in results) else 1


if __name__ == '__main__':
  sys.exit(main())
