"""Running a sweep's trials on this machine: in parallel, one per group of GPUs, or one after
another on a CPU; finished trials are skipped and unfinished ones resume (launch.py resumes a
workdir from its latest checkpoint by itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Optional

from diffusion_jax import files, run_config
from experiments.sweeping.expansion import ROOT, Sweep, Trial, num_steps

LAUNCH = os.path.join(ROOT, 'launch.py')
TRIAL_FILE = 'trial.json'  # in each trial's workdir: its name, index and overrides


def finished_step(workdir: str) -> Optional[int]:
  """The last step of a trial that finished: its completion record, which training writes once
  the final checkpoint is on disk (a checkpoint folder alone may be half written or corrupt)."""
  return run_config.finished_step(workdir)


def launch_command(sweep: Sweep, trial: Trial, root: str, python: str = sys.executable) -> list:
  return [python, LAUNCH, f'--config={sweep.config}',
          f'--workdir={os.path.join(os.path.abspath(root), trial.name)}', *trial.flags]


def _start(sweep: Sweep, trial: Trial, root: str, env: dict) -> Optional[subprocess.Popen]:
  """Starts the trial (output appended to its launch.log), or returns None if it is done."""
  workdir = os.path.join(root, trial.name)
  steps = num_steps(sweep, trial)
  done = finished_step(workdir)
  if done is not None and done >= steps:
    print(f'[{trial.index}] {trial.name}: finished (step {done}), skipped.', flush=True)
    return None
  os.makedirs(workdir, exist_ok=True)
  files.write_text(os.path.join(workdir, TRIAL_FILE), json.dumps(
      {'index': trial.index, 'name': trial.name, 'overrides': trial.overrides,
       'config': sweep.config, 'sweep': sweep.path}, indent=2, default=str))
  gpus = env.get('CUDA_VISIBLE_DEVICES')
  print(f'[{trial.index}] {trial.name}: training to step {steps}'
        + (f' on GPUs {gpus}' if gpus is not None else '') + f', log in {workdir}/launch.log',
        flush=True)
  with open(os.path.join(workdir, 'launch.log'), 'a') as log:
    return subprocess.Popen(launch_command(sweep, trial, root), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, timeout: Optional[float]) -> int:
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    return -9


def run_one(sweep: Sweep, index: int, root: str, *, timeout: Optional[float] = None) -> int:
  """Runs trial `index` in this process's environment; its exit status (0 if already done)."""
  if not 0 <= index < len(sweep.trials):
    raise IndexError(f'--index={index} is out of range: the sweep has {len(sweep.trials)} '
                     f'trials (0..{len(sweep.trials) - 1}).')
  proc = _start(sweep, sweep.trials[index], root, dict(os.environ))
  return 0 if proc is None else _wait(proc, timeout)


def visible_gpus() -> list[str]:
  """The GPUs trials may use: CUDA_VISIBLE_DEVICES if set, else those nvidia-smi lists."""
  if 'CUDA_VISIBLE_DEVICES' in os.environ:
    return [g for g in os.environ['CUDA_VISIBLE_DEVICES'].split(',') if g.strip()]
  try:
    out = subprocess.run(['nvidia-smi', '--query-gpu=index', '--format=csv,noheader'],
                         capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [line.strip() for line in out.splitlines() if line.strip()]


def run_all(sweep: Sweep, root: str, *, gpus_per_trial: int = 1,
            gpus: Optional[list[str]] = None, timeout: Optional[float] = None) -> dict:
  """Runs every unfinished trial; {trial name: exit status}.

  With GPUs, each trial gets `gpus_per_trial` of them (CUDA_VISIBLE_DEVICES) and as many trials
  run at once as there are such groups; without, or with gpus_per_trial=0, trials run one after
  another on the CPU. A failed trial does not stop the others. `timeout` bounds each trial, in
  seconds.
  """
  if gpus_per_trial < 0:
    raise ValueError(f'--gpus_per_trial={gpus_per_trial} must be 0 (the CPU) or more.')
  gpus = [] if gpus_per_trial == 0 else (visible_gpus() if gpus is None else gpus)
  if gpus and gpus_per_trial > len(gpus):
    raise ValueError(f'--gpus_per_trial={gpus_per_trial} but only {len(gpus)} GPUs are visible; '
                     f'lower --gpus_per_trial.')
  groups = ([','.join(gpus[i:i + gpus_per_trial])
             for i in range(0, len(gpus) - gpus_per_trial + 1, gpus_per_trial)]
            if gpus else [None])
  pending, running, status = list(sweep.trials), {}, {}
  try:
    while pending or running:
      free = [g for g in groups if g not in running]
      while pending and free:
        trial, group = pending.pop(0), free.pop(0)
        env = dict(os.environ)
        if group is not None:
          env['CUDA_VISIBLE_DEVICES'] = group
        elif gpus_per_trial == 0:  # on the CPU, even where there are GPUs
          env.update(CUDA_VISIBLE_DEVICES='', JAX_PLATFORMS='cpu')
        proc = _start(sweep, trial, root, env)
        if proc is None:
          status[trial.name] = 0
          free.insert(0, group)
        else:
          running[group] = (trial, proc, time.monotonic())
      for group, (trial, proc, start) in list(running.items()):
        code = proc.poll()
        if code is None and timeout is not None and time.monotonic() - start > timeout:
          code = _wait(proc, 0)
        if code is not None:
          del running[group]
          status[trial.name] = code
          print(f'[{trial.index}] {trial.name}: ' + ('done' if code == 0 else
                f'FAILED (exit {code}), see {os.path.join(root, trial.name, "launch.log")}'),
                flush=True)
      if running:
        time.sleep(1.0)
  finally:  # interrupted: leave no orphaned trainings behind
    for _, proc, _ in running.values():
      if proc.poll() is None:
        proc.terminate()  # launch.py saves a checkpoint on SIGTERM
        _wait(proc, 60)
  return status
