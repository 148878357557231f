"""`python -m mcl_jax.visualize`: pictures of the crops and montages a config makes.

    python -m mcl_jax.visualize --config=configs/demo.py --out=crops.png \
        [--montage_out=montage.png]

(--out and --montage_out may be gs:// paths.)

Writes the crop grid (8 crops per image after the host crop and the device
augmentation: view A | view B) and, with --montage_out, the montage canvases
of one group per level and view. The pictures are `mcl_jax.eval.pictures`.
"""

from absl import flags
from ml_collections import config_flags

from mcl_jax import cli

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Training config file.')
flags.DEFINE_string('out', 'crops.png', 'PNG of the crops to write.')
flags.DEFINE_string('montage_out', None, 'Also write the montage canvases of one group here.')
flags.DEFINE_integer('num_images', 4, 'Rows (images) of the crop grid.')
flags.DEFINE_integer('seed', 0, 'Data and augmentation seed.')


def main(argv) -> int:
  """Writes the crop grid (and the montage PNG with --montage_out). Returns 0."""
  cli.parse_absl_flags(argv, __doc__)
  cli.use_project_verbosity()
  f = flags.FLAGS
  if f.num_images < 1:
    raise cli.UsageError(f'--num_images={f.num_images}: must be at least 1')
  from mcl_jax import paths, storage_checks  # pylint: disable=import-outside-toplevel
  for field in ('folder', 'tfds_data_dir'):
    paths.check_user_path(f.config.data.get(field), f'--config.data.{field}')
  for name in ('out', 'montage_out'):  # the form of both first: a typo never waits
    paths.check_user_path(f[name].value, f'--{name}')
  storage_checks.check_tool_path(f.config.data.get('folder'), '--config.data.folder')
  for name in ('out', 'montage_out'):
    storage_checks.check_tool_path(f[name].value, f'--{name}', write=True)
  from mcl_jax.data import lazy_tf  # pylint: disable=import-outside-toplevel
  with cli.native_stderr_to_log('tensorflow'):  # its start-up banners: not the console
    lazy_tf.tf()
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from mcl_jax.data import device_crops, input_pipeline
  from mcl_jax.eval import pictures
  # pylint: enable=import-outside-toplevel
  config = f.config
  batch = max(f.num_images, config.montage.group_size if f.montage_out else 0)
  data = input_pipeline.open_source(config.data)
  batch = next(data.train_iterator(global_batch=batch, seed=f.seed, process_index=0,
                                   process_count=1))
  crops_u8 = np.asarray(device_crops.crops_of(
      device_crops.step_images(batch, config.data.crop_on), config.data))
  crops = pictures.augmented_crops(config, crops_u8[:f.num_images], jax.random.key(f.seed))
  pictures.crops_grid_png(crops, f.out)
  print(f'wrote {f.out}: {crops.shape[0]} images x {crops.shape[1]} crops (view A | view B)')
  if f.montage_out:
    pictures.save_png(pictures.montage_image(config, crops_u8, jax.random.key(f.seed)),
                      f.montage_out)
    print(f'wrote {f.montage_out}: canvases per level, view q then view k')
  return 0


if __name__ == '__main__':
  cli.run(main, prog='python -m mcl_jax.visualize')
