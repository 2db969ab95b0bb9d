"""Entry point: train, sample, evaluate or summarise a model described by a config file.

  python launch.py --config=configs/digits.py --workdir=/tmp/digits
  python launch.py --config=configs/flowers.py --workdir=/tmp/flowers \
      --config.training.batch_size=64
  python launch.py --config=configs/digits.py --workdir=/tmp/digits --mode=sample
  python launch.py --config=configs/cifar10.py --mode=summary
"""

from diffusion_jax import cpu_env

if __name__ == '__main__':
  cpu_env.reexec_with_cpu_settings()  # on CPU: malloc settings and XLA flags, before JAX loads

# pylint: disable=g-import-not-at-top,wrong-import-position
import os
import sys
import threading

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
# pylint: enable=g-import-not-at-top,wrong-import-position

config_flags.DEFINE_config_file('config', None, 'Config file (get_config()); every field can be '
                                'overridden, e.g. --config.training.batch_size=64.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and samples go.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'summary'], 'What to do.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for multi-process runs started by hand.')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).')
flags.DEFINE_bool('distributed', False, 'Initialise jax.distributed from the environment '
                  '(TPU pods, Slurm, Open MPI) without explicit addresses.')
flags.DEFINE_bool('traceback', False, 'On a failure, show the whole traceback instead of the '
                  'one line that names what failed.')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def enable_compilation_cache() -> None:
  """Keeps compiled programs on disk, so a resumed run, sampling or a sweep trial of the same
  model starts without recompiling (JAX_COMPILATION_CACHE_DIR overrides the location)."""
  path = os.environ.get('JAX_COMPILATION_CACHE_DIR',
                        os.path.join(os.path.expanduser('~'), '.cache', 'diffusion_jax', 'xla'))
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def initialize_distributed() -> None:
  """jax.distributed for multi-process runs; CPU processes talk through gloo."""
  if FLAGS.coordinator_address or FLAGS.distributed:
    if jax.config.jax_platforms in (None, '', 'cpu'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info('process %d/%d, %d local and %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of Orbax and TensorStore (every save logs dozens of lines).

  Without --traceback, the errors that Orbax's writer threads report are not shown, and those of
  their asyncio tasks and of other background threads (one per pending write when a disk fills
  up) become one line each, shown once: the failure they cause is named in one line by the code
  that waits for the write (`checkpointing.save`, `wait_until_finished`).
  """

  def __init__(self):
    super().__init__()
    self.seen = set()

  def first_time(self, line: str) -> bool:
    if FLAGS.traceback or line not in self.seen:
      self.seen.add(line)
      return True
    return False

  def filter(self, record):
    library = '/orbax/' in record.pathname or record.name == 'asyncio'
    if not library:
      return True
    if record.levelno < logging.logging.WARNING:
      return record.name == 'asyncio'  # asyncio's debug notes only reach the log when asked
    if FLAGS.traceback:
      return True
    if '/orbax/' in record.pathname:  # its errors reach the code that waits, which names them
      return record.levelno < logging.logging.ERROR
    line = record.getMessage().split('\n')[0]
    record.msg, record.args = line, ()
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return self.first_time(line[:120])

  def install_thread_hooks(self) -> None:
    """Exceptions a thread cannot deliver (sys.unraisablehook, threading.excepthook): one line
    each, once, unless --traceback."""
    if FLAGS.traceback:
      return

    def report(exc_type, exc_value):
      text = str(exc_value).strip()
      line = f'{exc_type.__name__}: {text.splitlines()[0] if text else ""}'
      if self.first_time(line):
        logging.warning('In a background thread: %s (repeats are not shown; --traceback shows '
                        'every one with its traceback).', line)

    sys.unraisablehook = lambda u: report(u.exc_type, u.exc_value)
    threading.excepthook = lambda a: report(a.exc_type, a.exc_value)


# Failures that name their cause and fix in their message (bad settings, data, files, storage,
# a diverged run): shown as that one line, without the traceback of where it was noticed.
_NAMED_FAILURES = (ValueError, OSError, RuntimeError, FloatingPointError)


def parse_flags(argv):
  """absl's flag parsing, then the config file with its --config.* overrides applied, so that a
  mistake in either ends here in one line naming the flag or the file and the fix."""
  from diffusion_jax import config_checks  # pylint: disable=g-import-not-at-top
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # the file is loaded and the overrides applied by now, or this raises
    return rest
  except Exception as e:  # pylint: disable=broad-except  (anything the file itself may raise)
    if '--traceback' in argv:
      raise
    print(f'launch.py: {config_checks.explain_start_error(e, argv)}', file=sys.stderr,
          flush=True)
    sys.exit(2)


def main(argv):
  from diffusion_jax import stop_signals  # pylint: disable=g-import-not-at-top
  try:
    run(argv)
  except stop_signals.Interrupted as e:
    logging.flush()
    print(f'launch.py --mode={FLAGS.mode}: {e}; nothing was written, and the files already in '
          f'{FLAGS.workdir} are as they were.', file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: the interpreter's shutdown would wait for the device computation still in
    # flight (minutes for a long sampling batch). Nothing is pending that needs a clean exit.
    os._exit(128 + e.signum)  # pylint: disable=protected-access
  except _NAMED_FAILURES as e:
    if FLAGS.traceback:
      raise
    logging.flush()
    print(f'launch.py --mode={FLAGS.mode}: {type(e).__name__}: {e}', file=sys.stderr,
          flush=True)
    sys.exit(1)


def settings_given() -> dict:
  """The command line's --config.* overrides that change the config file's own value
  ({'group.field': value}): what `config_checks.check_command_line` holds to the run."""
  from diffusion_jax import run_config  # pylint: disable=g-import-not-at-top
  return run_config.changed_overrides(config_flags.get_config_filename(FLAGS['config']),
                                      config_flags.get_override_values(FLAGS['config']))


def run(argv):
  del argv
  quiet = _QuietLibraries()
  logging.get_absl_handler().addFilter(quiet)
  quiet.install_thread_hooks()
  enable_compilation_cache()
  config = FLAGS.config
  # Each mode's module is imported only when it runs, so that --help and flag errors are instant.
  # pylint: disable=g-import-not-at-top
  from diffusion_jax import config_checks, run_config
  given, defaults = settings_given(), run_config.default_config()
  if FLAGS.mode == 'summary':
    from diffusion_jax import summary
    config_checks.check_command_line(config, FLAGS.mode, given, defaults)
    summary.summarize(config)
    return
  if not FLAGS.workdir:
    raise ValueError(f'--mode={FLAGS.mode} needs --workdir=<a directory> (where checkpoints, '
                     'metrics and samples go).')
  initialize_distributed()
  if FLAGS.mode == 'train':
    from diffusion_jax import train
    config_checks.check_command_line(config, FLAGS.mode, given, defaults)
    train.train_and_evaluate(config, FLAGS.workdir)
    return
  # Sampling and evaluation build the network the run was trained with (its config.json); the
  # command line may change their own settings, not what the network is.
  config = run_config.for_sampling(config, FLAGS.workdir,
                                   config_flags.get_override_values(FLAGS['config']))
  config_checks.check_command_line(config, FLAGS.mode, given, defaults)
  if FLAGS.mode == 'sample':
    from diffusion_jax import sampling
    sampling.sample(config, FLAGS.workdir)
  else:
    from diffusion_jax import evaluation
    evaluation.evaluate(config, FLAGS.workdir)
  # pylint: enable=g-import-not-at-top


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
