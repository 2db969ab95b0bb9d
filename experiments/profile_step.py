"""Where a train step's time goes: a `jax.profiler` trace of it, summed by kind of operation.

  python experiments/profile_step.py --config=configs/bench.py
  python experiments/profile_step.py --config=configs/bench.py --top=30 --trace_dir=/tmp/trace

Traces `--steps` train steps of the config's model (after two untimed ones), reads the Perfetto
trace the profiler writes, and prints two tables: time by kind (convolutions, matmuls, fused
elementwise/reduction loops, copies, the rest), and the `--top` operations by total time, each
as thread-seconds per step and the share of all thread time. The trace stays in --trace_dir for
TensorBoard or ui.perfetto.dev. On CPU the script first re-executes itself with
`diffusion_jax.cpu_env`, as the benchmark does, and its header names the CPU and the settings.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from diffusion_jax import cpu_env  # pylint: disable=wrong-import-position

if __name__ == '__main__':
  cpu_env.reexec_with_cpu_settings()

# pylint: disable=g-import-not-at-top,wrong-import-position
import collections
import glob
import gzip
import json
import re
import tempfile

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from diffusion_jax import input_pipeline, parallel
from experiments import jax_side
# pylint: enable=g-import-not-at-top,wrong-import-position

config_flags.DEFINE_config_file('config', os.path.join(_ROOT, 'configs', 'bench.py'),
                                'Config file; fields can be overridden as for launch.py.',
                                lock_config=False)
flags.DEFINE_integer('steps', 3, 'Traced train steps.')
flags.DEFINE_integer('top', 20, 'Operations listed by total time.')
flags.DEFINE_string('trace_dir', None, 'Where the trace goes (default: a temporary folder).')
FLAGS = flags.FLAGS

# What an operation is, from the HLO ops it computes (first match wins).
KINDS = (('convolution', {'convolution'}), ('matmul', {'dot'}),
         ('copy / transpose', {'copy', 'transpose'}))
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][a-z\-]*)\(')
_COMPUTATION = re.compile(r'^\s*%?([\w.\-]+)\s*\(.*\{\s*$')
_CALLS = re.compile(r'(?:calls|to_apply)=\{?%?([\w.\-]+)')
# Trace events that contain the operations' own events, rather than being operations.
_CONTAINERS = re.compile(r'^(Thunk:|ThunkExecutor|ExecuteHelper|TfrtCpu|XLA:|\$|while\b|call\b)')


def hlo_ops(hlo_text: str) -> dict[str, set[str]]:
  """Instruction name -> the HLO opcodes it computes, through the computations it calls."""
  bodies = collections.defaultdict(set)  # computation -> opcodes in it
  nested = collections.defaultdict(set)  # computation -> computations its instructions call
  own, calls = {}, {}  # instruction -> its opcode, the computations it calls
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and '=' not in line.split('(')[0]:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match or computation is None:
      continue
    name, opcode = match.groups()
    called = set(_CALLS.findall(line))
    bodies[computation].add(opcode)
    nested[computation] |= called
    own[name], calls[name] = opcode, called

  def computation_ops(comp: str, seen: set[str]) -> set[str]:
    seen.add(comp)
    ops = set(bodies.get(comp, ()))
    for inner in nested.get(comp, ()) - seen:
      ops |= computation_ops(inner, seen)
    return ops

  wrappers = {'fusion', 'custom-call', 'call', 'parameter', 'constant', 'bitcast', 'tuple',
              'get-tuple-element'}
  result = {}
  for name, opcode in own.items():
    ops = {opcode}
    for comp in calls[name]:
      ops |= computation_ops(comp, set())
    result[name] = ops - wrappers
  return result


def kind_of(ops: set[str]) -> str:
  for kind, markers in KINDS:
    if ops & markers:
      return kind
  return 'fused loop (elementwise, reduce)' if ops else 'runtime (dispatch, waits)'


def operation_times(trace: dict) -> dict[str, float]:
  """Seconds per operation name, summed over the trace's complete events and threads."""
  totals = collections.defaultdict(float)
  for event in trace.get('traceEvents', []):
    name = event.get('name', '')
    if event.get('ph') != 'X' or not name or _CONTAINERS.match(name):
      continue
    totals[name] += float(event.get('dur', 0.0)) * 1e-6
  return dict(totals)


def read_perfetto_trace(trace_dir: str) -> dict:
  paths = sorted(glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                           recursive=True))
  if not paths:
    raise SystemExit(f'no perfetto_trace.json.gz under {trace_dir}: the profiler wrote none.')
  with gzip.open(paths[-1], 'rt') as f:
    return json.load(f)


def tables(times: dict[str, float], ops: dict[str, set[str]], steps: int, top: int) -> str:
  """Markdown: thread time by kind, then the `top` operations (kinds from `hlo_ops`)."""
  total = sum(times.values()) or 1.0
  kind = lambda name: kind_of(ops.get(name, set()))
  by_kind = collections.defaultdict(float)
  for name, seconds in times.items():
    by_kind[kind(name)] += seconds
  lines = ['| kind | thread-ms per step | share |', '| --- | ---: | ---: |']
  for name, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    lines.append(f'| {name} | {1e3 * seconds / steps:.1f} | {100 * seconds / total:.1f}% |')
  lines += ['', '| operation | kind | thread-ms per step | share |', '| --- | --- | ---: | ---: |']
  for name, seconds in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f'| {name} | {kind(name)} | {1e3 * seconds / steps:.1f} | '
                 f'{100 * seconds / total:.1f}% |')
  return '\n'.join(lines)


def main(argv):
  del argv
  config = FLAGS.config.copy_and_resolve_references()
  mesh = parallel.create_mesh()
  b = config.training.batch_size
  shape = (b,) + tuple(input_pipeline.example_shape(config))
  images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  bench = jax_side.JaxBench(config, mesh, images, samplers=False)
  for _ in range(2):
    bench.step()
  trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix='profile_step_')
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(FLAGS.steps):
      bench.step()
  cpu = cpu_env.read_cpu()
  print(f'CPU: {cpu.describe()}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; '
        f'jax {jax.__version__}; batch {b}; {FLAGS.steps} steps; trace in {trace_dir}')
  ops = hlo_ops(bench.train_step.as_text())
  print(tables(operation_times(read_perfetto_trace(trace_dir)), ops, FLAGS.steps, FLAGS.top))


if __name__ == '__main__':
  app.run(main)
