"""The package's layout: every kbn_jax import points down a floor, none hides inside a function.

Floors, bottom to top: array math; Keras identifiers and the objects they name; the model of the
layer (config, then variables); the algorithm and, beside it, the Keras side; the public faces.
A module imports only from its own floor or below, and the import graph has no cycle.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kbn_jax"

FLOORS = {
  0: {"_moments", "_keras_identifiers", "_keras_semantics", "_suspicious", "cpu", "diagnostics"},
  1: {"_normalize", "_moving_averages", "initializers", "regularizers", "constraints"},
  2: {"_config", "_keras_files"},
  3: {"_variables", "_keras_config"},
  4: {"_layer", "_keras_weights"},
  5: {"functional", "linen", "layers", "nnx", "equinox", "haiku", "folding", "flax_compat"},
  6: {"_grafting", "keras_compat", "torch_compat", "training", "__init__"},
}
FLOOR_OF = {name: floor for floor, names in FLOORS.items() for name in names}


def _imports(tree):
  """``(imported kbn_jax module, line, inside a function)`` for every kbn_jax import."""
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      names = []
      if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("kbn_jax"):
        if child.module == "kbn_jax":
          names = [alias.name for alias in child.names]
        else:
          names = [child.module.split(".")[1]]
      elif isinstance(child, ast.Import):
        names = [a.name.split(".")[1] for a in child.names if a.name.startswith("kbn_jax.")]
      found.extend((name, child.lineno, in_function) for name in names)
      visit(child, nested)

  visit(tree, False)
  return found


MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))
GRAPH = {
  name: _imports(ast.parse((PACKAGE / f"{name}.py").read_text(), filename=name)) for name in MODULES
}


def test_every_module_has_a_floor():
  unplaced = sorted(set(MODULES) - set(FLOOR_OF))
  assert not unplaced, f"place {unplaced} on a floor of tests/test_layout.py"


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down_and_sit_at_the_top(module):
  for imported, line, in_function in GRAPH[module]:
    assert not in_function, f"kbn_jax/{module}.py:{line} imports {imported} inside a function"
    assert FLOOR_OF[imported] <= FLOOR_OF[module], (
      f"kbn_jax/{module}.py:{line} (floor {FLOOR_OF[module]}) imports {imported} "
      f"(floor {FLOOR_OF[imported]}), which is above it"
    )


def test_the_import_graph_has_no_cycle():
  done, active = set(), []

  def walk(module):
    if module in active:
      raise AssertionError(" -> ".join(active[active.index(module) :] + [module]))
    if module in done:
      return
    active.append(module)
    for imported, _, _ in GRAPH[module]:
      walk(imported)
    active.pop()
    done.add(module)

  for module in MODULES:
    walk(module)


def test_the_algorithm_never_imports_flax():
  for module in ("_moments", "_normalize", "_moving_averages", "_config", "_variables", "_layer"):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    roots = {
      alias.name.split(".")[0]
      for node in ast.walk(tree)
      if isinstance(node, ast.Import)
      for alias in node.names
    } | {
      (node.module or "").split(".")[0]
      for node in ast.walk(tree)
      if isinstance(node, ast.ImportFrom)
    }
    assert not roots & {"flax", "optax"}, module
