"""generation: the network as denoise_fn (classifier-free guidance in one doubled batch), the labels
each sample is asked for, and the sharded generator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import generation, input_pipeline, parallel, processes
from diffusion_jax import task as task_lib
from tests.conftest import tiny_toy_config


def test_guidance_combines_predictions():
  cond, uncond = jnp.ones((2, 2)), jnp.zeros((2, 2))
  np.testing.assert_allclose(generation.guide(cond, uncond, 3.0), 3.0)
  np.testing.assert_allclose(generation.guide(cond, uncond, 0.0), 0.0)
  np.testing.assert_allclose(generation.guide(cond, uncond, 1.0), cond)


def conditional_toy_config(scale=3.0):
  config = tiny_toy_config()
  config.data.class_conditional = True
  config.data.num_classes = 3
  config.sampling.guidance_scale = scale
  return config


def noisy_params(task):
  params = task_lib.init_params(task.model, task.info, jax.random.PRNGKey(0))
  # Non-zero output layer: the initial one is zero, which would hide any mix-up.
  return jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)


@pytest.mark.parametrize('process,prediction_type', [('ddpm', 'eps'), ('ddpm', 'v'),
                                                      ('flow', 'flow'), ('edm', 'edm')])
def test_guidance_in_one_batch_equals_the_two_call_form(process, prediction_type):
  config = conditional_toy_config()
  config.diffusion.process = process
  config.diffusion.prediction_type = prediction_type
  task = task_lib.create_task(config)
  params = noisy_params(task)
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 2))
  t = {'ddpm': jnp.array([0, 10, 20, 50, 80, 99], jnp.float32),
       'flow': jnp.linspace(0.01, 0.99, 6),
       'edm': jnp.array([0.01, 0.1, 0.5, 1.0, 10.0, 80.0])}[process]
  labels = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
  got = generation.make_denoise_fn(task, params, labels, config)(x, t)

  def data_prediction(lab):  # written out from each parameterisation's definition
    a, s = (v[:, None] for v in task.process.alpha_sigma(t))
    if process == 'edm':  # EDM, Table 1: D = c_skip x + c_out F(c_in x, c_noise)
      c_in = 1 / jnp.sqrt(s ** 2 + 0.25)
      pred = task.model.apply({'params': params}, c_in * x, 250 * jnp.log(t), lab, train=False)
      return 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / jnp.sqrt(s ** 2 + 0.25) * pred
    t_net = t if process == 'ddpm' else 1000 * t
    pred = task.model.apply({'params': params}, x, t_net, lab, train=False)
    if prediction_type == 'eps':
      return (x - s * pred) / a
    if prediction_type == 'v':
      return a * x - s * pred
    return x - t[:, None] * pred  # flow: x_t = x0 + t (eps - x0)
  cond, uncond = data_prediction(labels), data_prediction(jnp.full_like(labels, 3))
  np.testing.assert_allclose(got, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(cond - uncond).max()) > 1e-3  # the label matters to this network


def test_guidance_interval_guides_only_inside_it():
  """Kynkaanniemi et al. (2024): guidance only where lo < sigma~ <= hi; elsewhere the plain
  conditional prediction."""
  config = conditional_toy_config()
  config.diffusion.process = 'edm'
  config.diffusion.prediction_type = 'edm'
  config.sampling.guidance_interval = (0.3, 3.0)
  task = task_lib.create_task(config)
  params = noisy_params(task)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 2))
  t = jnp.array([0.1, 0.5, 2.0, 20.0])
  labels = jnp.array([0, 1, 2, 0], jnp.int32)
  got = generation.make_denoise_fn(task, params, labels, config)(x, t)
  config.sampling.guidance_interval = ()
  everywhere = generation.make_denoise_fn(task, params, labels, config)(x, t)
  config.sampling.guidance_scale = 1.0
  plain = generation.make_denoise_fn(task, params, labels, config)(x, t)
  inside = np.array([False, True, True, False])
  np.testing.assert_allclose(got[inside], everywhere[inside], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[~inside], plain[~inside], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(everywhere - plain).max()) > 1e-3


class RecordingModel:
  """Stands in for the network: eps = 0, and records the labels of every call."""

  def __init__(self):
    self.calls = []

  def apply(self, variables, x, t, labels, train):
    del variables, t, train
    jax.debug.callback(lambda lab: self.calls.append(np.asarray(lab)), labels)
    return jnp.zeros_like(x)


@pytest.mark.parametrize('label', [-1, 2])
def test_labels_and_the_null_label_reach_the_network_as_documented(label):
  config = conditional_toy_config(scale=2.0)
  config.sampling.sampler, config.sampling.num_steps = 'ddim', 4
  config.sampling.label, config.sampling.batch_size = label, 6
  model = RecordingModel()
  task = task_lib.Task(model, processes.from_config(config.diffusion), None, None,
                       input_pipeline.DataInfo((2,), 3))
  generate = generation.make_generate_fn(config, task, parallel.create_mesh(jax.devices()[:1]))
  generate({}, jax.random.PRNGKey(0), 12)  # two batches of 6
  jax.effects_barrier()
  assert generate.num_calls == 4 and len(model.calls) == 2 * 4  # one call per step, per batch
  asked = generation.sample_labels(np.arange(12), label, 3)
  np.testing.assert_array_equal(asked, [2] * 12 if label == 2 else np.arange(12) % 3)
  for i, call in enumerate(model.calls):
    batch = asked[6 * (i // 4):6 * (i // 4) + 6]
    # Each sample next to its unconditional twin, whose label is the null class num_classes.
    np.testing.assert_array_equal(call, np.stack([batch, np.full(6, 3)], 1).ravel())


def test_without_guidance_the_network_sees_the_labels_once():
  config = conditional_toy_config(scale=1.0)
  config.sampling.sampler, config.sampling.num_steps, config.sampling.batch_size = 'ddim', 3, 4
  model = RecordingModel()
  task = task_lib.Task(model, processes.from_config(config.diffusion), None, None,
                       input_pipeline.DataInfo((2,), 3))
  generation.make_generate_fn(config, task, parallel.create_mesh(jax.devices()[:1]))(
      {}, jax.random.PRNGKey(0), 4)
  jax.effects_barrier()
  assert len(model.calls) == 3
  for call in model.calls:
    np.testing.assert_array_equal(call, [0, 1, 2, 0])
