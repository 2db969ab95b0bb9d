"""--mode=eval on a tiny digits run: FID/KID with random Inception weights, bits/dim, errors.

Random weights make the FID value meaningless but exercise every step: sampling, the uint8
round trip, grayscale to RGB, features, reference statistics and their cache, FID and KID.
"""

import json
import os
import pathlib
import signal

import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax import evaluation, metric_logging, stop_signals, train
from diffusion_jax.metrics import inception, inception_weights
from tests.conftest import tiny_toy_config
from tests.test_train import ListWriter


@pytest.fixture
def trained(tiny_digits_run):
  """(config, workdir) of a digits U-Net trained for 2 steps (shared with other test files)."""
  config, workdir = tiny_digits_run
  return config.copy_and_resolve_references(), workdir


@pytest.fixture(scope='module')
def inception_npz(tmp_path_factory):
  """Random FID Inception weights (lecun-normal kernels, as flax's init) saved as a .npz."""
  rng = np.random.default_rng(0)
  flat = {k: (np.zeros(s, np.float32) if k.endswith('bias') else
              (rng.normal(size=s) / np.sqrt(np.prod(s[:-1]))).astype(np.float32))
          for k, s in inception_weights.flax_param_shapes().items()}
  path = str(tmp_path_factory.mktemp('inception') / 'inception.npz')
  inception_weights.save_params_npz(path, traverse_util.unflatten_dict(flat, sep='/'))
  return path


def test_fid_kid_and_bits_per_dim(trained, inception_npz):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.inception_path = inception_npz
  config.eval.num_samples = 8
  config.eval.num_reference = 8
  config.eval.inception_batch_size = 8
  config.eval.kid_subset_size = 8
  config.eval.kid_num_subsets = 5
  config.eval.bpd_num_examples = 4
  config.eval.bpd_batch_size = 4
  config.eval.ode_rtol = config.eval.ode_atol = 1e-2  # a few steps: what is tested is the path
  results = evaluation.evaluate(config, workdir)

  with open(os.path.join(workdir, 'eval', 'results.json')) as f:
    saved = json.load(f)
  assert saved['step'] == 2
  assert np.isfinite(saved['fid'])
  assert np.isfinite(saved['kid']) and np.isfinite(saved['kid_std'])
  assert np.isfinite(saved['bits_per_dim']) and saved['bits_per_dim'] > 0
  # The ddpm run also gets the probability-flow ODE's bits/dim, which the bound lies above for
  # a trained model (and near for this 2-step one: both are about the data's 8 bits).
  assert np.isfinite(saved['ode_bits_per_dim']) and saved['ode_bits_per_dim_stderr'] >= 0
  assert saved['ode_network_calls_max'] >= saved['ode_network_calls_mean'] > 6
  assert saved['network_calls_mean'] == config.sampling.num_steps  # DDIM's table
  assert saved['fid'] == pytest.approx(results['fid'])
  assert os.path.exists(os.path.join(workdir, 'eval', evaluation.REFERENCE_STATS))
  record = metric_logging.read_metrics(workdir)[-1]
  assert record['step'] == 2 and record['eval/fid'] == pytest.approx(saved['fid'])


def test_bits_per_dim_alone_needs_no_inception_weights(trained):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.bpd_num_examples = 4
  config.eval.bpd_batch_size = 4
  config.eval.ode_bpd = False  # the bound alone
  results = evaluation.evaluate(config, workdir)
  assert 'fid' not in results and 'ode_bits_per_dim' not in results
  assert np.isfinite(results['bits_per_dim']) and results['bits_per_dim'] > 0


def test_bits_per_dim_of_a_flow_run_come_from_the_ode(tmp_path):
  """A continuous process has no variational bound here: bits/dim through the ODE only; 2-D
  points get their exact divergence and no dequantisation (images and Hutchinson's probes:
  test_fid_kid_and_bits_per_dim)."""
  config = tiny_toy_config()
  config.diffusion.update(process='flow', prediction_type='flow')
  config.training.num_steps = 2
  train.train_and_evaluate(config, str(tmp_path), writer=ListWriter())
  config.eval.update(bpd_num_examples=6, bpd_batch_size=6, ode_rtol=1e-3, ode_atol=1e-3)
  results = evaluation.evaluate(config, str(tmp_path))
  assert 'bits_per_dim' not in results
  assert np.isfinite(results['ode_bits_per_dim']) and results['ode_network_calls_mean'] > 6
  config.eval.ode_bpd = False
  with pytest.raises(ValueError, match='eval.ode_bpd=True'):
    evaluation.evaluate(config, str(tmp_path))


