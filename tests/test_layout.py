"""The rules the house keeps, read from the source with `ast` (imports inside functions count):

- every diffusion_jax module sits on a floor that DESIGN.md names, and imports only modules of
  lower floors (within one package, such as models/ or metrics/, its modules may import each
  other), so nothing climbs back up;
- no import cycle among diffusion_jax and experiments modules;
- no module imports another module's `_private` name, or reads one through a module;
- every module of the library, the configs, the experiments and launch.py is under 400 lines.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'diffusion_jax'
MAX_LINES = 400


def python_files(*folders: str) -> dict[str, str]:
  """{dotted module name: path} of every .py file under the folders (relative to ROOT)."""
  out = {}
  for folder in folders:
    for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in names:
        if name.endswith('.py'):
          path = os.path.join(dirpath, name)
          parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
          if parts[-1] == '__init__':
            parts = parts[:-1]
          out['.'.join(parts)] = path
  return out


MODULES = python_files(PACKAGE, 'experiments')


class Imports(ast.NodeVisitor):
  """The project modules a file imports, and the private names it takes from them."""

  def __init__(self):
    self.modules, self.private, self.aliases = set(), [], {}

  def _add(self, module: str, alias: str | None = None) -> None:
    if module in MODULES:
      self.modules.add(module)
      if alias:
        self.aliases[alias] = module

  def visit_Import(self, node):
    for a in node.names:
      self._add(a.name, a.asname)

  def visit_ImportFrom(self, node):
    if not node.module:
      return
    for a in node.names:
      child = f'{node.module}.{a.name}'
      if child in MODULES:
        self._add(child, a.asname or a.name)
      else:
        self._add(node.module)
        if node.module in MODULES and a.name.startswith('_'):
          self.private.append(f'from {node.module} import {a.name} (line {node.lineno})')

  def visit_Attribute(self, node):
    if (isinstance(node.value, ast.Name) and node.value.id in self.aliases
        and node.attr.startswith('_') and not node.attr.startswith('__')):
      self.private.append(f'{node.value.id}.{node.attr} (line {node.lineno})')
    self.generic_visit(node)


def read_imports(path: str) -> Imports:
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  visitor = Imports()
  visitor.visit(tree)
  return visitor


IMPORTS = {name: read_imports(path) for name, path in MODULES.items()}


def floors_from_design() -> dict[str, int]:
  """{top-level diffusion_jax module or package: floor} from DESIGN.md's `floor N  a  b/` lines."""
  with open(os.path.join(ROOT, 'DESIGN.md')) as f:
    lines = re.findall(r'^floor (\d+)\s+(.+)$', f.read(), re.MULTILINE)
  assert lines, 'DESIGN.md has no "floor N  module ..." lines'
  return {name.rstrip('/'): int(n) for n, names in lines for name in names.split()}


def top_level(module: str) -> str:
  """'diffusion_jax.models.unet' -> 'models'; 'diffusion_jax.task' -> 'task'."""
  return module.split('.')[1]


def test_every_library_module_has_a_floor_in_design_md():
  floors = floors_from_design()
  library = {top_level(m) for m in MODULES if m.startswith(PACKAGE + '.')}
  assert library - set(floors) == set(), 'add these to the floors in DESIGN.md'
  assert set(floors) - library == set(), 'DESIGN.md names modules that do not exist'


def test_imports_only_go_down():
  floors = floors_from_design()
  climbs = []
  for module, found in IMPORTS.items():
    if not module.startswith(PACKAGE + '.'):
      continue
    mine = top_level(module)
    for target in found.modules:
      if target == PACKAGE or not target.startswith(PACKAGE + '.'):
        continue
      theirs = top_level(target)
      if theirs != mine and floors[theirs] >= floors[mine]:
        climbs.append(f'{module} (floor {floors[mine]}) imports {target} '
                      f'(floor {floors[theirs]})')
  assert not climbs, '\n'.join(climbs)


def find_cycle(graph: dict[str, set]) -> list[str] | None:
  """One cycle of the directed graph as [a, b, ..., a], or None."""
  state = {}

  def visit(node, path):
    state[node] = 'open'
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt, path + [nxt])
        if found:
          return found
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [node])
      if found:
        return found
  return None


def test_no_import_cycle():
  graph = {m: {t for t in found.modules if t != m} for m, found in IMPORTS.items()}
  cycle = find_cycle(graph)
  assert cycle is None, ' -> '.join(cycle)


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_no_private_names_across_modules():
  files = dict(MODULES, launch=os.path.join(ROOT, 'launch.py'))
  found = {name: read_imports(path).private for name, path in files.items()}
  bad = [f'{name}: {p}' for name, private in found.items() for p in private]
  assert not bad, '\n'.join(bad)


@pytest.mark.parametrize('folder', [PACKAGE, 'experiments', 'configs'])
def test_modules_are_small(folder):
  files = python_files(folder)
  if folder == PACKAGE:
    files['launch'] = os.path.join(ROOT, 'launch.py')
  sizes = {}
  for name, path in files.items():
    with open(path) as f:
      sizes[name] = sum(1 for _ in f)
  big = {name: n for name, n in sizes.items() if n > MAX_LINES}
  assert not big, f'split these along their concepts (limit {MAX_LINES} lines): {big}'
