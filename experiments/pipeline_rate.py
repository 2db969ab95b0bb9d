"""Images/s of the input pipeline alone, for any config and source; a folder of PNGs from an .npz.

  python experiments/pipeline_rate.py --make_folder=/tmp/flowers_png --from_npz=flowers64.npz
  python experiments/pipeline_rate.py --config=configs/flowers.py \
      --config.data.source=folder --config.data.path=/tmp/flowers_png

Times the batches `input_pipeline.host_batches` gives this process (decoded, cropped, flipped,
scaled: what the train step consumes) and those `input_pipeline.create_iterator` delivers as
device arrays, after a warm-up that fills the read-ahead; prints a JSON line. `--make_folder`
writes every image of an .npz as a PNG, one subfolder per label when it has labels.
"""

from __future__ import annotations

import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
from ml_collections import config_flags
from PIL import Image

from diffusion_jax import input_pipeline, parallel, sources
# pylint: enable=g-import-not-at-top,wrong-import-position

config_flags.DEFINE_config_file('config', os.path.join(_ROOT, 'configs', 'flowers.py'),
                                'Config whose data group is read.', lock_config=False)
flags.DEFINE_integer('batches', 100, 'Timed batches.')
flags.DEFINE_integer('warmup', 10, 'Untimed batches first.')
flags.DEFINE_string('make_folder', '', 'Write the images of --from_npz here as PNGs, and exit.')
flags.DEFINE_string('from_npz', '', 'The .npz for --make_folder.')
FLAGS = flags.FLAGS


def make_folder(npz: str, folder: str) -> int:
  """Every image of `npz` as `folder/<label>/<index>.png` (flat without labels)."""
  images, labels = sources.load_npz(npz)
  for i, image in enumerate(images):
    sub = os.path.join(folder, f'{int(labels[i]):03d}' if labels is not None else '')
    os.makedirs(sub, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        os.path.join(sub, f'{i:05d}.png'))
  return len(images)


def rate(batches, batch_size: int, warmup: int, count: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(next(batches))
  start = time.perf_counter()
  for _ in range(count):
    jax.block_until_ready(next(batches))
  return count * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  if FLAGS.make_folder:
    n = make_folder(FLAGS.from_npz, FLAGS.make_folder)
    print(f'{n} images written to {FLAGS.make_folder}')
    return
  config = FLAGS.config
  b = config.training.batch_size
  start = time.perf_counter()
  host = input_pipeline.host_batches(config, b)
  next(host)
  first = time.perf_counter() - start
  result = {'source': config.data.source, 'path': config.data.path, 'batch_size': b,
            'num_threads': config.data.num_threads, 'num_workers': config.data.num_workers,
            'cpus': os.cpu_count(), 'first_batch_s': round(first, 2),
            'host_images_per_s': round(rate(host, b, FLAGS.warmup, FLAGS.batches), 1),
            'device_images_per_s': round(rate(input_pipeline.create_iterator(
                config, parallel.create_mesh()), b, FLAGS.warmup, FLAGS.batches), 1)}
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
