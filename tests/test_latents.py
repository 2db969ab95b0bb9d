"""The autoencoder task and latent diffusion: the loss against NumPy, training an autoencoder,
encoding the data once, a latent run that trains, samples, evaluates and stops when its
autoencoder changes or is gone (in process, on the 4 forced CPU devices)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import (autoencoding, config_checks, evaluation, latents, parallel, run_config,
                           sampling, sources, summary, task as task_lib, train)
from diffusion_jax.models.autoencoder import AutoencoderKL
from tests.conftest import tiny_autoencoder_config, tiny_latent_config
from tests.test_train import ListWriter


@pytest.mark.parametrize('loss', ['l1', 'l2'])
def test_autoencoder_loss_matches_numpy(loss):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 4, 4, 2))
  a, b = rng.normal(size=(32, 8)), rng.normal(size=(8, 32))
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  encode = lambda v: (jnp.tanh(v.reshape(3, -1) @ a).reshape(3, 2, 2, 2),
                      (v.reshape(3, -1) @ a).reshape(3, 2, 2, 2) * 0.1 - 1.0)
  decode = lambda z: (z.reshape(3, -1) @ b).reshape(3, 4, 4, 2)
  with jax.enable_x64():
    got = autoencoding.loss_per_example(encode, decode, jnp.asarray(x), keys, loss=loss,
                                        kl_weight=0.01)
    eps = np.stack([np.asarray(jax.random.normal(k, (2, 2, 2), jnp.float64)) for k in keys])
  mean = np.tanh(x.reshape(3, -1) @ a)
  logvar = (x.reshape(3, -1) @ a) * 0.1 - 1.0
  z = mean + np.exp(logvar / 2) * eps.reshape(3, -1)
  err = (z @ b) - x.reshape(3, -1)
  rec = np.abs(err).mean(1) if loss == 'l1' else np.square(err).mean(1)
  kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).sum(1)
  np.testing.assert_allclose(np.asarray(got), rec + 0.01 * kl / 32, rtol=1e-10)


def test_psnr_is_ten_log10_of_four_over_the_mean_squared_error():
  x = np.zeros((2, 4, 4, 1), np.float32)
  recon = np.stack([np.full((4, 4, 1), 0.1), np.full((4, 4, 1), 3.0)]).astype(np.float32)
  got = np.asarray(autoencoding.psnr(jnp.asarray(x), jnp.asarray(recon)))
  np.testing.assert_allclose(got, [10 * np.log10(4 / 0.01), 10 * np.log10(4 / 1.0)], rtol=1e-5)


def test_autoencoder_run_previews_and_evaluates_its_reconstructions(autoencoder_run):
  config, workdir = autoencoder_run
  assert os.path.exists(os.path.join(workdir, 'samples', 'train_00000003.png'))
  results = evaluation.evaluate(config, workdir)
  assert results['step'] == 3 and results['psnr_num_examples'] == 16
  # The same 16 held-out digits (the last of the data set) reconstructed here, in NumPy.
  task = task_lib.create_task(config)
  mesh = parallel.create_mesh(jax.devices()[:1])
  params, _ = task_lib.restore_ema_params(config, task, mesh, workdir)
  images, _ = sources.load_in_memory(config)
  x = images[-16:].astype(np.float64) / 127.5 - 1
  recon = np.clip(np.asarray(task.model.apply({'params': params}, x.astype(np.float32))), -1, 1)
  psnr = 10 * np.log10(4 / np.square(recon - x).mean(axis=(1, 2, 3)))
  np.testing.assert_allclose(results['psnr'], psnr.mean(), rtol=1e-4)
  with open(os.path.join(workdir, 'eval', 'results.json')) as f:
    assert json.load(f)['psnr'] == results['psnr']


def test_latent_run_encodes_once_with_the_data_scale(autoencoder_run, latent_run):
  config, workdir = latent_run
  with open(os.path.join(workdir, 'config.json')) as f:
    recorded = json.load(f)['latent']
  ae_config = tiny_autoencoder_config()
  model = autoencoding.create_model(ae_config)
  ae = latents.load(config)
  assert recorded['autoencoder_step'] == 3 and recorded['fingerprint'] == ae.fingerprint
  images, _ = sources.load_in_memory(config)
  means = np.asarray(model.apply({'params': ae.params}, images.astype(np.float32) / 127.5 - 1,
                                 method=AutoencoderKL.encode)[0])
  np.testing.assert_allclose(recorded['scale'], 1 / means.std(dtype=np.float64), rtol=1e-4)
  cached = np.load(os.path.join(workdir, 'latents', 'latents.npy'))
  np.testing.assert_allclose(cached, means, atol=1e-5)
  # A resumed run reads the cache instead of encoding again.
  stamp = os.stat(os.path.join(workdir, 'latents', 'latents.npy')).st_mtime_ns
  more = tiny_latent_config(autoencoder_run[1])
  more.training.num_steps = 4
  train.train_and_evaluate(more, workdir, writer=ListWriter())
  assert os.stat(os.path.join(workdir, 'latents', 'latents.npy')).st_mtime_ns == stamp


def test_latent_run_samples_decoded_images_and_counts_both_stages(latent_run):
  given, workdir = latent_run
  config = run_config.for_sampling(given, workdir, {})  # as launch.py does: the run's own
  out = sampling.sample(config, workdir)
  with np.load(out['npz']) as f:
    assert f['images'].shape == (8, 8, 8, 1) and f['images'].dtype == np.uint8
  result = summary.summarize(config)
  assert result['autoencoder']['params'] > 0 and result['autoencoder']['decode_flops'] > 0
  assert task_lib.create_task(config).info.shape == (4, 4, 4)


def test_latent_run_stops_when_its_autoencoder_changed_or_is_gone(autoencoder_run, tmp_path):
  ae_config, shared = autoencoder_run
  ae_dir = str(tmp_path / 'autoencoder')
  shutil.copytree(shared, ae_dir)
  config = tiny_latent_config(ae_dir)
  workdir = str(tmp_path / 'latent')
  train.train_and_evaluate(config, workdir, writer=ListWriter())
  longer = ae_config.copy_and_resolve_references()
  longer.training.num_steps = 4  # the autoencoder trains on: its newest checkpoint changes
  train.train_and_evaluate(longer, ae_dir, writer=ListWriter())
  resumed = tiny_latent_config(ae_dir)
  resumed.training.num_steps = 3
  with pytest.raises(ValueError, match='autoencoder_step=3'):
    train.train_and_evaluate(resumed, workdir, writer=ListWriter())
  resumed.latent.autoencoder_step = 3  # the fix the error names
  assert latents.prepare(resumed, workdir, trained=True)[0].latent.autoencoder_step == 3
  gone = tiny_latent_config(str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match='no autoencoder there'):
    config_checks.validate(gone, 1, mode='train')


def test_start_up_refusals_of_latent_and_autoencoder_runs(autoencoder_run):
  config = tiny_latent_config(autoencoder_run[1])
  config.sampling.clip_x0 = 1.0
  with pytest.raises(ValueError, match='clip_x0=0'):
    config_checks.validate(config, 1, mode='sample')
  config.sampling.clip_x0 = 0.0
  config.eval.bpd_num_examples = 8
  with pytest.raises(ValueError, match='bits/dim of a latent run'):
    config_checks.validate(config, 1, mode='eval')
  ae = tiny_autoencoder_config()
  with pytest.raises(ValueError, match='does not sample'):
    config_checks.validate(ae, 1, mode='sample')
  ae.data.image_size = 9
  with pytest.raises(ValueError, match='downsampling factor 2'):
    config_checks.validate(ae, 1, mode='train')


def test_latent_study_judges_a_latent_and_a_pixel_run(latent_run, tiny_digits_run, tmp_path):
  from experiments import latent_study  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'study')
  latent_study.study([('pixel', tiny_digits_run[1], None), ('latent', latent_run[1], 2)], out,
                     num_samples=16)
  with open(os.path.join(out, 'results.json')) as f:
    results = json.load(f)
  assert [r['name'] for r in results] == ['pixel', 'latent'] and results[1]['step'] == 2
  assert results[1]['latent'] and not results[0]['latent']
  assert all(np.isfinite(r['ratio']) and r['copy_ratio'] > 0 for r in results)
  assert os.path.exists(os.path.join(out, 'latent_nearest.png'))