def test_missing_weights_name_the_setting(trained, tmp_path):
  config, workdir = trained
  with pytest.raises(ValueError, match='--config.eval.inception_path') as info:
    evaluation.evaluate(config, workdir)
  assert inception_weights.FID_WEIGHTS_URL in str(info.value)
  config = config.copy_and_resolve_references()
  config.eval.inception_path = str(tmp_path / 'nowhere.pth')
  with pytest.raises(FileNotFoundError, match='--config.eval.inception_path'):
    evaluation.evaluate(config, workdir)


def test_grayscale_goes_through_uint8_to_rgb():
  x = np.linspace(-1, 1, 2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.float32)
  y = inception.to_inception_input(x)
  assert y.shape == (2, 4, 4, 3) and y.dtype == np.float32
  np.testing.assert_array_equal(y[..., 0], y[..., 2])
  np.testing.assert_allclose((y + 1) * 127.5, np.round((y + 1) * 127.5), atol=1e-4)


def test_an_unreadable_reference_cache_is_computed_again(trained, tmp_path, caplog):
  """The cache in eval/ is derived data: a cut-short or garbled file is named and rebuilt."""
  config, _ = trained
  config = config.copy_and_resolve_references()
  config.eval.num_reference = 8
  features_fn = lambda chunks: np.concatenate(
      [np.asarray(x, np.float64).reshape(len(x), -1)[:, :6] for x in chunks])
  workdir = str(tmp_path)
  first = evaluation.reference_statistics(config, workdir, features_fn)
  names = (evaluation.REFERENCE_META, evaluation.REFERENCE_STATS, evaluation.REFERENCE_FEATURES)
  for name in names:
    path = os.path.join(workdir, 'eval', name)
    with open(path, 'rb') as f:
      whole = f.read()
    with open(path, 'wb') as f:
      f.write(whole[:len(whole) // 2])  # cut short
    with caplog.at_level('WARNING'):
      again = evaluation.reference_statistics(config, workdir, features_fn)
    assert 'cannot be read' in caplog.text and 'computed again' in caplog.text, name
    caplog.clear()
    for a, b in zip(first, again):
      np.testing.assert_array_equal(a, b)
  with caplog.at_level('INFO'):
    evaluation.reference_statistics(config, workdir, features_fn)
  assert 'from the cache' in caplog.text  # rewritten whole


class SignalledAtFirstWait(stop_signals.StopFlag):
  """A StopFlag whose signal comes while the first device computation is still running."""

  def fetch(self, tree):
    self._handle(signal.SIGINT, None)
    return super().fetch(tree)


def listing(folder) -> dict:
  """{file name: its bytes} of a folder."""
  return {path.name: path.read_bytes() for path in sorted(pathlib.Path(folder).iterdir())}


def test_a_signal_stops_evaluation_and_leaves_its_files_as_they_were(trained, inception_npz,
                                                                      monkeypatch):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.inception_path = inception_npz
  config.eval.update(num_samples=8, num_reference=8, inception_batch_size=8, kid_subset_size=8,
                     kid_num_subsets=5, bpd_num_examples=4, bpd_batch_size=4, ode_bpd=False)
  evaluation.evaluate(config, workdir)  # results and the reference cache as they are
  before = listing(os.path.join(workdir, 'eval')), len(metric_logging.read_metrics(workdir))
  monkeypatch.setattr(stop_signals, 'StopFlag', SignalledAtFirstWait)
  for fid in (True, False):  # stopped while sampling for FID, or in the bits/dim batches
    config.eval.inception_path = inception_npz if fid else ''
    with pytest.raises(stop_signals.Interrupted, match='stopped by SIGINT'):
      evaluation.evaluate(config, workdir)
    assert (listing(os.path.join(workdir, 'eval')),
            len(metric_logging.read_metrics(workdir))) == before
