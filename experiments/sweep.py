"""Hyperparameter sweeps: expand a sweep into trials, run them here or on Slurm, summarise.

A sweep is a module (see experiments/sweeps/) whose `get_sweep()` returns a dict:
  config  the base config file, relative to the repository root (e.g. 'configs/flowers.py')
  trials  a list of override dicts, one per trial, {'training.learning_rate': 1e-4, ...}
  fixed   (optional) overrides shared by every trial, kept out of the trial names
Each trial trains with `launch.py --config=<config> --config.<key>=<value> ...` in its own
workdir `<root>/<trial name>`, the name made of its own overrides (`learning_rate=0.0001,...`).

  python experiments/sweep.py expand --sweep=experiments/sweeps/toy2d_small.py
  python experiments/sweep.py run --sweep=experiments/sweeps/toy2d_small.py --root=/tmp/sweep
  python experiments/sweep.py slurm --sweep=experiments/sweeps/flowers_lr_schedule_ema.py \
    --root=/scratch/flowers_sweep --gpus_per_trial=1
  python experiments/sweep.py summary --root=/tmp/sweep

`run` runs the trials on this machine: in parallel, one per group of `--gpus_per_trial` GPUs
(CUDA_VISIBLE_DEVICES) when there are GPUs, else one after another. A trial whose final
checkpoint exists is skipped, so running again resumes a sweep (and launch.py resumes each
unfinished trial from its latest checkpoint). `slurm` writes an array-job script, one array
task per trial, each running `sweep.py run-one --index=$SLURM_ARRAY_TASK_ID`; it does not
submit it. `summary` writes the final loss (and any eval metrics) of every trial with its
overrides to `<root>/summary.md` and `<root>/summary.csv`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, NamedTuple, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch.py')
TRIAL_FILE = 'trial.json'  # in each trial's workdir: its name, index and overrides
MAX_NAME_LENGTH = 120


class Trial(NamedTuple):
  index: int  # position in the sweep: the Slurm array task id
  name: str  # filesystem-safe and unique within the sweep
  overrides: dict  # this trial's own overrides, {'training.learning_rate': 1e-4, ...}
  flags: list  # every --config.<key>=<value> flag (fixed overrides, then the trial's)


class Sweep(NamedTuple):
  path: str  # the sweep definition module
  config: str  # absolute path of the base config file
  trials: list  # [Trial]


# --- expansion and naming ------------------------------------------------------------------------

def format_value(value: Any) -> str:
  """A value as config_flags parses it on the command line: tuples as '(1,2,)', bools as True."""
  if isinstance(value, (tuple, list)):
    inner = ','.join(format_value(v) for v in value)
    return f'({inner},)' if len(value) == 1 else f'({inner})'
  if isinstance(value, float):
    return repr(value)
  return str(value)


def config_flags(overrides: dict) -> list[str]:
  """['--config.training.learning_rate=0.0001', ...] for launch.py."""
  return [f'--config.{key}={format_value(value)}' for key, value in overrides.items()]


def _safe(text: str) -> str:
  """Keeps letters, digits and . _ - = + , (safe in file names, shells and Slurm paths)."""
  return re.sub(r'[^A-Za-z0-9._=+,-]+', '_', text).strip('_') or '_'


def trial_names(trials: Sequence[dict]) -> list[str]:
  """Unique, filesystem-safe names made of each trial's overrides.

  A key is shortened to its last part ('training.learning_rate' -> 'learning_rate') unless that
  is ambiguous within the sweep. Tuples read '1-2-2'. Names that would still clash, or exceed
  MAX_NAME_LENGTH characters, get a hash of their overrides appended.
  """
  keys = {k for t in trials for k in t}
  last = lambda k: k.rsplit('.', 1)[-1]
  ambiguous = {last(k) for k in keys if sum(last(j) == last(k) for j in keys) > 1}

  def value_text(v):
    return '-'.join(value_text(x) for x in v) if isinstance(v, (tuple, list)) else str(v)

  canonical = [json.dumps(t, sort_keys=True, default=str) for t in trials]
  dupes = sorted({c for c in canonical if canonical.count(c) > 1})
  if dupes:
    raise ValueError(f'the sweep lists the same overrides more than once: {dupes}; remove the '
                     'duplicate trials.')
  names = []
  for t in trials:
    parts = [f'{k if last(k) in ambiguous else last(k)}={value_text(v)}' for k, v in t.items()]
    names.append(_safe(','.join(parts)) if parts else 'base')
  clashes = {n for n in names if names.count(n) > 1}
  for i, (name, c) in enumerate(zip(names, canonical)):
    if name in clashes or len(name) > MAX_NAME_LENGTH:
      names[i] = f'{name[:MAX_NAME_LENGTH - 9]}-{hashlib.sha1(c.encode()).hexdigest()[:8]}'
  return names


def _import_file(path: str, name: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist; pass the path of a .py file.')
  if ROOT not in sys.path:  # configs import `configs.default`
    sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _resolve(path: str) -> str:
  """An absolute path: as given if it exists from here, else relative to the repository."""
  return os.path.abspath(path if os.path.exists(path) else os.path.join(ROOT, path))


def make_sweep(definition: dict, path: str = '') -> Sweep:
  """The trials of a `get_sweep()` result (see the module docstring)."""
  unknown = set(definition) - {'config', 'trials', 'fixed'}
  if 'config' not in definition or 'trials' not in definition or unknown:
    raise ValueError(f'get_sweep() of {path or "the sweep"} must return a dict with `config` and '
                     f'`trials` (and optionally `fixed`); got keys {sorted(definition)}.')
  trials = [dict(t) for t in definition['trials']]
  if not trials:
    raise ValueError(f'{path or "the sweep"} has no trials.')
  fixed = dict(definition.get('fixed', {}))
  names = trial_names(trials)
  return Sweep(os.path.abspath(path) if path else '', _resolve(definition['config']),
               [Trial(i, n, t, config_flags({**fixed, **t}))
                for i, (n, t) in enumerate(zip(names, trials))])


def load_sweep(path: str) -> Sweep:
  """The sweep defined by the module at `path`."""
  path = _resolve(path)
  return make_sweep(_import_file(path, 'sweep_definition').get_sweep(), path)


# --- running -------------------------------------------------------------------------------------

def num_steps(sweep: Sweep, trial: Trial) -> int:
  """training.num_steps of the trial: its override, else the base config's value."""
  for flag in reversed(trial.flags):
    if flag.startswith('--config.training.num_steps='):
      return int(flag.split('=', 1)[1])
  return int(_import_file(sweep.config, 'sweep_base_config').get_config().training.num_steps)


