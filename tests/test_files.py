"""Writing outputs without losing what is there: atomic writes, moving aside, JSON lines."""

import os

from diffusion_jax import files


def test_move_aside_numbers_and_tags(tmp_path):
  path = str(tmp_path / 'config.json')
  assert files.move_aside(path) is None
  for expected in ('config.1.json', 'config.2.json'):
    files.write_text(path, 'x')
    assert files.move_aside(path) == str(tmp_path / expected)
  for expected in ('config.unreadable.json', 'config.unreadable.1.json'):
    files.write_text(path, 'x')
    assert files.move_aside(path, tag='unreadable') == str(tmp_path / expected)
  assert not os.path.exists(path)


def test_a_line_cut_short_is_ended_before_the_next_record_and_skipped_on_reading(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  files.append_line(path, '{"step": 1}')
  with open(path, 'a') as f:
    f.write('{"step": 2, "lo')  # a crash mid-write
  files.append_line(path, '{"step": 3}')
  with open(path, 'a') as f:
    f.write('\n[1, 2]\n')  # JSON, but not a record
  records, bad = files.read_jsonl(path)
  assert records == [{'step': 1}, {'step': 3}] and bad == [2, 5]
  assert files.read_jsonl(str(tmp_path / 'none.jsonl')) == ([], [])
