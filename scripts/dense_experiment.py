"""The dense-transfer experiment of docs/DENSE.md: pretrain, probe, tabulate.

    python scripts/dense_experiment.py --phase pretrain   # 9 runs, sequential
    python scripts/dense_experiment.py --phase probe      # dense probe of each
    python scripts/dense_experiment.py --phase table      # mean +- std tables
    python scripts/dense_experiment.py                    # all three

Models (each with seeds --seeds, default 0 1 2):
  mcl         configs/demo.py           MCL, all four montage levels
  level0      configs/demo_level0.py    montage level 0 only (image-level)
  supervised  configs/demo_supervised.py  supervised MCL
  random      no pretraining: a random init of the demo model, drawn with
              the seed (the same draw `dense_eval` prints beside a checkpoint)

Pretraining runs `python main.py` once per (model, seed) in ROOT/<model>_s<seed>
(rerunning resumes or skips finished runs), logs to ROOT/<model>_s<seed>.log.
The probe phase evaluates every model with the same dense_eval recipe, for
the FPN features and for C5, and writes ROOT/results.json; the table phase
prints mean +- std over seeds (overall and by object size).
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {'mcl': 'configs/demo.py', 'level0': 'configs/demo_level0.py',
           'supervised': 'configs/demo_supervised.py'}
MODELS = ('random', 'mcl', 'level0', 'supervised')
FEATURES = ('fpn', 'C5')
METRICS = ('miou', 'pixel_acc', 'miou_small', 'miou_medium', 'miou_large')


def workdir(root: str, model: str, seed: int) -> str:
  return os.path.join(root, f'{model}_s{seed}')


def finished_step(path: str) -> int | None:
  """The run's last step if its checkpoint of config.optim.num_steps exists, else None."""
  from mcl_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  steps = checkpointing.latest_steps(path)
  if not steps or not os.path.exists(os.path.join(path, checkpointing.CONFIG_FILE)):
    return None
  wanted = checkpointing.load_config(path).optim.num_steps
  return steps[0] if steps[0] == wanted else None


def pretrain(root: str, seeds, steps: int | None, overrides=()):
  """Runs main.py for every pretrained (model, seed), one after another."""
  for seed in seeds:
    for model, config in CONFIGS.items():
      wd = workdir(root, model, seed)
      if finished_step(wd) is not None:
        continue
      cmd = [sys.executable, os.path.join(REPO, 'main.py'), f'--config={config}',
             f'--workdir={wd}', f'--config.seed={seed}', '--config.eval_knn_at_end=False',
             '--config.montage_png=False', *overrides]
      if steps and model != 'supervised':
        cmd.append(f'--config.optim.num_steps={steps}')
      log = wd + '.log'
      print(f'[{time.strftime("%H:%M:%S")}] pretrain {model} seed {seed}: {" ".join(cmd[1:])}',
            flush=True)
      t0 = time.time()
      with open(log, 'a') as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
      print(f'[{time.strftime("%H:%M:%S")}]   exit {rc} after {time.time() - t0:.0f} s '
            f'(log {log})', flush=True)
      if rc:
        raise SystemExit(f'pretraining {model} seed {seed} failed: see {log}')


def probe(root: str, seeds, models=MODELS, features=FEATURES):
  """Dense probe of every (model, seed, features); results appended to results.json."""
  from configs import demo  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  from mcl_jax.eval import dense_eval
  path = os.path.join(root, 'results.json')
  results = json.load(open(path)) if os.path.exists(path) else []
  done = {(r['model'], r['seed'], r['features']) for r in results}
  base_config = demo.get_config()
  data = dense_eval.load_probe_data(base_config, 'digit_scenes')
  for seed in seeds:
    for model in models:
      todo = [f for f in features if (model, seed, f) not in done]
      if not todo:
        continue
      if model == 'random':
        config = base_config
        variables = dense_eval.random_variables(dense_eval.create_model(config), seed=seed)
        step = 0
      else:
        wd = workdir(root, model, seed)
        step = finished_step(wd)
        if step is None:
          print(f'{model} seed {seed}: pretraining not finished, skipped', flush=True)
          continue
        config, variables = checkpointing.load_variables(wd, step=step)
      for feat in todo:
        t0 = time.time()
        r = dense_eval.probe_variables(config, variables, data, feat)
        row = {'model': model, 'seed': seed, 'features': feat, 'step': step,
               **{m: r[m] for m in METRICS}, 'seconds': time.time() - t0}
        print(json.dumps(row), flush=True)
        results.append(row)
        with open(path, 'w') as f:
          json.dump(results, f, indent=1)
  return results