def latest_checkpoint_step(workdir: str) -> Optional[int]:
  """The newest finished checkpoint in `<workdir>/checkpoints` (Orbax names them by step and
  writes them under a temporary name first), or None."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return None
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
  return max(steps) if steps else None


def launch_command(sweep: Sweep, trial: Trial, root: str, python: str = sys.executable) -> list:
  return [python, LAUNCH, f'--config={sweep.config}',
          f'--workdir={os.path.join(os.path.abspath(root), trial.name)}', *trial.flags]


def _start(sweep: Sweep, trial: Trial, root: str, env: dict) -> Optional[subprocess.Popen]:
  """Starts the trial (output appended to its launch.log), or returns None if it is done."""
  workdir = os.path.join(root, trial.name)
  steps = num_steps(sweep, trial)
  done = latest_checkpoint_step(workdir)
  if done is not None and done >= steps:
    print(f'[{trial.index}] {trial.name}: finished (step {done}), skipped.', flush=True)
    return None
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, TRIAL_FILE), 'w') as f:
    json.dump({'index': trial.index, 'name': trial.name, 'overrides': trial.overrides,
               'config': sweep.config, 'sweep': sweep.path}, f, indent=2, default=str)
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
  run at once as there are such groups; without, trials run one after another. A failed trial
  does not stop the others. `timeout` bounds each trial, in seconds.
  """
  gpus = visible_gpus() if gpus is None else gpus
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


# --- Slurm ---------------------------------------------------------------------------------------

