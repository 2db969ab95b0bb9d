"""A Slurm array job for a sweep: one array task per trial, each running `sweep.py run-one`."""

from __future__ import annotations

import os
import shlex
import sys

from experiments.sweeping.expansion import ROOT, Sweep, safe_name


def slurm_script(sweep: Sweep, root: str, *, gpus_per_trial: int = 1, cpus_per_trial: int = 8,
                 time_limit: str = '24:00:00', partition: str = '',
                 python: str = sys.executable) -> str:
  """An sbatch array job: task i runs `sweep.py run-one --index=i` (trial i) on one node."""
  root = os.path.abspath(root)
  name = os.path.splitext(os.path.basename(sweep.path))[0] or 'sweep'
  lines = ['#!/bin/bash',
           f'#SBATCH --job-name={safe_name(name)}',
           f'#SBATCH --array=0-{len(sweep.trials) - 1}',
           '#SBATCH --nodes=1',
           '#SBATCH --ntasks=1',
           f'#SBATCH --cpus-per-task={cpus_per_trial}',
           f'#SBATCH --time={time_limit}',
           f'#SBATCH --output={os.path.join(root, "slurm", "%A_%a.out")}']
  if gpus_per_trial:
    lines.append(f'#SBATCH --gres=gpu:{gpus_per_trial}')
  if partition:
    lines.append(f'#SBATCH --partition={partition}')
  command = [python, os.path.join(ROOT, 'experiments', 'sweep.py'), 'run-one',
             f'--sweep={sweep.path}', f'--root={root}']
  lines += ['',
            '# One trial per array task; a requeued or repeated task resumes or skips its trial.',
            f'cd {shlex.quote(ROOT)}',
            ' '.join(shlex.quote(c) for c in command) + ' --index="$SLURM_ARRAY_TASK_ID"', '']
  return '\n'.join(lines)


def write_slurm_script(sweep: Sweep, root: str, **kwargs) -> str:
  """Writes `<root>/<sweep name>.sbatch` (and makes `<root>/slurm/` for its logs); its path."""
  os.makedirs(os.path.join(root, 'slurm'), exist_ok=True)
  name = os.path.splitext(os.path.basename(sweep.path))[0] or 'sweep'
  path = os.path.join(os.path.abspath(root), f'{name}.sbatch')
  with open(path, 'w') as f:
    f.write(slurm_script(sweep, root, **kwargs))
  os.chmod(path, 0o755)
  return path
