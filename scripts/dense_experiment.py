"""The dense-transfer experiment of docs/DENSE.md: pretrain, probe, tabulate.

    python -m scripts.dense_experiment --phase pretrain   # the runs, one after another
    python -m scripts.dense_experiment --phase learning   # did every level learn? curves
    python -m scripts.dense_experiment --phase probe      # dense probe of each model
    python -m scripts.dense_experiment --phase table      # mean +- std, Welch p-values
    python -m scripts.dense_experiment                    # all four

Models (each with seeds --seeds, default 0 1 2; --models picks some):
  mcl         configs/demo.py           MCL, all four montage levels
  level0      configs/demo_level0.py    montage level 0 only (image-level)
  supervised  configs/demo_supervised.py  supervised MCL
  random      no pretraining: a random init of the demo model, drawn with
              the seed (the same draw `dense_eval` prints beside a checkpoint)
  level0_random_fpn  a diagnosis: level0's backbone under the FPN of `random`

Pretraining runs `python main.py` once per (model, seed) in ROOT/<model>_s<seed>
(rerunning resumes an interrupted run and skips finished ones), logs to
ROOT/<model>_s<seed>.log and records the wall time in
ROOT/<model>_s<seed>.wall.json. The probe phase evaluates every model with
the same dense_eval recipe on the same digit scenes (default: 128 px scenes,
digits of 8-64 px, the tile sides of the 64 px demo; FPN features and P2
alone) and appends to ROOT/results.json; the table phase prints mean +- std
over seeds (overall and by object size) and Welch t-tests.

The defaults are the 64 px experiment (docs/DENSE.md, "At 64 px"); the
32 px one of the same page used `--root runs/dense --override=
--config.data.image_size=32 --steps 300 --scene_size 64 --digit_sides 8 32
--features fpn C5`.
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
MODELS = ('random', 'mcl', 'level0', 'supervised', 'level0_random_fpn')
# A diagnosis, not an arm: the level-0 backbone under the random init's FPN
# (the level-0 loss never trains the FPN's P2-P4 convolutions).
DIAGNOSES = {'level0_random_fpn': 'level0'}
FEATURES = ('fpn', 'P2')
SCENE_SIZE = 128  # probe scenes: 128 px, digits 8-64 px (the 64 px model's tile sides)
DIGIT_SIDES = (8, 64)
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


def pretrain(root: str, seeds, steps: int | None, overrides=(), models=MODELS):
  """Runs main.py for every pretrained (model, seed), one after another."""
  for seed in seeds:
    for model, config in CONFIGS.items():
      if model not in models:
        continue
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
      seconds = time.time() - t0
      print(f'[{time.strftime("%H:%M:%S")}]   exit {rc} after {seconds:.0f} s '
            f'(log {log})', flush=True)
      # The load average says how far the wall time is from a quiet machine's.
      with open(wd + '.wall.json', 'w') as f:
        json.dump({'seconds': seconds, 'rc': rc, 'load_avg_at_end': os.getloadavg()[0]}, f)
      if rc:
        raise SystemExit(f'pretraining {model} seed {seed} failed: see {log}')


def probe(root: str, seeds, models=MODELS, features=FEATURES, scene_size=SCENE_SIZE,
          digit_sides=DIGIT_SIDES):
  """Dense probe of every (model, seed, features); results appended to results.json.

  Every model gets the same probe: the same digit scenes (scene_size px,
  digits digit_sides px), the same dense_eval recipe, the same features.
  """
  from configs import demo  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  from mcl_jax.eval import dense_probe
  path = os.path.join(root, 'results.json')
  results = json.load(open(path)) if os.path.exists(path) else []
  done = {(r['model'], r['seed'], r['features']) for r in results}
  base_config = demo.get_config()
  data = dense_probe.load_probe_data(base_config, 'digit_scenes', image_size=scene_size,
                                    digit_sides=tuple(digit_sides))
  print(f'probe data: {data.name}, {len(data.train)} train / {len(data.test)} test scenes, '
        f'sizes {data.size_rule}', flush=True)
  for seed in seeds:
    for model in models:
      todo = [f for f in features if (model, seed, f) not in done]
      if not todo:
        continue
      if model == 'random':
        config = base_config
        variables = dense_probe.random_variables(dense_probe.create_model(config), seed=seed)
        step = 0
      else:
        wd = workdir(root, DIAGNOSES.get(model, model), seed)
        step = finished_step(wd)
        if step is None:
          print(f'{model} seed {seed}: pretraining not finished, skipped', flush=True)
          continue
        config, variables = checkpointing.load_variables(wd, step=step)
        if model == 'level0_random_fpn':
          drawn = dense_probe.random_variables(dense_probe.create_model(config), seed=seed)
          variables = {k: {**variables[k], 'fpn': drawn[k]['fpn']} for k in variables}
      for feat in todo:
        t0 = time.time()
        r = dense_probe.probe_variables(config, variables, data, feat)
        row = {'model': model, 'seed': seed, 'features': feat, 'step': step,
               'scenes': data.name,
               **{m: r[m] for m in METRICS}, 'seconds': time.time() - t0}
        print(json.dumps(row), flush=True)
        results.append(row)
        with open(path, 'w') as f:
          json.dump(results, f, indent=1)
  return results


def metrics_of(root: str, model: str, seed: int) -> list[dict]:
  """The run's metrics.jsonl lines that hold losses, by step (last line of a step wins)."""
  path = os.path.join(workdir(root, model, seed), 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  by_step = {}
  for line in open(path):
    if '"loss"' in line:
      m = json.loads(line)
      by_step[m['step']] = m
  return [by_step[k] for k in sorted(by_step)]


def levels_of(rows) -> list[int]:
  return sorted(int(k[len('loss_level'):]) for k in rows[0] if k.startswith('loss_level'))


def learning(root: str, seeds, models=('mcl', 'level0'), first=5, last=20,
             flat_fraction=0.2) -> str:
  """The precondition: did every level learn, and had its loss flattened?

  Per run and level: the loss (mean of the first `first` steps, of the last
  `last`), its drop, the positive cosine (mean of the last `last` steps), and
  "flat": the change of the loss over the last `flat_fraction` of the run
  (mean of the window before it against the final window) as a share of the
  whole drop. Also the run's median images/s and wall time.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  lines = ['| model | seed | steps | level | loss first -> last | drop | pos. cosine (end) '
           '| change over last 20% / drop | img/s | wall |', '| --- ' * 10 + '|']
  for model in models:
    for seed in seeds:
      rows = metrics_of(root, model, seed)
      if not rows:
        continue
      n = rows[-1]['step']
      wall_path = workdir(root, model, seed) + '.wall.json'
      wall = json.load(open(wall_path)) if os.path.exists(wall_path) else None
      load = wall.get('load_avg_mean', wall.get('load_avg_at_end')) if wall else None
      wall_cell = ('-' if not wall else f"{wall['seconds'] / 60:.1f} min" +
                   (f' (load {load:.1f})' if load is not None and np.isfinite(load) else ''))
      ips = np.median([r['images_per_sec'] for r in rows if r.get('images_per_sec')])
      k = max(1, int(round(flat_fraction * n)))
      for lvl in levels_of(rows):
        loss = np.asarray([r[f'loss_level{lvl}'] for r in rows])
        a, b = loss[:first].mean(), loss[-last:].mean()
        before = loss[-2 * k:-k].mean()
        end_window = loss[-k:].mean()
        cos = np.mean([r[f'pos_cos_level{lvl}'] for r in rows[-last:]])
        lines.append(f'| {model} | {seed} | {n} | {lvl} | {a:.3f} -> {b:.3f} | '
                     f'{(a - b) / a:.0%} | {cos:.2f} | {(before - end_window) / (a - b):.1%} | '
                     f'{ips:.0f} | {wall_cell} |')
  return '\n'.join(lines)


def curves(root: str, seeds, models=('mcl', 'level0'), window=50) -> str:
  """Per-level loss, mean over seeds of `window`-step means: the learning curves."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  runs = {m: [rows for rows in (metrics_of(root, m, s) for s in seeds) if rows] for m in models}
  runs = {m: v for m, v in runs.items() if v}
  if not runs:
    return ''
  cols = [(m, lvl) for m, v in runs.items() for lvl in levels_of(v[0])]
  n = min(rows[-1]['step'] for v in runs.values() for rows in v)
  lines = ['| steps | ' + ' | '.join(f'{m} L{lvl}' for m, lvl in cols) + ' |',
           '| --- ' * (len(cols) + 1) + '|']
  for end in range(window, n + 1, window):
    cells = []
    for m, lvl in cols:
      v = [np.mean([r[f'loss_level{lvl}'] for r in rows if end - window < r['step'] <= end])
           for rows in runs[m]]
      cells.append(f'{np.mean(v):.3f}')
    lines.append(f'| {end - window + 1}-{end} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


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
                                          ('level0', 'random'), ('supervised', 'mcl'),
                                          ('mcl', 'level0_random_fpn'),
                                          ('level0_random_fpn', 'random'))) -> str:
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
  p.add_argument('--phase', choices=('all', 'pretrain', 'learning', 'probe', 'table'),
                 default='all')
  p.add_argument('--root', default=os.path.join(REPO, 'runs', 'dense64'))
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--steps', type=int, default=None,
                 help='pretraining steps of the self-supervised runs (default: the configs)')
  p.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS)
  p.add_argument('--features', nargs='+', default=list(FEATURES),
                 help='maps to probe (fpn, C2..C5, P2..P5); FPN and P2 by default')
  p.add_argument('--scene_size', type=int, default=SCENE_SIZE,
                 help='probe scene side in px (a multiple of 32)')
  p.add_argument('--digit_sides', type=int, nargs=2, default=list(DIGIT_SIDES),
                 metavar=('MIN', 'MAX'), help='smallest and largest digit side in the scenes')
  p.add_argument('--override', action='append', default=[],
                 help='extra --config.x=value for every pretraining run')
  args = p.parse_args(argv)
  os.makedirs(args.root, exist_ok=True)
  if args.phase in ('all', 'pretrain'):
    pretrain(args.root, args.seeds, args.steps, args.override, args.models)
  if args.phase in ('all', 'learning'):
    arms = [m for m in args.models if m in ('mcl', 'level0')]
    print('\n**Did every level learn?** (the precondition)\n')
    print(learning(args.root, args.seeds, arms))
    print(f'\n**Learning curves** (level losses, mean over seeds {args.seeds})\n')
    print(curves(args.root, args.seeds, arms))
  if args.phase in ('all', 'probe'):
    probe(args.root, args.seeds, args.models, args.features, args.scene_size, args.digit_sides)
  if args.phase in ('all', 'table', 'probe'):
    path = os.path.join(args.root, 'results.json')
    results = json.load(open(path))
    print(table(results, args.models, args.features))
    for feat in args.features:
      print(per_seed(results, feat, models=args.models))
      print(compare(results, feat))


if __name__ == '__main__':
  main()
