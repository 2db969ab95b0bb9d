"""Hyperparameter sweeps: expand a sweep into trials, run them here or on Slurm, summarise.

A sweep is a module in experiments/sweeps/ whose `get_sweep()` gives a base config and the
overrides of each trial (the format: experiments/sweeping/expansion.py); each trial trains with
launch.py in its own workdir `<root>/<trial name>`.

  python experiments/sweep.py expand --sweep=experiments/sweeps/toy2d_small.py
  python experiments/sweep.py run --sweep=experiments/sweeps/toy2d_small.py --root=/tmp/sweep
  python experiments/sweep.py slurm --sweep=experiments/sweeps/flowers_lr_schedule.py \
    --root=/scratch/flowers_sweep --gpus_per_trial=1
  python experiments/sweep.py summary --root=/tmp/sweep

`run` runs the trials on this machine: in parallel, one per group of `--gpus_per_trial` GPUs
(CUDA_VISIBLE_DEVICES) when there are GPUs, else (or with --gpus_per_trial=0) one after another
on the CPU. A trial whose completion record (finished.json) exists is skipped, so running again
resumes a sweep (and launch.py resumes each unfinished trial from its latest checkpoint).
`slurm` writes an array-job script, one array task per trial, each running
`sweep.py run-one --index=$SLURM_ARRAY_TASK_ID`; it does not submit it. `summary` writes the
final loss (and any eval metrics) of every trial with its overrides to `<root>/summary.md` and
`<root>/summary.csv`. The parts live in `experiments/sweeping/`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.sweeping import expansion, local, slurm, summary
# pylint: enable=g-import-not-at-top,wrong-import-position


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  commands = parser.add_subparsers(dest='command', required=True)
  expand = commands.add_parser('expand', help='list the trials and their launch.py flags')
  run = commands.add_parser('run', help='run every unfinished trial on this machine')
  one = commands.add_parser('run-one', help='run one trial (what a Slurm array task does)')
  slurm_cmd = commands.add_parser('slurm',
                                  help='write an sbatch array-job script (not submitted)')
  summary_cmd = commands.add_parser('summary', help='final metrics of every trial under --root')
  for p in (expand, run, one, slurm_cmd):
    p.add_argument('--sweep', required=True, help='sweep module, e.g. experiments/sweeps/x.py')
  for p in (run, one, slurm_cmd, summary_cmd):
    p.add_argument('--root', required=True, help='the sweep directory; trial i trains in '
                   '<root>/<name of trial i>')
  for p in (run, slurm_cmd):
    p.add_argument('--gpus_per_trial', type=int, default=1, help='GPUs given to each trial')
  for p in (run, one):
    p.add_argument('--timeout', type=float, default=None, help='seconds per trial (none)')
  one.add_argument('--index', type=int, required=True, help='trial index (0-based)')
  slurm_cmd.add_argument('--cpus_per_trial', type=int, default=8)
  slurm_cmd.add_argument('--time', default='24:00:00', help='Slurm time limit per trial')
  slurm_cmd.add_argument('--partition', default='',
                         help='Slurm partition (default: the cluster\'s)')
  return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  if args.command == 'summary':
    print(summary.write_summary(args.root), end='')
    print(f'wrote {os.path.join(args.root, "summary.md")} and summary.csv', file=sys.stderr)
    return 0
  sweep = expansion.load_sweep(args.sweep)
  if args.command == 'expand':
    for t in sweep.trials:
      print(f'{t.index}\t{t.name}\t{" ".join(t.flags)}')
    print(f'{len(sweep.trials)} trials of {sweep.config}', file=sys.stderr)
    return 0
  if args.command == 'slurm':
    print(slurm.write_slurm_script(sweep, args.root, gpus_per_trial=args.gpus_per_trial,
                                   cpus_per_trial=args.cpus_per_trial, time_limit=args.time,
                                   partition=args.partition))
    return 0
  if args.command == 'run-one':
    return local.run_one(sweep, args.index, args.root, timeout=args.timeout)
  status = local.run_all(sweep, args.root, gpus_per_trial=args.gpus_per_trial,
                         timeout=args.timeout)
  failed = sorted(name for name, code in status.items() if code)
  if failed:
    print(f'{len(failed)} of {len(status)} trials failed: {", ".join(failed)}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
