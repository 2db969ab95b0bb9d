"""Multi-process training on one machine: 2 processes x 2 CPU devices against 1 x 4.

Both runs see the same global batches and noise, so their losses agree step by step, and the
checkpoint written by 2 processes restores in a single process on 1 device. SIGTERM stops both
processes at the same step, with a checkpoint of it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Optional

import jax
import numpy as np
import pytest

from diffusion_jax import checkpointing, metric_logging, parallel
from diffusion_jax import task as task_lib
from tests.conftest import tiny_toy_config, xla_flags
from tests.test_launch import ROOT, launch, overrides

TIMEOUT_S = 300  # for all processes together: a hung collective must fail, not stall the suite


def free_port() -> int:
  """A port on 127.0.0.1 that nothing listens on now (the OS picks it for port 0)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch_processes(flags: list[str], *, num_processes: int, devices_per_process: int,
                     logdir: str, attempts: int = 2,
                     while_running: Optional[Callable[[list], None]] = None) -> None:
  """Runs launch.py as `num_processes` cooperating processes; all must exit with 0.

  Output goes to files (a full pipe would block a process and hang its peers). As soon as one
  process fails, or at the deadline, the others are killed (they would wait for their peer until
  JAX's own much longer timeouts). A coordinator port taken by someone else between our probe
  and its bind is retried with a new port. `while_running(processes)` is called about twice a
  second while they run.
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=xla_flags(devices_per_process))
  for attempt in range(attempts):
    address = f'127.0.0.1:{free_port()}'
    # The coordinator would listen on every interface ([::]) by default; loopback is enough.
    env['JAX_COORDINATOR_BIND_ADDRESS'] = address
    logs = [os.path.join(logdir, f'process_{i}.{attempt}.log') for i in range(num_processes)]
    procs = []
    try:
      for i, path in enumerate(logs):
        with open(path, 'w') as log:
          procs.append(subprocess.Popen(
              [sys.executable, 'launch.py', *flags, f'--coordinator_address={address}',
               f'--num_processes={num_processes}', f'--process_id={i}'],
              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
      deadline = time.monotonic() + TIMEOUT_S
      while (any(p.poll() is None for p in procs) and not any(p.poll() for p in procs)
             and time.monotonic() < deadline):
        if while_running:
          while_running(procs)
        time.sleep(0.5)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    codes = [p.returncode for p in procs]
    if not any(codes):
      return
    text = '\n'.join(f'--- {path}\n' + open(path).read()[-3000:] for path in logs)
    if 'already in use' not in text or attempt == attempts - 1:
      raise AssertionError(f'exit codes {codes} (-9: killed after a peer failed or after '
                           f'{TIMEOUT_S} s)\n{text}')


def restore(config, workdir: str, mesh) -> task_lib.TrainState:
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    task = task_lib.create_task(config)
    return checkpointing.restore(manager, task_lib.abstract_train_state(config, task, mesh))
  finally:
    manager.close()


@pytest.mark.parametrize('fsdp', [1, 2])
def test_two_processes_match_one_and_their_checkpoint_restores_on_one_device(tmp_path, fsdp):
  """With fsdp = 2 each process's two devices share the state (the mesh is 2 x 2)."""
  config = tiny_toy_config()
  config.training.log_every = 1
  config.training.sample_every = 2  # the preview sampler runs on the 2-process mesh too
  config.sampling.preview_samples = 64
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  flags = ['--config=configs/toy2d.py'] + overrides(config)

  launch_processes(flags + [f'--workdir={multi}', f'--config.parallel.fsdp={fsdp}'],
                   num_processes=2, devices_per_process=2, logdir=str(tmp_path))
  launch(*flags, f'--workdir={single}', devices=4)

  got, want = metric_logging.read_metrics(multi), metric_logging.read_metrics(single)
  steps = list(range(1, config.training.num_steps + 1))
  assert [r['step'] for r in got] == steps and [r['step'] for r in want] == steps
  np.testing.assert_allclose([r['loss'] for r in got], [r['loss'] for r in want], rtol=1e-5)
  np.testing.assert_allclose([r['grad_norm'] for r in got], [r['grad_norm'] for r in want],
                             rtol=1e-4)
  assert os.path.exists(os.path.join(multi, 'config.json'))
  assert os.path.exists(os.path.join(multi, 'samples', 'train_00000004.png'))

  # The 2-process checkpoint holds the same state as the 1-process one, restored on 1 device.
  # (The sample run below takes the workdir's config.json, fsdp included, onto one device.)
  mesh = parallel.create_mesh(jax.devices()[:1])
  a, b = restore(config, multi, mesh), restore(config, single, mesh)
  assert int(a.step) == int(b.step) == config.training.num_steps
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               a.ema_params, b.ema_params)

  # And `--mode=sample` on one device uses it.
  launch(*flags, f'--workdir={multi}', '--mode=sample', devices=1)
  with np.load(os.path.join(multi, 'samples', 'samples.npz')) as f:
    assert f['points'].shape == (config.sampling.num_samples, 2)
    assert np.all(np.isfinite(f['points']))


def test_sigterm_stops_both_processes_at_the_same_step_with_a_checkpoint(tmp_path):
  config = tiny_toy_config()
  config.training.num_steps = 1_000_000  # ended by the signal
  config.training.log_every = 1  # the processes agree on stopping at log steps
  config.training.checkpoint_every = 100_000
  workdir = str(tmp_path / 'run')
  signalled = []

  def preempt_once_training(procs):
    records = metric_logging.read_metrics(workdir)
    if not signalled and records and records[-1]['step'] >= 3:
      for p in procs:
        p.send_signal(signal.SIGTERM)
      signalled.append(records[-1]['step'])

  launch_processes(['--config=configs/toy2d.py', f'--workdir={workdir}'] + overrides(config),
                   num_processes=2, devices_per_process=2, logdir=str(tmp_path),
                   while_running=preempt_once_training)
  assert signalled, 'training ended before it was signalled'
  last = metric_logging.read_metrics(workdir)[-1]['step']
  assert signalled[0] <= last < config.training.num_steps
  saved = os.listdir(checkpointing.checkpoint_dir(workdir))
  assert str(last) in saved, (last, saved)


def test_eval_over_two_processes_with_an_uneven_example_count(tmp_path, tiny_digits_run):
  """5 held-out images over 2 processes: shares of 3 and 2, padded to the same batches, so the
  processes' collectives match (an uneven split used to leave one waiting) and each image
  counts once."""
  import shutil  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_image_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_digits_run[1], workdir)  # a trained tiny run (its own copy: eval writes)
  flags = ['--config=configs/digits.py'] + overrides(tiny_image_config())
  bpd = ['--mode=eval', '--config.eval.bpd_num_examples=5', '--config.eval.bpd_batch_size=4',
         '--config.eval.ode_bpd=False']  # the bound: what is tested is the split of examples
  launch_processes(flags + [f'--workdir={workdir}'] + bpd, num_processes=2,
                   devices_per_process=2, logdir=str(tmp_path))
  two = metric_logging.read_metrics(workdir)[-1]['eval/bits_per_dim']
  launch(*flags, f'--workdir={workdir}', *bpd, devices=4)
  one = metric_logging.read_metrics(workdir)[-1]['eval/bits_per_dim']
  assert np.isfinite(two) and two == pytest.approx(one, rel=0.05)