def table(results, models=MODELS, features=FEATURES) -> str:
  """Markdown tables of mean +- std over seeds."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  lines = []
  for feat in features:
    lines += [f'\n**{feat} features** (mean ± std over seeds; n = seeds)\n',
              '| model | n | mIoU | pixel acc | mIoU small | mIoU medium | mIoU large |',
              '| --- | --- | --- | --- | --- | --- | --- |']
    for model in models:
      rows = [r for r in results if r['model'] == model and r['features'] == feat]
      if not rows:
        continue
      cells = []
      for m in METRICS:
        v = np.asarray([r[m] for r in rows], np.float64)
        cells.append(f'{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}')
      lines.append(f'| {model} | {len(rows)} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def per_seed(results, feature: str, metrics=('miou', 'miou_small'), models=MODELS) -> str:
  """A markdown table of every seed's value (the numbers behind the means)."""
  seeds = sorted({r['seed'] for r in results})
  head = ' | '.join(f'{m} s{s}' for m in metrics for s in seeds)
  lines = [f'\n**{feature}, per seed**\n', f'| model | {head} |',
           '| --- |' + ' --- |' * (len(metrics) * len(seeds))]
  for model in models:
    got = {(r['seed'], m): r[m] for r in results if r['model'] == model
           and r['features'] == feature for m in metrics}
    if got:
      cells = [f"{got[(s, m)]:.3f}" if (s, m) in got else '-' for m in metrics for s in seeds]
      lines.append(f'| {model} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def compare(results, feature: str, pairs=(('mcl', 'level0'), ('mcl', 'random'),
                                          ('level0', 'random'), ('supervised', 'mcl'))) -> str:
  """Differences of means with Welch's t-test over seeds (two-sided p)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from scipy import stats  # pylint: disable=import-outside-toplevel
  lines = [f'\n**{feature}: differences of means (Welch t-test over seeds, two-sided p)**\n',
           '| comparison | ' + ' | '.join(METRICS) + ' |', '| --- |' + ' --- |' * len(METRICS)]
  for a, b in pairs:
    cells = []
    for m in METRICS:
      x = np.asarray([r[m] for r in results if r['model'] == a and r['features'] == feature])
      y = np.asarray([r[m] for r in results if r['model'] == b and r['features'] == feature])
      if len(x) < 2 or len(y) < 2:
        cells.append('-')
        continue
      p = stats.ttest_ind(x, y, equal_var=False).pvalue
      cells.append(f'{x.mean() - y.mean():+.3f} (p {p:.2f})')
    lines.append(f'| {a} - {b} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--phase', choices=('all', 'pretrain', 'probe', 'table'), default='all')
  p.add_argument('--root', default=os.path.join(REPO, 'runs', 'dense'))
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--steps', type=int, default=None,
                 help='pretraining steps of the self-supervised runs (default: the configs)')
  p.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS)
  p.add_argument('--features', nargs='+', default=list(FEATURES),
                 help='maps to probe (fpn, C2..C5, P2..P5); FPN and C5 by default')
  p.add_argument('--override', action='append', default=[],
                 help='extra --config.x=value for every pretraining run')
  args = p.parse_args(argv)
  os.makedirs(args.root, exist_ok=True)
  if args.phase in ('all', 'pretrain'):
    pretrain(args.root, args.seeds, args.steps, args.override)
  if args.phase in ('all', 'probe'):
    probe(args.root, args.seeds, args.models, args.features)
  if args.phase in ('all', 'table', 'probe'):
    path = os.path.join(args.root, 'results.json')
    results = json.load(open(path))
    print(table(results, args.models, args.features))
    for feat in args.features:
      print(per_seed(results, feat, models=args.models))
      print(compare(results, feat))


if __name__ == '__main__':
  main()
