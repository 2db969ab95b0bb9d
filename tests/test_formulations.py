"""What each formulation learns: a short training on the Swiss roll per process and
parameterisation, sampled with its own samplers and scored by the sampler study's judge.

A wrong sign or scale anywhere between the training target, the conversion to the data
prediction and a sampler's table leaves every shape right but scores far from the data; an
untrained network scores 6 to 20 here. Each formulation trains 1,200 steps of a small MLP on
the toy config (seconds on one CPU core).
"""

import jax
import pytest

from diffusion_jax import generation, parallel, train
from diffusion_jax import task as task_lib
from experiments import judge as judge_lib
from tests.conftest import tiny_toy_config
from tests.test_train import ListWriter

FORMULATIONS = {
    'ddpm_eps': dict(process='ddpm', prediction_type='eps'),
    'ddpm_v': dict(process='ddpm', prediction_type='v'),
    'vp_x0': dict(process='vp', prediction_type='x0', schedule='cosine'),
    'flow': dict(process='flow', prediction_type='flow', time_sampling='logit_normal'),
    'edm': dict(process='edm', prediction_type='edm', loss_weighting='edm',
                time_sampling='lognormal'),
}
SAMPLERS = {  # name -> (settings, the ratio it must reach)
    'dpm_solver++(2M) SDE': (dict(sampler='dpm_solver++', stochastic=True, num_steps=40), 2.5),
    'heun': (dict(sampler='heun', num_steps=20), 3.2),
    'euler_maruyama': (dict(sampler='euler_maruyama', num_steps=100), 2.7),
}
NUM_SAMPLES = 2000


def formulation_config(name):
  config = tiny_toy_config()
  settings = dict(FORMULATIONS[name])
  time_sampling = settings.pop('time_sampling', 'uniform')
  config.diffusion.update(settings)
  config.diffusion.num_timesteps = 1000
  config.model.hidden, config.model.num_layers = 64, 3
  config.training.update(batch_size=256, num_steps=1200, warmup_steps=50, log_every=600,
                         checkpoint_every=1200, learning_rate=2e-3, ema_decay=0.99,
                         time_sampling=time_sampling)
  config.sampling.spacing = 'karras' if settings['process'] == 'edm' else 'logsnr'
  return config


@pytest.fixture(scope='module')
def judge():
  return judge_lib.make_judge(tiny_toy_config(), num_samples=NUM_SAMPLES)


@pytest.mark.parametrize('name', list(FORMULATIONS))
def test_each_formulation_learns_the_swiss_roll(name, judge, tmp_path, monkeypatch):
  # One device: what is tested is the learning, and 1,200 all-reduces over the four simulated
  # devices can starve on two cores (XLA's CPU rendezvous then aborts the process after 40 s).
  one = jax.devices()[:1]
  create_mesh = parallel.create_mesh
  monkeypatch.setattr(parallel, 'create_mesh',
                      lambda devices=None, fsdp=1: create_mesh(one, fsdp=fsdp))
  config = formulation_config(name)
  state = train.train_and_evaluate(config, str(tmp_path), writer=ListWriter())
  mesh = parallel.create_mesh()
  task = task_lib.create_task(config)
  scores = {}
  for sampler, (settings, _) in SAMPLERS.items():
    cfg = config.copy_and_resolve_references()
    cfg.sampling.update(settings)
    cfg.sampling.batch_size = NUM_SAMPLES
    x = generation.make_generate_fn(cfg, task, mesh)(state.ema_params, jax.random.PRNGKey(1),
                                                     NUM_SAMPLES)
    scores[sampler] = judge.score(x)
  print(name, {k: round(v, 3) for k, v in scores.items()})
  for sampler, (_, limit) in SAMPLERS.items():
    assert scores[sampler] < limit, (sampler, scores)
  untrained = generation.make_generate_fn(config, task, mesh)(
      task_lib.init_params(task.model, task.info, jax.random.PRNGKey(0)), jax.random.PRNGKey(1),
      NUM_SAMPLES)
  assert judge.score(untrained) > 5
