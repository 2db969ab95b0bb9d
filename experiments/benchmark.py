"""Speed of a network: train, forward, sampling, bfloat16, input pipeline, start-up; vs diffusers.

  python experiments/benchmark.py --config=configs/bench.py --compare=diffusers
  python experiments/benchmark.py --config=configs/bench_dit.py --compare=diffusers
  python experiments/benchmark.py --config=configs/bench.py --config.training.batch_size=32
  python experiments/benchmark.py --config=configs/bench.py --compare=meanflow

Measures, on the config's model and global batch: parameters, XLA's FLOPs per train step,
compile times, steady-state images/s of the real data-parallel train step (batches already on
the devices), of the forward pass and of end-to-end sampling (DDIM at 50 calls, DPM-Solver++(2M)
at 20), peak memory, the fraction of a measured 4096^2 matmul peak (float32 on CPU, bfloat16 on
GPU) that training reaches, the input pipeline's delivery rate against the train step's
consumption, and the time from process start to the first finished train step of
configs/digits.py. With --compare=diffusers the same architecture in diffusers/PyTorch
(UNet2DModel for the U-Net, DiTTransformer2DModel for the DiT; parameter counts must agree) is timed
the same way (sampling with diffusers' own scheduler loops under `torch.inference_mode()`), its
measurements alternating with ours in this one process so that both see the same machine load;
all times are medians. Where the CPU computes bfloat16 natively (AMX, AVX-512 BF16) it also
times both sides in bfloat16: our `model.dtype=bfloat16` against torch's CPU autocast. With
--compare=meanflow the train step of MeanFlow (one JVP of the network more) is timed against
flow matching on the same network, alternating.

On CPU the script first re-executes itself with `diffusion_jax.cpu_env` (malloc settings and
the XLA flags chosen for this CPU; set DIFFUSION_JAX_CPU_ENV=0 to measure without them). The
header names the CPU and the settings in force. Prints a table and writes JSON.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from diffusion_jax import cpu_env  # pylint: disable=wrong-import-position

if __name__ == '__main__':
  cpu_env.reexec_with_cpu_settings()  # before JAX is imported: glibc and XLA read these once

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import platform
import resource
import subprocess
import tempfile
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from diffusion_jax import input_pipeline, parallel
from experiments import jax_side
# pylint: enable=g-import-not-at-top,wrong-import-position

config_flags.DEFINE_config_file('config', os.path.join(_ROOT, 'configs', 'bench.py'),
                                'Config file; fields can be overridden, '
                                'e.g. --config.training.batch_size=32.', lock_config=False)
flags.DEFINE_enum('compare', None, ['diffusers', 'phema', 'meanflow'],
                  'Also time diffusers\' UNet2DModel or DiTTransformer2DModel, or this config '
                  'with post-hoc EMA (training.phema_sigma_rels=(0.05, 0.1)), alternating with '
                  'ours.')
flags.DEFINE_string('output', 'benchmark.json', 'Where the JSON results go.')
flags.DEFINE_integer('warmup', 2, 'Untimed calls before each measurement.')
flags.DEFINE_integer('repeats', 10, 'Timed train steps and forward passes per side.')
flags.DEFINE_integer('sample_repeats', 3, 'Timed calls of each sampler.')
flags.DEFINE_integer('pipeline_batches', 50, 'Timed batches of the input pipeline.')
flags.DEFINE_bool('first_step', True, 'Time `launch.py` on configs/digits.py to its first step.')
flags.DEFINE_bool('bf16', True, 'With --compare=diffusers, also time bfloat16 compute (ours '
                  'against torch\'s CPU autocast) where the CPU has it natively (AMX, '
                  'AVX-512 BF16).')
FLAGS = flags.FLAGS

PHEMA_WIDTHS = (0.05, 0.10)
MEANFLOW_SIDES = {'jax flow matching': 'denoise', 'jax meanflow': 'meanflow'}


def meanflow_config(config, objective: str):
  """`config` on the flow path with an interval embedding, trained by `objective`."""
  config = config.copy_and_resolve_references()
  config.diffusion.process = config.diffusion.prediction_type = 'flow'
  config.model.interval_embedding = True
  config.training.objective = objective
  return config


def alternate(fns: dict[str, Callable[[], object]], *, warmup: int,
              repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each function, their calls interleaved round by round.

  Each function must block until its work is done.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def median(xs: list[float]) -> float:
  return float(np.median(xs))


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
  """FLOP/s of an n x n matmul on the default device: float32 on CPU, bfloat16 elsewhere."""
  dtype = jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  mm = jax.jit(jnp.dot)
  times = alternate({'mm': lambda: mm(a, a).block_until_ready()}, warmup=1, repeats=repeats)
  return 2 * n**3 / median(times['mm'])


def peak_memory_bytes() -> dict:
  """Device memory high-water mark where the device reports one, else host RSS high-water."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return {'kind': 'device', 'bytes': int(stats['peak_bytes_in_use'])}
  return {'kind': 'host_rss', 'bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def synthetic_npz(directory: str, n: int, size: int, channels: int) -> str:
  """A random uint8 [n, size, size, channels] `images` file with `labels` of 10 classes, for
  timing the npz source."""
  path = os.path.join(directory, 'synthetic.npz')
  rng = np.random.default_rng(0)
  np.savez(path, images=rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
           labels=rng.integers(0, 10, (n,), dtype=np.int32))
  return path


def pipeline_rate(config, mesh, num_batches: int) -> float:
  """Images/s that `input_pipeline.create_iterator` delivers as sharded device arrays."""
  batches = input_pipeline.create_iterator(config, mesh)
  for _ in range(3):
    jax.block_until_ready(next(batches))
  start = time.perf_counter()
  for _ in range(num_batches):
    jax.block_until_ready(next(batches))
  return num_batches * config.training.batch_size / (time.perf_counter() - start)


def time_to_first_step(workdir: str, timeout: float = 600.0) -> float | None:
  """Seconds from starting `launch.py --config=configs/digits.py` to its first logged step."""
  cmd = [sys.executable, os.path.join(_ROOT, 'launch.py'),
         f'--config={os.path.join(_ROOT, "configs", "digits.py")}', f'--workdir={workdir}',
         '--config.training.num_steps=1', '--config.training.log_every=1',
         '--config.training.sample_every=0', '--alsologtostderr']
  # A fresh compilation cache: the cold start is what is measured.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, 'xla_cache'))
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  seconds = None
  for line in proc.stderr:
    if seconds is None and 'step 1/1' in line:
      seconds = time.perf_counter() - start
  proc.wait(timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed with exit status {proc.returncode}.')
  return seconds


def run(config, *, compare: str | None, warmup: int, repeats: int, sample_repeats: int,
        pipeline_batches: int, first_step: bool, bf16: bool) -> dict:
  """Every measurement, as a JSON-ready dict (see the module docstring)."""
  config = config.copy_and_resolve_references()
  b = config.training.batch_size
  config.sampling.batch_size = b
  mesh = parallel.create_mesh()
  device = jax.devices()[0]
  cpu = cpu_env.read_cpu()
  on_cpu = jax.default_backend() == 'cpu'
  res = {'device': f'{jax.device_count()} x {device.device_kind} ({device.platform})',
         'host': f'{platform.machine()}, {os.cpu_count()} CPUs', 'jax': jax.__version__,
         'cpu': {'name': cpu.describe(), 'vendor': cpu.vendor, 'family': cpu.family,
                 'model': cpu.model, 'isa': cpu.isa, 'kind': cpu.kind},
         'batch_size': b, 'image_shape': list(input_pipeline.example_shape(config)),
         'environment': {k: os.environ.get(k, '') for k in
                         list(cpu_env.MALLOC_SETTINGS) + ['XLA_FLAGS']}}
  # bfloat16 rows where the processor computes in it natively (or on an accelerator).
  bf16 = bf16 and compare == 'diffusers' and (cpu.has_bf16 or not on_cpu)
  with tempfile.TemporaryDirectory() as tmp:
    if config.data.source == 'npz' and not config.data.path:
      config.data.path = synthetic_npz(tmp, max(2048, 4 * b), config.data.image_size,
                                       config.data.channels)
    images = next(input_pipeline.host_batches(config, b))['x']
    logging.info('Compiling the train step, forward and sampler.')
    jb = jax_side.JaxBench(config, mesh, images)
    res['params'] = jb.num_params
    res['train_step_flops'] = jb.train_flops
    res['forward_flops'] = jb.forward_flops
    res['train_compile_s'] = jb.train_compile_s
    res['train_step_memory_bytes'] = jb.train_memory
    res['params_bytes'] = jb.params_bytes
    res['forward_compile_s'] = jb.forward_compile_s
    res['matmul_peak_flops'] = matmul_peak(repeats=min(5, FLAGS.repeats))
    jb.step()
    jb.forward()
    res['peak_memory'] = peak_memory_bytes()  # ours alone: before PyTorch allocates anything

    fns_train, fns_forward = {'jax': jb.step}, {'jax': jb.forward}
    bf16_train, bf16_forward = {}, {}  # timed as a pair of their own, after float32
    fns_sample = {f'jax {name}': fn for name, fn in jb.samplers.items()}
    if compare == 'diffusers':
      from experiments import diffusers_side  # pylint: disable=g-import-not-at-top
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(len(os.sched_getaffinity(0)))
      abar = np.asarray(jb.task.schedule.alphas_cumprod)
      tb = diffusers_side.TorchBench(config, images, abar)
      torch_params = diffusers_side.parameter_count(tb.model)
      if torch_params != jb.num_params:
        raise SystemExit(f'FATAL: diffusers\' {type(tb.model).__name__} has {torch_params:,} '
                         f'parameters, ours {jb.num_params:,}: the architectures differ, timings '
                         'would mislead.')
      res['torch'] = {'version': torch.__version__, 'threads': torch.get_num_threads(),
                      'params': torch_params,
                      'matmul_peak_flops': diffusers_side.matmul_flops_per_s()}
      fns_train['torch'], fns_forward['torch'] = tb.train_step, tb.forward
      for name, (sampler, steps, _, process) in jax_side.SAMPLERS.items():
        fns_sample[f'torch {name}'] = tb.sampler('flow_euler' if process == 'flow' else sampler,
                                                 steps, config.sampling.clip_x0)
      if bf16:
        logging.info('Compiling the bfloat16 train step and forward.')
        jh = jax_side.JaxBench(jax_side.bf16_config(config), mesh, images, samplers=False)
        th = diffusers_side.TorchBench(config, images, abar, bfloat16=True)
        bf16_train = {'jax bf16': jh.step, 'torch bf16': th.train_step}
        bf16_forward = {'jax bf16': jh.forward, 'torch bf16': th.forward}
        res['bf16_train_compile_s'] = jh.train_compile_s
    elif compare == 'meanflow':
      # The same network (flow path, interval embedding) under its two objectives.
      benches = {name: jax_side.JaxBench(meanflow_config(config, objective), mesh, images,
                                         samplers=False)
                 for name, objective in MEANFLOW_SIDES.items()}
      fns_train.update({name: bench.step for name, bench in benches.items()})
    elif compare == 'phema':
      with_phema = config.copy_and_resolve_references()
      with_phema.training.phema_sigma_rels = PHEMA_WIDTHS
      jp = jax_side.JaxBench(with_phema, mesh, images, samplers=False)
      fns_train['jax+phema'] = jp.step

    logging.info('Timing train steps: %s, alternating.', ', '.join(fns_train))
    train_times = alternate(fns_train, warmup=warmup, repeats=repeats)
    logging.info('Timing forward passes.')
    forward_times = alternate(fns_forward, warmup=warmup, repeats=repeats)
    if bf16_train:
      logging.info('Timing bfloat16 train steps and forward passes.')
      train_times.update(alternate(bf16_train, warmup=warmup, repeats=repeats))
      forward_times.update(alternate(bf16_forward, warmup=warmup, repeats=repeats))
    logging.info('Timing sampling: %s.', ', '.join(fns_sample))
    sample_times = alternate(fns_sample, warmup=1, repeats=sample_repeats)
    rate = lambda times: b / median(times)
    res['train_images_per_s'] = rate(train_times['jax'])
    res['forward_images_per_s'] = rate(forward_times['jax'])
    res['sampling_images_per_s'] = {name: rate(t) for name, t in sample_times.items()}
    res['ddim50_images_per_s'] = res['sampling_images_per_s']['jax ddim50']
    # What the sampling loop adds to the network: seconds per network call over a forward pass.
    res['sampling_call_over_forward'] = {
        name: median(sample_times[f'jax {name}']) / steps / median(forward_times['jax'])
        for name, (_, steps, _, _) in jax_side.SAMPLERS.items()}
    res['train_flops_per_s'] = jb.train_flops / median(train_times['jax'])
    res['train_fraction_of_peak'] = res['train_flops_per_s'] / res['matmul_peak_flops']
    res['times_s'] = {'train': train_times, 'forward': forward_times, 'sampling': sample_times}
    if compare == 'meanflow':
      plain, meanflow = (median(train_times[name]) for name in MEANFLOW_SIDES)
      res['meanflow'] = {
          'plain_images_per_s': b / plain, 'meanflow_images_per_s': b / meanflow,
          'meanflow_over_plain_time': meanflow / plain,
          'train_step_memory_bytes': {name: bench.train_memory
                                      for name, bench in benches.items()}}
    if compare == 'phema':
      memory = jp.train_memory
      res['phema'] = {
          'sigma_rels': list(PHEMA_WIDTHS),
          'train_images_per_s': rate(train_times['jax+phema']),
          'train_ratio_on_over_off': median(train_times['jax']) / median(train_times['jax+phema']),
          'train_step_memory_bytes': memory,
          'extra_argument_over_params': ((memory['argument'] - jb.train_memory['argument'])
                                         / jb.params_bytes),
          'extra_temp_bytes': memory['temp'] - jb.train_memory['temp']}
    if compare == 'diffusers':
      t = res['torch']
      t['train_images_per_s'] = rate(train_times['torch'])
      t['forward_images_per_s'] = rate(forward_times['torch'])
      t['train_flops_per_s'] = jb.train_flops / median(train_times['torch'])
      t['train_fraction_of_peak'] = t['train_flops_per_s'] / res['matmul_peak_flops']
      ratios = {'train': res['train_images_per_s'] / t['train_images_per_s'],
                'forward': res['forward_images_per_s'] / t['forward_images_per_s']}
      for name in jax_side.SAMPLERS:
        ratios[name] = median(sample_times[f'torch {name}']) / median(sample_times[f'jax {name}'])
      if bf16:
        res['bf16'] = {f'{side} {kind}': rate(times[f'{side} bf16'])
                       for side in ('jax', 'torch')
                       for kind, times in (('train', train_times), ('forward', forward_times))}
        for kind in ('train', 'forward'):
          ratios[f'{kind} bf16'] = res['bf16'][f'jax {kind}'] / res['bf16'][f'torch {kind}']
      res['ratio_jax_over_torch'] = ratios
      res['process_peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    logging.info('Timing the input pipeline and the digits start-up.')
    res['pipeline_images_per_s'] = pipeline_rate(config, mesh, pipeline_batches)
    res['pipeline_over_consumption'] = res['pipeline_images_per_s'] / res['train_images_per_s']
    res['digits_first_step_s'] = (time_to_first_step(os.path.join(tmp, 'digits'))
                                  if first_step else None)
  return res


def format_table(res: dict) -> str:
  """A Markdown table of the results, with PyTorch columns when they were measured."""
  t = res.get('torch') or {}
  rows = []

  def add(name: str, ours, theirs=None, fmt: str = '{:.1f}', ratio: bool = True) -> None:
    cell = lambda v: v if isinstance(v, str) else ('' if v is None else fmt.format(v))
    numbers = all(isinstance(v, (int, float)) and v for v in (ours, theirs))
    r = f'{ours / theirs:.2f}x' if ratio and numbers else ''
    rows.append((name, cell(ours) or 'not measured', cell(theirs), r))

  scale = lambda key, k: t[key] / k if key in t else None
  mem = res['peak_memory']
  add('parameters', f'{res["params"]:,}', f'{t["params"]:,}' if t else None)
  add('train step GFLOP (XLA count)', res['train_step_flops'] / 1e9)
  add('compile s: train step / forward',
      f'{res["train_compile_s"]:.1f} / {res["forward_compile_s"]:.1f}')
  add('train images/s', res['train_images_per_s'], t.get('train_images_per_s'), '{:.2f}')
  add('forward images/s', res['forward_images_per_s'], t.get('forward_images_per_s'), '{:.2f}')
  sampling = res['sampling_images_per_s']
  for name, (sampler, steps, spacing, process) in jax_side.SAMPLERS.items():
    add(f'sampling images/s, {process} {sampler} {steps} calls ({spacing})',
        sampling[f'jax {name}'],
        sampling.get(f'torch {name}'), '{:.3f}')
  add('sampling s per network call / forward s', ' / '.join(
      f'{v:.2f} ({name})' for name, v in res['sampling_call_over_forward'].items()))
  if 'bf16' in res:
    for kind in ('train', 'forward'):
      add(f'bfloat16 {kind} images/s (torch: CPU autocast)', res['bf16'][f'jax {kind}'],
          res['bf16'][f'torch {kind}'], '{:.2f}')
  add('train GFLOP/s', res['train_flops_per_s'] / 1e9, scale('train_flops_per_s', 1e9))
  add('train, % of the matmul peak below', 100 * res['train_fraction_of_peak'],
      scale('train_fraction_of_peak', 0.01), '{:.0f}%', ratio=False)
  add('4096^2 float32 matmul GFLOP/s' if jax.default_backend() == 'cpu' else
      '4096^2 bfloat16 matmul GFLOP/s', res['matmul_peak_flops'] / 1e9,
      scale('matmul_peak_flops', 1e9), '{:.0f}')
  add(f'peak memory GiB ({mem["kind"]})', mem['bytes'] / 2**30, fmt='{:.2f}')
  step_mem = res['train_step_memory_bytes']
  add('train step MiB: state (arguments) / temporaries (XLA)',
      f'{step_mem["argument"] / 2**20:.1f} / {step_mem["temp"] / 2**20:.1f}')
  add('input pipeline images/s', res['pipeline_images_per_s'], fmt='{:.0f}')
  add('pipeline / train consumption', res['pipeline_over_consumption'], fmt='{:.0f}x')
  add('digits: process start to first step, s', res['digits_first_step_s'])
  if 'meanflow' in res:
    m, mib = res['meanflow'], lambda name: res['meanflow']['train_step_memory_bytes'][name]
    add('MeanFlow / flow matching (same network): train images/s, step temporaries MiB',
        ' / '.join(f'{m[k]:.2f}' for k in ('meanflow_images_per_s', 'plain_images_per_s'))
        + ', ' + ' / '.join(f'{mib(n)["temp"] / 2**20:.1f}' for n in reversed(MEANFLOW_SIDES)))
  if 'phema' in res:
    p = res['phema']
    add('train images/s with post-hoc EMA (on / off)', p['train_images_per_s'],
        res['train_images_per_s'], '{:.2f}')
    add('post-hoc EMA: extra state / params, extra temporaries MiB',
        f'{p["extra_argument_over_params"]:.2f} / {p["extra_temp_bytes"] / 2**20:.2f}')
  head = ('metric', 'JAX', 'PyTorch (diffusers)' if t else '', 'JAX / PyTorch' if t else '')
  lines = ['| ' + ' | '.join(head) + ' |', '| --- | ---: | ---: | ---: |']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)


def main(argv):
  del argv
  res = run(FLAGS.config, compare=FLAGS.compare, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
            sample_repeats=FLAGS.sample_repeats, pipeline_batches=FLAGS.pipeline_batches,
            first_step=FLAGS.first_step, bf16=FLAGS.bf16)
  res['command'] = ' '.join(['python'] + [os.path.relpath(sys.argv[0], _ROOT)] + sys.argv[1:])
  print(f'{res["device"]}; {res["host"]}; jax {res["jax"]}'
        + (f'; torch {res["torch"]["version"]}' if 'torch' in res else '')
        + f'; batch {res["batch_size"]}')
  print(f'CPU: {res["cpu"]["name"]}')
  print('settings: ' + (' '.join(f'{k}={v}' for k, v in res['environment'].items() if v)
                        or 'none (DIFFUSION_JAX_CPU_ENV=0 or not on CPU)'))
  print(format_table(res))
  with open(FLAGS.output, 'w') as f:
    json.dump(res, f, indent=2)
  print(f'wrote {FLAGS.output}')


if __name__ == '__main__':
  app.run(main)
