"""The public surface is exactly what `kbn_jax.__all__` lists; the functional core has no Flax."""

import ast
import pathlib

import kbn_jax

EXPECTED_API = {
  "BatchNormalization",
  "diagnostics",
  "folding",
  "functional",
  "keras_compat",
  "training",
}


def test_all_is_the_documented_api():
  assert set(kbn_jax.__all__) == EXPECTED_API
  for name in kbn_jax.__all__:
    assert hasattr(kbn_jax, name), name
  assert isinstance(kbn_jax.__version__, str)


def test_functional_core_imports_no_flax():
  source = pathlib.Path(kbn_jax.functional.__file__).read_text()
  imported = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      imported.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      imported.add(node.module.split(".")[0])
  assert "flax" not in imported
  assert imported <= {"__future__", "collections", "math", "jax", "numpy"}
