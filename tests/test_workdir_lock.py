"""One training run per workdir: the lock, its holder's record, and its release."""

import json
import os

import pytest

from diffusion_jax import workdir_lock


def test_a_second_holder_is_refused_by_name_and_the_lock_frees_on_exit(tmp_path):
  workdir = str(tmp_path)
  with workdir_lock.hold(workdir):
    with open(workdir_lock.lock_path(workdir)) as f:
      record = json.load(f)
    assert record['pid'] == os.getpid() and record['host'] and record['since']
    # flock belongs to the open file: a second open in this same process is another holder.
    with pytest.raises(workdir_lock.WorkdirBusy,
                       match=rf'--workdir={workdir} is being trained by another run: pid '
                       rf'{os.getpid()} on .*, since .*train.lock'):
      with workdir_lock.hold(workdir):
        pass
  with open(workdir_lock.lock_path(workdir)) as f:
    assert f.read() == ''  # released: no holder named
  with workdir_lock.hold(workdir):  # and free again
    pass


def test_cloud_paths_are_not_locked_but_said_so(caplog):
  with caplog.at_level('WARNING'):
    with workdir_lock.hold('gs://bucket/run'):
      pass
  assert 'not locked' in caplog.text
