"""The paper's comparison at CPU scale: detection AP after fine-tuning, per pretraining.

Run from the repository root, as a module (it imports configs/ and scripts/):

    python -m scripts.detection_experiment --phase pretrain   # the pretrainings (as DENSE.md's)
    python -m scripts.detection_experiment --phase finetune   # every fine-tune, --jobs at a time
    python -m scripts.detection_experiment --phase table      # tables, curves, Welch p-values
    python -m scripts.detection_experiment                    # all three

Every phase resumes: a finished run is skipped, an interrupted one continues
from its newest checkpoint. `--phase finetune --wait` may run beside
`--phase pretrain` (another process): it fine-tunes each arm as soon as its
pretraining has finished and waits for the rest.

Arms (one recipe for all: configs/detect_experiment.py):
  random      no pretraining: the detector's own random init, drawn with the seed
  level0      configs/demo_level0.py pretraining (montage level 0 only), 64 px
  mcl         configs/demo.py pretraining (all four montage levels), 64 px
  supervised  configs/demo_supervised.py pretraining (labels), 64 px
Pretraining seeds --seeds (default 0 1 2) in PRETRAIN_ROOT/<arm>_s<seed>, the
dense experiment's layout (scripts/dense_experiment.py), so its workdirs are
reused. Each pretraining gets one fine-tune with the same seed in
ROOT/<arm>_s<seed>; --extra_ft_seeds adds fine-tunes of the mcl seed-0
pretraining with other seeds (ROOT/mcl_s0_ft<k>): the fine-tune's own noise.
The scenes are written once to ROOT/scenes. Each fine-tune's wall time is
recorded in ROOT/<run>.wall.json, its COCO table at every evaluated step in
ROOT/<run>/coco_eval.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from scripts import dense_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = 'configs/detect_experiment.py'
ARMS = ('random', 'level0', 'mcl', 'supervised')
BOX = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
COLUMNS = [('bbox', m) for m in BOX] + [('segm', 'AP'), ('segm', 'APs')]
PAIRS = (('mcl', 'level0'), ('mcl', 'random'), ('level0', 'random'), ('supervised', 'mcl'))


class Run:
  """One fine-tune: its arm, pretraining seed, fine-tune seed and folders."""

  def __init__(self, root: str, pretrain_root: str, arm: str, seed: int, ft_seed: int):
    self.arm, self.seed, self.ft_seed = arm, seed, ft_seed
    self.name = f'{arm}_s{seed}' + (f'_ft{ft_seed}' if ft_seed != seed else '')
    self.workdir = os.path.join(root, self.name)
    self.pretrained = ('none' if arm == 'random'
                       else dense_experiment.workdir(pretrain_root, arm, seed))

  def pretraining_ready(self) -> bool:
    return self.arm == 'random' or dense_experiment.finished_step(self.pretrained) is not None

  def scores(self, num_steps: int) -> dict | None:
    """{step: COCO scores} of a finished run, else None."""
    path = os.path.join(self.workdir, 'coco_eval.json')
    if not os.path.exists(path):
      return None
    history = json.load(open(path)).get('history', {})
    return {int(k): v for k, v in history.items()} if str(num_steps) in history else None


def runs(root: str, pretrain_root: str, seeds, extra_ft_seeds=()) -> list[Run]:
  out = [Run(root, pretrain_root, arm, s, s) for s in seeds for arm in ARMS]
  return out + [Run(root, pretrain_root, 'mcl', seeds[0], k) for k in extra_ft_seeds]


def num_steps() -> int:
  from configs import detect_experiment  # pylint: disable=import-outside-toplevel
  return int(detect_experiment.get_config().optim.num_steps)


def command(run: Run, root: str, overrides=()) -> list[str]:
  return [sys.executable, '-m', 'mcl_jax.finetune', f'--config={CONFIG}',
          f'--pretrained={run.pretrained}', f'--workdir={run.workdir}',
          f'--config.seed={run.ft_seed}',
          f'--config.data.scenes_root={os.path.join(root, "scenes")}', *overrides]


def finetune(root: str, todo: list[Run], jobs: int, wait: bool, overrides=()):
  """Runs every unfinished fine-tune, `jobs` at a time, as their pretrainings finish."""
  from configs import detect_experiment  # pylint: disable=import-outside-toplevel
  from mcl_jax.detection import scenes  # pylint: disable=import-outside-toplevel
  steps = num_steps()
  pending = [r for r in todo if r.scores(steps) is None]
  if pending:  # written once here, not by the first of several concurrent runs
    scenes.ensure_scenes(detect_experiment.get_config().data, os.path.join(root, 'scenes'))
  running = {}  # name -> (Popen, run, start time, log file)
  while pending or running:
    for name, (proc, run, t0, log) in list(running.items()):
      if proc.poll() is None:
        continue
      log.close()
      seconds = time.time() - t0
      del running[name]
      print(f'[{time.strftime("%H:%M:%S")}]   {name}: exit {proc.returncode} after '
            f'{seconds:.0f} s', flush=True)
      with open(run.workdir + '.wall.json', 'w') as f:
        json.dump({'seconds': seconds, 'rc': proc.returncode, 'jobs': jobs,
                   'load_avg_at_end': os.getloadavg()[0]}, f)
      os.remove(run.workdir + '.lock')
      if proc.returncode:
        raise SystemExit(f'fine-tune {name} failed: see {run.workdir}.log')
    ready = [r for r in pending if r.pretraining_ready()]
    while ready and len(running) < jobs:
      run = ready.pop(0)
      pending.remove(run)
      if not _take(run):
        continue  # another process of this script runs it
      cmd = command(run, root, overrides)
      print(f'[{time.strftime("%H:%M:%S")}] fine-tune {run.name}: {" ".join(cmd[2:])}',
            flush=True)
      log = open(run.workdir + '.log', 'a')
      running[run.name] = (subprocess.Popen(cmd, cwd=REPO, stdout=log,
                                            stderr=subprocess.STDOUT),
                           run, time.time(), log)
    if not running and pending and not ready:
      missing = ', '.join(r.pretrained for r in pending)
      if not wait:
        print(f'not fine-tuned (pretraining not finished): {missing}', flush=True)
        return
    time.sleep(10)


def _take(run: Run) -> bool:
  """Claims `run` with RUN.lock (its pid); False if a live process holds it."""
  lock = run.workdir + '.lock'
  if os.path.exists(lock):
    try:
      pid = int(open(lock).read())
      if pid > 0:
        os.kill(pid, 0)
        return False
    except (OSError, ValueError):
      pass
    os.remove(lock)  # left by a process that died
  try:
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    return False
  os.write(fd, str(os.getpid()).encode())
  os.close(fd)
  return True


def _value(scores: dict, kind: str, metric: str) -> float:
  return 100.0 * scores[kind][metric]


def _wall(path: str) -> str:
  """'minutes (load average at the end)' from a .wall.json, or '-'."""
  if not os.path.exists(path):
    return '-'
  w = json.load(open(path))
  load = w.get('load_avg_at_end')
  return f'{w["seconds"] / 60:.1f}' + (f' ({load:.1f})' if load is not None else '')


def _head(first: str) -> list[str]:
  names = [f'{"box" if k == "bbox" else "mask"} {m}' for k, m in COLUMNS]
  return [f'| {first} | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']


def tables(root: str, pretrain_root: str, seeds, extra_ft_seeds=()) -> str:
  """Markdown: every run, mean +- std per arm, Welch p-values, fine-tune noise, curves."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from scipy import stats  # pylint: disable=import-outside-toplevel
  steps = num_steps()
  done = {r.name: (r, r.scores(steps)) for r in runs(root, pretrain_root, seeds, extra_ft_seeds)}
  done = {k: v for k, v in done.items() if v[1] is not None}
  final = lambda name: done[name][1][steps]
  out = ['**Every run** (COCO AP x 100 on the held-out scenes at the last step; wall '
         'minutes of the pretraining and the fine-tune, with the load average at their end)\n',
         *_head('run')[:1]]
  out[-1] = out[-1][:-1] + '| pretrain min (load) | fine-tune min (load) |'
  out.append('|---' * (len(COLUMNS) + 3) + '|')
  for name, (run, _) in done.items():
    cells = [f'{_value(final(name), k, m):.1f}' for k, m in COLUMNS]
    pre = _wall(run.pretrained + '.wall.json') if run.arm != 'random' else '-'
    out.append(f'| {name} | ' + ' | '.join(cells) + f' | {pre} | {_wall(run.workdir + ".wall.json")} |')

  per_arm = {arm: [final(f'{arm}_s{s}') for s in seeds if f'{arm}_s{s}' in done]
             for arm in ARMS}
  out += ['\n**Per arm** (mean ± std over pretraining seeds, n runs)\n', *_head('arm (n)')]
  for arm, rows in per_arm.items():
    if rows:
      cells = []
      for k, m in COLUMNS:
        v = np.asarray([_value(r, k, m) for r in rows])
        cells.append(f'{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}')
      out.append(f'| {arm} ({len(rows)}) | ' + ' | '.join(cells) + ' |')

  out += ['\n**Differences of means** (Welch t-test over seeds, two-sided p)\n',
          *_head('comparison')]
  for a, b in PAIRS:
    if len(per_arm[a]) < 2 or len(per_arm[b]) < 2:
      continue
    cells = []
    for k, m in COLUMNS:
      x = np.asarray([_value(r, k, m) for r in per_arm[a]])
      y = np.asarray([_value(r, k, m) for r in per_arm[b]])
      cells.append(f'{x.mean() - y.mean():+.1f} (p {stats.ttest_ind(x, y, equal_var=False).pvalue:.2f})')
    out.append(f'| {a} - {b} | ' + ' | '.join(cells) + ' |')

  same = [f'mcl_s{seeds[0]}'] + [f'mcl_s{seeds[0]}_ft{k}' for k in extra_ft_seeds]
  same = [n for n in same if n in done]
  if len(same) > 1:
    out += [f'\n**The fine-tune\'s own noise**: one pretraining (mcl seed {seeds[0]}), '
            f'fine-tune seeds {", ".join(str(done[n][0].ft_seed) for n in same)}\n',
            *_head('')]
    vals = [[_value(final(n), k, m) for n in same] for k, m in COLUMNS]
    out.append('| values | ' + ' | '.join(' / '.join(f'{x:.1f}' for x in v) for v in vals) + ' |')
    out.append('| spread (max - min) | ' + ' | '.join(f'{max(v) - min(v):.1f}' for v in vals)
               + ' |')

  evaluated = sorted({s for _, sc in done.values() for s in sc})
  cell = lambda sc, s: f'{_value(sc[s], "bbox", "AP"):.1f} ({_value(sc[s], "bbox", "APs"):.1f})'
  out += ['\n**Curves**: box AP (AP_S) at each evaluated step; per run, then the mean of '
          "each arm's seeds where all of them were evaluated\n",
          '| run | ' + ' | '.join(f'step {s}' for s in evaluated) + ' |',
          '|---' * (len(evaluated) + 1) + '|']
  for name, (_, sc) in done.items():
    out.append(f'| {name} | ' + ' | '.join(cell(sc, s) if s in sc else '-' for s in evaluated)
               + ' |')
  for arm in ARMS:
    names = [f'{arm}_s{s}' for s in seeds if f'{arm}_s{s}' in done]
    if len(names) > 1:
      cells = []
      for s in evaluated:
        if all(s in done[n][1] for n in names):
          mean = lambda m: np.mean([_value(done[n][1][s], 'bbox', m) for n in names])
          cells.append(f'{mean("AP"):.1f} ({mean("APs"):.1f})')
        else:
          cells.append('-')
      out.append(f'| {arm}, mean of {len(names)} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--phase', choices=('all', 'pretrain', 'finetune', 'table'), default='all')
  p.add_argument('--root', default=os.path.join(REPO, 'runs', 'detection_experiment'))
  p.add_argument('--pretrain_root', default=os.path.join(REPO, 'runs', 'dense64'),
                 help="the pretraining workdirs (scripts.dense_experiment's default root)")
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--extra_ft_seeds', type=int, nargs='*', default=[1],
                 help='more fine-tune seeds of the mcl seed-0 pretraining')
  p.add_argument('--jobs', type=int, default=1, help='fine-tunes at a time')
  p.add_argument('--wait', action='store_true',
                 help='finetune: wait for pretrainings that another process is running')
  p.add_argument('--override', action='append', default=[],
                 help='extra --config.x=value for every fine-tune')
  args = p.parse_args(argv)
  os.makedirs(args.root, exist_ok=True)
  if args.phase in ('all', 'pretrain'):
    dense_experiment.pretrain(args.pretrain_root, args.seeds, None,
                              models=('mcl', 'level0', 'supervised'))
  if args.phase in ('all', 'finetune'):
    finetune(args.root, runs(args.root, args.pretrain_root, args.seeds, args.extra_ft_seeds),
             args.jobs, args.wait, args.override)
  if args.phase in ('all', 'table'):
    print(tables(args.root, args.pretrain_root, args.seeds, args.extra_ft_seeds))


if __name__ == '__main__':
  main()
