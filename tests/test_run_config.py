"""run_config: a run's config read back from config.json, or from a config file."""

import json
import os

import pytest

from diffusion_jax import run_config
from tests.conftest import tiny_image_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_json_round_trip_restores_tuples_and_new_defaults(tmp_path):
  config = tiny_image_config()
  values = json.loads(config.to_json_best_effort())
  del values['eval']['kid_subset_size']  # a field added after the run was written
  (tmp_path / 'config.json').write_text(json.dumps(values))
  loaded = run_config.load_config(str(tmp_path))
  assert loaded.model.channel_mult == (1, 2) and loaded.model.attention_resolutions == (4,)
  assert loaded.model.channels == 16 and loaded.diffusion.num_timesteps == 100
  assert loaded.eval.kid_subset_size == 1000


def test_config_file_when_there_is_no_json(tmp_path):
  config = run_config.load_config(str(tmp_path), os.path.join(ROOT, 'configs', 'digits.py'))
  assert config.data.source == 'digits' and config.model.channel_mult == (1, 2)
  with pytest.raises(FileNotFoundError, match='config.json'):
    run_config.load_config(str(tmp_path))


def test_the_attention_kernel_may_change_but_not_the_network(tmp_path):
  """model.attention chooses how the network is computed (a run trained with cuDNN resumes or
  samples on a CPU); model.* fields that change the network are refused."""
  trained = tiny_image_config()
  trained.model.attention = 'cudnn'
  (tmp_path / 'config.json').write_text(trained.to_json_best_effort())
  given = tiny_image_config()
  given.model.attention = 'xla'
  assert run_config.check_resume(given, str(tmp_path)) == {'model.attention': ('cudnn', 'xla')}
  merged = run_config.for_sampling(given, str(tmp_path), {'model.attention': 'xla'})
  assert merged.model.attention == 'xla'
  assert run_config.for_sampling(given, str(tmp_path), {}).model.attention == 'cudnn'
  given.model.channels = 32
  with pytest.raises(ValueError, match='model.channels: trained 16, given 32'):
    run_config.check_resume(given, str(tmp_path))
