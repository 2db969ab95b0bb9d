"""Test settings: 4 forced CPU devices, a persistent compilation cache, tiny configs."""

import os


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for `devices` CPU devices, for the tests and their subprocesses.

  The tests compile hundreds of tiny programs and run each a few times: XLA's CPU backend without
  its LLVM optimisation passes compiles them about twice as fast, and every comparison in the suite
  is between programs compiled alike.
  """
  return (f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
          ' --xla_llvm_disable_expensive_passes=true')


os.environ.setdefault('XLA_FLAGS', xla_flags(4))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('JAX_COMPILATION_CACHE_DIR',
                                 os.path.join(os.path.dirname(__file__), '..', '.jax_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def tiny_image_config(source='digits', image_size=8, channels=1):
  """A U-Net of 16 channels on 8x8 images: compiles and steps in about a second on CPU."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.source = source
  config.data.name = 'digits'
  config.data.image_size = image_size
  config.data.channels = channels
  config.data.random_flip = False
  config.model.channels = 16
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = (4,)
  config.model.num_groups = 8
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = 100
  config.training.batch_size = 8
  config.training.num_steps = 4
  config.training.warmup_steps = 2
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.sample_every = 0
  config.sampling.num_steps = 5
  config.sampling.preview_steps = 3
  config.sampling.num_samples = 8
  config.sampling.batch_size = 8
  config.sampling.preview_samples = 4
  return config


def tiny_toy_config(name='swiss_roll'):
  from configs import toy2d  # pylint: disable=g-import-not-at-top
  config = toy2d.get_config()
  config.data.name = name
  config.data.num_points = 4096
  config.model.hidden = 32
  config.model.num_layers = 2
  config.diffusion.num_timesteps = 100
  config.training.batch_size = 64
  config.training.num_steps = 4
  config.training.warmup_steps = 2
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.sampling.num_steps = 10
  config.sampling.num_samples = 64
  config.sampling.batch_size = 64
  return config


@pytest.fixture(scope='session')
def tiny_digits_run(tmp_path_factory):
  """(config, workdir) of `tiny_image_config` trained for 2 steps (a checkpoint at step 2), shared
  by the tests that only read a trained run or write beside it (samples, evaluation)."""
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top
  from tests.test_train import ListWriter  # pylint: disable=g-import-not-at-top
  config = tiny_image_config()
  config.training.num_steps = 2
  workdir = str(tmp_path_factory.mktemp('tiny_digits_run') / 'run')
  train.train_and_evaluate(config, workdir, writer=ListWriter())
  return config, workdir


def tiny_autoencoder_config():
  """An autoencoder of widths 8-16 on the 8x8 digits: 4x4x4 latents."""
  config = tiny_image_config()
  config.model.architecture = 'autoencoder'
  config.autoencoder.block_out_channels = (8, 16)
  config.autoencoder.layers_per_block = 1
  config.autoencoder.num_groups = 4
  config.training.num_steps = 3
  config.training.checkpoint_every = 3
  config.training.sample_every = 3
  config.training.keep_checkpoints = 5
  config.eval.psnr_num_examples = 16
  return config


def tiny_latent_config(autoencoder: str):
  """`tiny_image_config` diffusing the latents of the autoencoder run at `autoencoder`."""
  config = tiny_image_config()
  config.latent.autoencoder = autoencoder
  config.model.attention_resolutions = (2,)  # the U-Net works at 4 and 2 on 4x4 latents
  config.sampling.clip_x0 = 0.0
  config.training.num_steps = 2
  return config


@pytest.fixture(scope='session')
def autoencoder_run(tmp_path_factory):
  """(config, workdir) of `tiny_autoencoder_config` trained for 3 steps (checkpoint at 3)."""
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top
  from tests.test_train import ListWriter  # pylint: disable=g-import-not-at-top
  config = tiny_autoencoder_config()
  workdir = str(tmp_path_factory.mktemp('autoencoder') / 'run')
  train.train_and_evaluate(config, workdir, writer=ListWriter())
  return config, workdir


@pytest.fixture(scope='session')
def latent_run(autoencoder_run, tmp_path_factory):
  """(config, workdir) of `tiny_latent_config` on that autoencoder, trained for 2 steps."""
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top
  from tests.test_train import ListWriter  # pylint: disable=g-import-not-at-top
  config = tiny_latent_config(autoencoder_run[1])
  workdir = str(tmp_path_factory.mktemp('latent') / 'run')
  train.train_and_evaluate(config, workdir, writer=ListWriter())
  return config, workdir


@pytest.fixture
def image_config():
  return tiny_image_config()


@pytest.fixture
def toy_config():
  return tiny_toy_config()
