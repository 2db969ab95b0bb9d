"""The metric writers: the log, metrics.jsonl, and TensorBoard event files without TensorFlow."""

import glob
import os

import numpy as np

from diffusion_jax import metric_logging


def test_jsonl_records_every_write_at_full_precision(tmp_path):
  writer = metric_logging.JsonlWriter(str(tmp_path / 'metrics.jsonl'))
  writer.write_scalars(1, {'loss': 0.123456789012})
  writer.write_scalars(2, {'loss': 0.5, 'eval/fid': 12.0})
  assert metric_logging.read_metrics(str(tmp_path)) == [
      {'step': 1, 'loss': 0.123456789012}, {'step': 2, 'loss': 0.5, 'eval/fid': 12.0}]


def test_default_writer_writes_tensorboard_events_without_tensorflow(tmp_path):
  workdir = str(tmp_path)
  writer = metric_logging.create_writer(workdir)
  writer.write_scalars(3, {'loss': 0.25})
  picture = np.zeros((1, 8, 8, 3), np.uint8)
  picture[0, :, :4] = 255
  writer.write_images(3, {'samples': picture})
  writer.flush()
  writer.close()
  events = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert len(events) == 1

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(workdir)
  acc.Reload()
  assert acc.Tags()['scalars'] == ['loss'] and acc.Tags()['images'] == ['samples']
  (scalar,) = acc.Scalars('loss')
  assert (scalar.step, scalar.value) == (3, 0.25)
  (image,) = acc.Images('samples')
  assert (image.step, image.width, image.height) == (3, 8, 8)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))),
                                picture[0])
  assert metric_logging.read_metrics(workdir) == [{'step': 3, 'loss': 0.25}]


def test_the_background_writer_starts_at_the_first_write_and_loses_nothing():
  import threading  # pylint: disable=g-import-not-at-top
  release, built, calls = threading.Event(), [], []

  class Recorder(metric_logging.LoggingWriter):
    def write_scalars(self, step, scalars):
      calls.append(('scalars', step, scalars))

    def write_images(self, step, images):
      calls.append(('images', step, sorted(images)))

    def flush(self):
      calls.append(('flush',))

  def build():
    built.append(True)
    release.wait(10)  # a slow import
    return Recorder()

  writer = metric_logging.BackgroundWriter(build)
  writer.flush()  # nothing written yet: nothing built, nothing waited for
  assert not built
  writer.write_scalars(1, {'loss': 1.0})  # starts the build, does not wait for it
  writer.write_images(1, {'samples': np.zeros((1, 2, 2, 3))})
  writer.write_scalars(2, {'loss': 0.5})
  assert built and not calls
  release.set()
  writer.flush()  # waits, then replays in order
  assert calls == [('scalars', 1, {'loss': 1.0}), ('images', 1, ['samples']),
                   ('scalars', 2, {'loss': 0.5}), ('flush',)]
  writer.write_scalars(3, {'loss': 0.25})  # once built, writes go straight through
  assert calls[-1] == ('scalars', 3, {'loss': 0.25})
