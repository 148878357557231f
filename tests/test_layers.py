"""The layer rule: no module imports a layer above its own, and no import cycle.

mcl_jax's subpackages are layers (mcl_jax/__init__.py, README "Layout"):
errors, then the leaves any layer may use (paths, cli, config_validation and
the modules they were split into), then nn, data, pretext, eval, training,
then the command modules, and last what only runs the package (main.py,
benchmarks/, scripts/, configs/, tests/). This test reads every module's
imports as text (top-level and inside functions alike, so a lazy import is
held to the same rule) and fails on an import of a higher layer or on a
cycle between modules.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCANNED = ('mcl_jax', 'benchmarks', 'scripts', 'configs', 'tests')

# Layer of each module, by name prefix (the longest matching prefix counts).
_LAYERS = {
    'mcl_jax.errors': 0,
    'mcl_jax': 1,  # the package itself and its leaves: paths, cli, config_validation, ...
    'mcl_jax.nn': 2,
    'mcl_jax.data': 3,
    'mcl_jax.pretext': 4,
    'mcl_jax.eval': 5,
    'mcl_jax.training': 6,
    'mcl_jax.detection': 7,  # fine-tuning and detection evaluation: uses eval and training
    'mcl_jax.testing': 7,
    'mcl_jax.evaluate': 7,
    'mcl_jax.dense_eval': 7,
    'mcl_jax.export': 7,
    'mcl_jax.visualize': 7,
    'mcl_jax.finetune': 7,  # the detection command
    'main': 8,
    'benchmarks': 8,
    'scripts': 8,
    'configs': 8,
    'tests': 9,
}


def layer_of(module: str) -> int:
  """The layer of a dotted module name (its longest prefix in `_LAYERS`).

  A subpackage of mcl_jax must be named itself: it does not fall back to the
  leaves' layer of the bare package.
  """
  parts = module.split('.')
  if len(parts) > 2 and parts[0] == 'mcl_jax' and '.'.join(parts[:2]) not in _LAYERS:
    raise KeyError(f'{module}: no layer for its subpackage; add it to _LAYERS')
  for n in range(len(parts), 0, -1):
    prefix = '.'.join(parts[:n])
    if prefix in _LAYERS:
      return _LAYERS[prefix]
  raise KeyError(f'{module}: no layer; add its package to _LAYERS')


def project_modules(root: str = ROOT) -> dict[str, str]:
  """{dotted module name: file} of every .py file of the project."""
  modules = {'main': os.path.join(root, 'main.py')}
  for top in _SCANNED:
    for folder, dirs, files in os.walk(os.path.join(root, top)):
      dirs[:] = sorted(d for d in dirs if not d.startswith(('.', '__pycache__')))
      for f in sorted(files):
        if f.endswith('.py'):
          rel = os.path.relpath(os.path.join(folder, f), root)[:-3].split(os.sep)
          if rel[-1] == '__init__':
            rel = rel[:-1]
          modules['.'.join(rel)] = os.path.join(folder, f)
  return modules


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
  """The project modules that `module` (in `path`) imports, anywhere in the file."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: resolved against the importing package
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      names = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base
               for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in known:  # `import a.b.c` of a function or class: its module
        name = name.rpartition('.')[0]
      if name and name != module:
        found.add(name)
  return found


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
  modules = project_modules(root)
  known = set(modules)
  return {m: imports_of(m, p, known) for m, p in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  """'a -> b' for every import of a higher layer."""
  return sorted(f'{m} (layer {layer_of(m)}) -> {d} (layer {layer_of(d)})'
                for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_every_module_has_a_layer_and_imports_something_known():
  graph = import_graph()
  assert 'mcl_jax.nn.model' in graph and 'benchmarks.train_step' in graph
  assert 'mcl_jax.nn.montage_layout' in graph['mcl_jax.nn.model']
  for m in graph:
    layer_of(m)  # raises for a module outside every layer


def test_no_module_imports_a_higher_layer():
  bad = upward_imports(import_graph())
  assert not bad, 'upward imports (a layer may import only the layers below it):\n' + '\n'.join(bad)


def test_no_import_cycles():
  found = cycles(import_graph())
  assert not found, 'import cycles:\n' + '\n'.join(' <-> '.join(c) for c in found)


@pytest.mark.parametrize('source, upward', [
    ('from mcl_jax.pretext.montage import Layout\n', True),
    ('def f():\n  from mcl_jax.training import loop\n', True),
    ('from mcl_jax import paths, errors\n', False),
])
def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path, source, upward):
  """A fake tree: nn importing pretext (even lazily) is caught; leaves are not."""
  for rel, text in {'main.py': '', 'mcl_jax/__init__.py': '', 'mcl_jax/errors.py': '',
                    'mcl_jax/paths.py': '', 'mcl_jax/nn/__init__.py': '',
                    'mcl_jax/nn/model.py': source,
                    'mcl_jax/pretext/__init__.py': '',
                    'mcl_jax/pretext/montage.py': 'from mcl_jax.nn import model\n',
                    'mcl_jax/training/__init__.py': '',
                    'mcl_jax/training/loop.py': ''}.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text)
  graph = import_graph(str(tmp_path))
  assert bool(upward_imports(graph)) == upward
  assert bool(cycles(graph)) == (source.startswith('from mcl_jax.pretext'))
