"""Our side of the benchmark: the train step, forward pass and samplers on one fixed batch.

Each timed call blocks until its work is done, as `diffusers_side.TorchBench`'s do.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import numpy as np

from diffusion_jax import generation, parallel, summary, train
from diffusion_jax import task as task_lib

# Timed samplers: name -> (sampling.sampler, network calls, spacing, diffusion.process), each
# against diffusers' own loop (DDIMScheduler, DPMSolverMultistepScheduler 2M,
# FlowMatchEulerDiscreteScheduler) with the same calls and spacing, on the same network.
SAMPLERS = {'ddim50': ('ddim', 50, 'uniform', 'ddpm'),
            'dpm_solver++20': ('dpm_solver++', 20, 'linspace', 'ddpm'),
            'flow_euler20': ('euler', 20, 'uniform', 'flow')}

class JaxBench:
  """Our train step, forward pass and samplers on one fixed global batch on the devices."""

  def __init__(self, config, mesh, images: np.ndarray, *, samplers: bool = True):
    self.config, self.mesh = config, mesh
    self.task = task = task_lib.create_task(config)
    self.state = task_lib.create_train_state(config, task, mesh)
    b = config.training.batch_size
    self.batch = parallel.host_to_global(
        {'x': images, 'label': np.zeros((b,), np.int32)}, parallel.batch_sharding(mesh))
    start = time.perf_counter()
    self.train_step = train.make_train_step(config, task, mesh).lower(
        self.state, self.batch).compile()
    self.train_compile_s = time.perf_counter() - start
    self.train_flops = summary.compiled_flops(self.train_step, mesh.size)
    stats = self.train_step.memory_analysis()
    # XLA's own accounting of the step's buffers (per device): the state is the arguments
    # (donated, so aliased to the outputs); temp is what the step allocates besides.
    self.train_memory = {name: int(getattr(stats, f'{name}_size_in_bytes', 0) or 0)
                         for name in ('argument', 'output', 'alias', 'temp')}
    self.params_bytes = sum(x.nbytes for x in jax.tree.leaves(self.state.params))
    rng = jax.random.PRNGKey(1)
    self.x_t = jax.device_put(jax.random.normal(rng, images.shape), parallel.batch_sharding(mesh))
    self.t = jax.device_put(jax.random.randint(rng, (b,), 0, config.diffusion.num_timesteps),
                            parallel.batch_sharding(mesh))
    apply = jax.jit(lambda params, x, t: task.model.apply({'params': params}, x, t))
    start = time.perf_counter()
    self.apply = apply.lower(self.state.params, self.x_t, self.t).compile()
    self.forward_compile_s = time.perf_counter() - start
    self.forward_flops = summary.compiled_flops(self.apply)
    self.num_params = summary.parameter_count(self.state.params)
    self.samplers = {}
    for name, (sampler, steps, spacing, process) in (SAMPLERS.items() if samplers else ()):
      sampling_config = config.copy_and_resolve_references()
      sampling_config.sampling.spacing = spacing
      sampling_config.diffusion.process = process
      if process == 'flow':
        sampling_config.diffusion.prediction_type = 'flow'
      generate = generation.make_generate_fn(sampling_config,
                                             task_lib.create_task(sampling_config), mesh,
                                             sampler=sampler, num_steps=steps)
      self.samplers[name] = functools.partial(self.sample, generate)

  def step(self) -> None:
    self.state, metrics = self.train_step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))

  def forward(self) -> None:
    self.apply(self.state.params, self.x_t, self.t).block_until_ready()

  def sample(self, generate: Callable) -> None:
    """One batch from `generate` with the EMA parameters of now (the train step donates them)."""
    generate(self.state.ema_params, jax.random.PRNGKey(2), self.config.training.batch_size)


def bf16_config(config):
  """`config` computing in bfloat16 (parameters, optimizer and EMA stay float32)."""
  config = config.copy_and_resolve_references()
  config.model.dtype = 'bfloat16'
  return config
