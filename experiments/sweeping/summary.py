"""The results of a sweep: each trial's overrides with its final loss and eval metrics, as
Markdown and CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import Any

from experiments.sweeping.local import TRIAL_FILE


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
      try:
        with open(path) as f:
          trials.append(dict(json.load(f)))
      except (OSError, ValueError, TypeError) as e:
        print(f'{path} cannot be read ({type(e).__name__}: {e}); that trial is left out of the '
              'summary. Running the sweep again rewrites it (finished trials are not retrained).',
              file=sys.stderr)
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
