"""The tests' shared assertion: two pytrees agree leaf by leaf, relative to the expected scale."""

import jax
import numpy as np


def assert_trees_close(actual, expected, tolerance, what=""):
  """``max |actual - expected| <= tolerance * max(1, max |expected|)``, leaf by leaf.

  Args:
    actual, expected: pytrees of arrays with the same structure and shapes.
    tolerance: the allowed difference relative to the expected leaf's scale.
    what: a label for the failure message.
  """
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  for (path, e), a in zip(
    jax.tree.leaves_with_path(expected), jax.tree.leaves(actual), strict=True
  ):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    name = what + jax.tree_util.keystr(path)
    assert a.shape == e.shape, (name, a.shape, e.shape)
    error = float(np.max(np.abs(a - e), initial=0.0))
    scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
    assert error <= tolerance * scale, (
      f"{name}: max difference {error:.3g} (scale {scale:.3g}, tolerance {tolerance:g})"
    )
