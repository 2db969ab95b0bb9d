"""The autoencoder against diffusers' AutoencoderKL: a committed fixture of diffusers' outputs
with its weights (experiments/vae_fixture.py), checked without torch; the same live where torch
and diffusers are installed; wrong files refused with the tensor they could not place."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import autoencoder_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'vae_tiny')


def check_against(folder: str, expected: dict) -> None:
  model, params, scaling = autoencoder_weights.load(folder)
  assert scaling == autoencoder_weights.SD_SCALING_FACTOR and model.downsampling == 4
  apply = lambda method, a: model.apply({'params': params}, jnp.asarray(a), method=method)
  mean, logvar = apply(model.encode, expected['x'])
  recon = apply(model.decode, expected['mean'])
  for got, name in ((mean, 'mean'), (logvar, 'logvar'), (recon, 'reconstruction')):
    want = expected[name]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_the_layout_equals_diffusers_on_the_committed_fixture():
  """Same weights, same latents (mean and log-variance) and reconstructions, to 1e-5."""
  with np.load(os.path.join(FIXTURE, 'io.npz')) as f:
    check_against(FIXTURE, dict(f))


def test_the_layout_equals_diffusers_live(tmp_path):
  """Where torch and diffusers are installed: other random weights, written and compared now."""
  pytest.importorskip('torch')
  pytest.importorskip('diffusers')
  from experiments import vae_fixture  # pylint: disable=g-import-not-at-top
  vae = vae_fixture.diffusers_vae(seed=1)
  vae.save_pretrained(str(tmp_path), safe_serialization=True)
  x = np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  check_against(str(tmp_path), dict(x=x, **vae_fixture.outputs(vae, x)))


def test_files_that_do_not_fit_are_refused_naming_the_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(os.path.join(FIXTURE, autoencoder_weights.WEIGHTS_FILE))

  def folder(name, changed, config_changes=None):
    path = tmp_path / name
    path.mkdir()
    with open(os.path.join(FIXTURE, 'config.json')) as f:
      config = json.load(f)
    config.update(config_changes or {})
    (path / 'config.json').write_text(json.dumps(config))
    save_file(changed, str(path / autoencoder_weights.WEIGHTS_FILE))
    return str(path)

  key = 'decoder.up_blocks.0.resnets.1.conv1.weight'
  wrong = dict(tensors, **{key: tensors[key][:, :4]})
  with pytest.raises(ValueError, match=rf'tensor {key} has shape \(16, 4, 3, 3\)'):
    autoencoder_weights.load(folder('shape', wrong))
  extra = dict(tensors, **{'encoder.extra.weight': np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match='tensor encoder.extra.weight .* has no place'):
    autoencoder_weights.load(folder('extra', extra))
  fewer = {k: v for k, v in tensors.items() if not k.startswith('post_quant_conv')}
  with pytest.raises(ValueError, match=r'lacks 2 parameters .*post_quant_conv'):
    autoencoder_weights.load(folder('fewer', fewer))
  with pytest.raises(ValueError, match='this AutoencoderKL builds DownEncoderBlock2D only'):
    autoencoder_weights.load(folder('blocks', tensors, {'down_block_types': ['DownBlock2D'] * 3}))
  # Older checkpoints name the attention query, key, value and proj_attn: read the same.
  old = {k.replace('to_q.', 'query.').replace('to_k.', 'key.').replace('to_v.', 'value.')
          .replace('to_out.0.', 'proj_attn.'): v for k, v in tensors.items()}
  assert any('proj_attn' in k for k in old)
  _, params, _ = autoencoder_weights.load(folder('old_names', old))
  _, same, _ = autoencoder_weights.load(FIXTURE)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)):
    np.testing.assert_array_equal(a, b)
  shutil.rmtree(tmp_path)
