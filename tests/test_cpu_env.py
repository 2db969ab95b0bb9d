"""diffusion_jax.cpu_env: the CPU read from /proc/cpuinfo text, and the settings chosen for it."""

from diffusion_jax import cpu_env

# The first processor block of /proc/cpuinfo on the three kinds of machine the project has met
# (flags shortened to those that matter, plus a few neighbours).
INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: SomethingElse
"""
AMD_ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni
"""
AMD_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse4_2 avx avx2 fma
"""


def test_the_cpu_is_read_from_its_first_block():
  intel = cpu_env.read_cpu(INTEL_AMX)
  assert (intel.vendor, intel.family, intel.model) == ('GenuineIntel', 6, 143)
  assert intel.name.startswith('Intel(R) Xeon(R) Platinum 8481C')
  assert (intel.isa, intel.kind, intel.has_bf16) == ('amx', 'intel-amx', True)
  zen4 = cpu_env.read_cpu(AMD_ZEN4)
  assert (zen4.isa, zen4.kind, zen4.has_bf16) == ('avx512_bf16', 'amd-avx512_bf16', True)
  assert zen4.describe().startswith('AMD EPYC (AuthenticAMD family 25 model 17), AVX-512 with BF16')
  avx2 = cpu_env.read_cpu(AMD_AVX2)
  assert (avx2.isa, avx2.kind, avx2.has_bf16) == ('avx2', 'amd-avx2', False)


def test_unknown_or_missing_fields_do_not_fail():
  cpu = cpu_env.read_cpu('')
  assert cpu.isa == 'baseline' and cpu.family is None and cpu.count >= 1
  assert 'CPUs' in cpu.describe()
  assert cpu_env.read_cpu().count >= 1  # this machine's


YNN_CONVOLUTIONS_OFF = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


def test_settings_follow_the_cpu_and_keep_what_the_user_set():
  # As measured (docs/performance.md): YNNPACK convolutions off on AVX2 only; malloc on all.
  expected_flags = {INTEL_AMX: (), AMD_ZEN4: (), AMD_AVX2: (YNN_CONVOLUTIONS_OFF,)}
  for text, expected in expected_flags.items():
    cpu = cpu_env.read_cpu(text)
    malloc, flags = cpu_env.cpu_settings(cpu)
    assert flags == expected, cpu.kind
    assert malloc == cpu_env.MALLOC_SETTINGS  # (these tests run on Linux)
    env = cpu_env.cpu_environment({'MALLOC_ARENA_MAX': '4', 'XLA_FLAGS': '--xla_foo=1'}, cpu)
    assert env['MALLOC_ARENA_MAX'] == '4'  # the user's value wins
    assert env['DIFFUSION_JAX_CPU_ENV'] == '1'
    assert env['XLA_FLAGS'].split() == ['--xla_foo=1', *flags]
    for key in set(malloc) - {'MALLOC_ARENA_MAX'}:
      assert env[key] == cpu_env.MALLOC_SETTINGS[key]
  # A flag the user already gave, with another value, is not overridden.
  user = YNN_CONVOLUTIONS_OFF.replace('=-', '=')  # the user's own value for that flag
  env = cpu_env.cpu_environment({'XLA_FLAGS': user}, cpu_env.read_cpu(AMD_AVX2))
  assert env['XLA_FLAGS'] == user
