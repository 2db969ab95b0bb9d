"""Process settings that make XLA:CPU train faster, chosen from the CPU and applied by re-exec.

The processor is read from /proc/cpuinfo (`read_cpu`): vendor, family/model and the vector and
matrix extensions it offers (AVX2, AVX-512, AVX-512 BF16, AMX). `cpu_settings` then picks:

- malloc, on every x86-64 CPU: glibc's default malloc returns XLA's large temporary buffers to
  the kernel after every step, so each bench train step maps and unmaps ~1.6 GB and spends
  about a second in page faults (measured on AMD EPYC with AVX2 and with AVX-512); one arena, no
  mmap and no trimming keep that memory in the process.
- XLA's YNNPACK fusion of single convolutions, per CPU: by default jax 0.10 sends every
  convolution to YNNPACK. On the AVX2 EPYC its weight-gradient kernels were slower than XLA's
  own convolutions and it is switched off (`-individual_convolution`). On CPUs with AVX-512 it
  is kept: on the Zen 4 EPYC, switching it off cost 12-15% of the train step (Intel's AMX
  Xeons have not been measured with it on; see docs/performance.md).

glibc reads its settings only when the process starts, hence the re-exec. Nothing changes where
JAX will run on a GPU or TPU. This module imports nothing heavy: call
`reexec_with_cpu_settings()` first thing in a script.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import sys

MALLOC_SETTINGS = {
    'MALLOC_ARENA_MAX': '1',
    'MALLOC_MMAP_MAX_': '0',
    'MALLOC_TRIM_THRESHOLD_': '100000000000',
}
# XLA:CPU flags by `Cpu.isa`, each measured with experiments/benchmark.py on that kind of CPU.
XLA_CPU_FLAGS = {
    'avx2': ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',),
}
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm7_plugin', 'libtpu')
_DONE = 'DIFFUSION_JAX_CPU_ENV'  # set in the re-executed process, so it happens once
_VENDORS = {'GenuineIntel': 'Intel', 'AuthenticAMD': 'AMD'}
_ISA_NAMES = {'amx': 'AMX (bf16)', 'avx512_bf16': 'AVX-512 with BF16', 'avx512': 'AVX-512',
              'avx2': 'AVX2', 'baseline': 'no AVX2'}


@dataclasses.dataclass(frozen=True)
class Cpu:
  """What the processor is and offers, as /proc/cpuinfo states it for its first CPU."""
  vendor: str  # 'GenuineIntel', 'AuthenticAMD', or the machine type off x86 Linux
  name: str  # 'model name', as virtual machines report it (often shortened)
  family: int | None
  model: int | None
  flags: frozenset[str]
  count: int  # CPUs this process may run on

  @property
  def isa(self) -> str:
    """The widest extension for deep learning: amx, avx512_bf16, avx512, avx2 or baseline."""
    for isa, flag in (('amx', 'amx_bf16'), ('avx512_bf16', 'avx512_bf16'),
                      ('avx512', 'avx512f'), ('avx2', 'avx2')):
      if flag in self.flags:
        return isa
    return 'baseline'

  @property
  def has_bf16(self) -> bool:
    """Whether bfloat16 arithmetic is native (AMX or AVX-512 BF16), not emulated in float32."""
    return self.isa in ('amx', 'avx512_bf16')

  @property
  def kind(self) -> str:
    """Vendor and ISA, e.g. 'intel-amx', 'amd-avx2': the unit the tuning is measured per."""
    return f'{_VENDORS.get(self.vendor, self.vendor).lower()}-{self.isa}'

  def describe(self) -> str:
    """E.g. 'AMD EPYC (AuthenticAMD family 25 model 17), AVX-512 with BF16, 2 CPUs'."""
    ident = ' '.join(part for part in (
        self.vendor, '' if self.family is None else f'family {self.family}',
        '' if self.model is None else f'model {self.model}') if part)
    return f'{self.name} ({ident}), {_ISA_NAMES[self.isa]}, {self.count} CPUs'


def read_cpu(cpuinfo: str | None = None) -> Cpu:
  """The CPU described by `cpuinfo` (the text of /proc/cpuinfo; read from there by default)."""
  if cpuinfo is None:
    try:
      with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ''
  fields = {}
  for line in cpuinfo.splitlines():
    if not line.strip():
      if fields:
        break  # the first processor's block is enough
      continue
    key, _, value = line.partition(':')
    fields.setdefault(key.strip(), value.strip())
  number = lambda key: int(fields[key]) if fields.get(key, '').isdigit() else None
  count = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return Cpu(vendor=fields.get('vendor_id', platform.machine()),
             name=fields.get('model name', platform.processor() or 'unknown CPU'),
             family=number('cpu family'), model=number('model'),
             flags=frozenset(fields.get('flags', '').split()), count=count or 1)


def cpu_settings(cpu: Cpu) -> tuple[dict[str, str], tuple[str, ...]]:
  """(malloc environment variables, XLA flags) chosen for `cpu` (see the module docstring)."""
  malloc = dict(MALLOC_SETTINGS) if platform.system() == 'Linux' else {}
  return malloc, XLA_CPU_FLAGS.get(cpu.isa, ())


def runs_on_cpu() -> bool:
  """Whether JAX will pick the CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def cpu_environment(env: dict, cpu: Cpu | None = None) -> dict:
  """`env` plus the settings `cpu_settings` picks for `cpu` (values already there are kept)."""
  malloc, xla_flags = cpu_settings(read_cpu() if cpu is None else cpu)
  out = dict(env)
  for key, value in malloc.items():
    out.setdefault(key, value)
  flags = out.get('XLA_FLAGS', '')
  for flag in xla_flags:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  if flags:
    out['XLA_FLAGS'] = flags
  out[_DONE] = '1'
  return out


def reexec_with_cpu_settings() -> None:
  """Restarts this Python process with `cpu_environment` on CPU; returns at once otherwise.

  Must run before JAX is imported (XLA reads its flags once) and before any work is done.
  Set DIFFUSION_JAX_CPU_ENV=0 to opt out.
  """
  if os.environ.get(_DONE) is not None or not runs_on_cpu():
    return
  if 'jax' in sys.modules:
    raise RuntimeError('reexec_with_cpu_settings() must run before jax is imported.')
  sys.stdout.flush()
  sys.stderr.flush()
  argv = list(getattr(sys, 'orig_argv', [sys.executable] + sys.argv))
  os.execve(sys.executable, [sys.executable] + argv[1:], cpu_environment(dict(os.environ)))
