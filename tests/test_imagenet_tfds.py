"""The README's ImageNet path: tfds's registered `imagenet2012` builder, prepared by main.py.

Issue 16, item 0: on a fresh install preparing `imagenet2012` died inside
tfds (a module tfds imports but does not declare), which the other tfds test
missed because its builder is defined in the test file. Here the real,
registered builder prepares tiny archives in the real layout
(tests/imagenet_archives.py), through `python main.py` with
data.tfds_download_and_prepare=True and data.tfds_manual_dir, which then
trains from it (the reliability tests' small program, so its compilation is
shared with them through the session's cache).
"""

import json
import math
import os

from tests import imagenet_archives
from tests import subprocess_runs as runs


def test_main_prepares_imagenet2012_from_manual_archives_and_trains(tmp_path):
  manual = str(tmp_path / 'manual')
  sizes = imagenet_archives.write(manual, per_synset=8, num_val=4)
  data_dir = str(tmp_path / 'tfds')
  workdir = str(tmp_path / 'run')
  r = runs.run(workdir, '--config.data.source=tfds', '--config.data.tfds_name=imagenet2012',
               f'--config.data.tfds_data_dir={data_dir}',
               f'--config.data.tfds_manual_dir={manual}',
               '--config.data.tfds_download_and_prepare=True', name='imagenet')
  out = r.output()
  assert r.rc == 0, out[-4000:]
  with open(os.path.join(data_dir, 'imagenet2012', '5.1.0', 'dataset_info.json')) as f:
    info = json.load(f)
  prepared = {s['name']: int(s['shardLengths'][0]) for s in info['splits']}
  assert prepared == sizes, prepared
  steps = runs.metrics_by_step(workdir)
  assert sorted(steps) == list(range(1, runs.NUM_STEPS + 1))
  assert all(math.isfinite(m['loss']) for m in steps.values())
  assert 'Starting a new run' in out