def slurm_script(sweep: Sweep, root: str, *, gpus_per_trial: int = 1, cpus_per_trial: int = 8,
                 time_limit: str = '24:00:00', partition: str = '',
                 python: str = sys.executable) -> str:
  """An sbatch array job: task i runs `sweep.py run-one --index=i` (trial i) on one node."""
  root = os.path.abspath(root)
  name = os.path.splitext(os.path.basename(sweep.path))[0] or 'sweep'
  lines = ['#!/bin/bash',
           f'#SBATCH --job-name={_safe(name)}',
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


# --- summary -------------------------------------------------------------------------------------

def final_metrics(records: list[dict]) -> dict:
  """step and loss of the last training record, plus the latest value of every eval metric
  (records without a loss, written by --mode=eval)."""
  out = {}
  for r in records:
    if 'loss' in r:
      out['step'], out['loss'] = r['step'], r['loss']
    else:
      out.update({k: v for k, v in r.items() if k != 'step'})
  return out


def summarize(root: str) -> list[dict]:
  """One row per trial workdir under `root` (those holding trial.json), in sweep order:
  {'trial', <override keys>..., 'step', 'loss', <eval metrics>...}."""
  trials = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    path = os.path.join(root, name, TRIAL_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        trials.append(json.load(f))
  trials.sort(key=lambda t: t['index'])
  # Imported here so that expand/slurm stay free of JAX.
  from diffusion_jax.metric_logging import read_metrics  # pylint: disable=g-import-not-at-top
  rows = []
  for t in trials:
    row = {'trial': t['name'], **t['overrides']}
    row.update(final_metrics(read_metrics(os.path.join(root, t['name']))))
    rows.append(row)
  return rows


def _columns(rows: list[dict]) -> list[str]:
  columns = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  return columns


def _cell(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.6g}'
  return str(value)


def to_markdown(rows: list[dict]) -> str:
  if not rows:
    return '(no trials)\n'
  columns = _columns(rows)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns)]
  lines += ['| ' + ' | '.join(_cell(r.get(c)) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def to_csv(rows: list[dict]) -> str:
  """CSV at full precision (repr of floats), one row per trial; missing values are empty."""
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=_columns(rows), lineterminator='\n')
  writer.writeheader()
  for r in rows:
    writer.writerow({k: (json.dumps(v) if isinstance(v, (list, tuple)) else v)
                     for k, v in r.items()})
  return out.getvalue()


def write_summary(root: str) -> str:
  """Writes `<root>/summary.md` and `<root>/summary.csv`; returns the markdown."""
  rows = summarize(root)
  markdown = to_markdown(rows)
  with open(os.path.join(root, 'summary.md'), 'w') as f:
    f.write(markdown)
  with open(os.path.join(root, 'summary.csv'), 'w') as f:
    f.write(to_csv(rows))
  return markdown


# --- command line --------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  commands = parser.add_subparsers(dest='command', required=True)
  expand = commands.add_parser('expand', help='list the trials and their launch.py flags')
  run = commands.add_parser('run', help='run every unfinished trial on this machine')
  one = commands.add_parser('run-one', help='run one trial (what a Slurm array task does)')
  slurm = commands.add_parser('slurm', help='write an sbatch array-job script (not submitted)')
  summary = commands.add_parser('summary', help='final metrics of every trial under --root')
  for p in (expand, run, one, slurm):
    p.add_argument('--sweep', required=True, help='sweep module, e.g. experiments/sweeps/x.py')
  for p in (run, one, slurm, summary):
    p.add_argument('--root', required=True, help='the sweep directory; trial i trains in '
                   '<root>/<name of trial i>')
  for p in (run, slurm):
    p.add_argument('--gpus_per_trial', type=int, default=1, help='GPUs given to each trial')
  for p in (run, one):
    p.add_argument('--timeout', type=float, default=None, help='seconds per trial (none)')
  one.add_argument('--index', type=int, required=True, help='trial index (0-based)')
  slurm.add_argument('--cpus_per_trial', type=int, default=8)
  slurm.add_argument('--time', default='24:00:00', help='Slurm time limit per trial')
  slurm.add_argument('--partition', default='', help='Slurm partition (default: the cluster\'s)')
  return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  if args.command == 'summary':
    print(write_summary(args.root), end='')
    print(f'wrote {os.path.join(args.root, "summary.md")} and summary.csv', file=sys.stderr)
    return 0
  sweep = load_sweep(args.sweep)
  if args.command == 'expand':
    for t in sweep.trials:
      print(f'{t.index}\t{t.name}\t{" ".join(t.flags)}')
    print(f'{len(sweep.trials)} trials of {sweep.config}', file=sys.stderr)
    return 0
  if args.command == 'slurm':
    print(write_slurm_script(sweep, args.root, gpus_per_trial=args.gpus_per_trial,
                             cpus_per_trial=args.cpus_per_trial, time_limit=args.time,
                             partition=args.partition))
    return 0
  if args.command == 'run-one':
    return run_one(sweep, args.index, args.root, timeout=args.timeout)
  status = run_all(sweep, args.root, gpus_per_trial=args.gpus_per_trial, timeout=args.timeout)
  failed = sorted(name for name, code in status.items() if code)
  if failed:
    print(f'{len(failed)} of {len(status)} trials failed: {", ".join(failed)}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
