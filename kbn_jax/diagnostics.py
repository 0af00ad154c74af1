"""Finding NaN and Inf in batch-normalization variables.

A NaN or Inf in a training batch is not an error for `BatchNormalization` (Keras raises none
either): it propagates into the output and into the moving statistics of every channel whose
batch moments it touches; other channels are unaffected. Once a moving statistic is non-finite,
every later inference output of that channel is NaN. These helpers make that visible:

* `nonfinite_statistics` marks, per variable and per channel, what is not finite (jit-able);
* `has_nonfinite` is one boolean for a whole tree, e.g. to skip a bad step with ``jnp.where``
  or ``lax.cond`` (jit-able);
* `keep_finite` keeps the previous value of each non-finite entry (jit-able);
* `assert_finite` raises a `FloatingPointError` naming each non-finite variable and channel
  (host-side, outside ``jit``).

Example::

  >>> import jax, jax.numpy as jnp, kbn_jax
  >>> from kbn_jax import diagnostics
  >>> layer = kbn_jax.BatchNormalization()
  >>> x = jnp.array([[1.0, 2.0], [jnp.nan, 4.0]])
  >>> variables = layer.init(jax.random.key(0), x)
  >>> _, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  >>> bool(diagnostics.has_nonfinite(updates))
  True
  >>> diagnostics.nonfinite_statistics(updates)["batch_stats"]["moving_mean"]
  Array([ True, False], dtype=bool)
  >>> safe = diagnostics.keep_finite(updates, {"batch_stats": variables["batch_stats"]})
  >>> bool(diagnostics.has_nonfinite(safe))
  False
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["assert_finite", "has_nonfinite", "keep_finite", "nonfinite_statistics"]


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def nonfinite_statistics(variables: Any) -> Any:
  """Marks the non-finite entries of every floating-point array in `variables`.

  Args:
    variables: any pytree of arrays, e.g. the ``variables`` dict of a Flax module or the
      ``updates`` returned by ``apply(..., mutable=["batch_stats"])``.

  Returns:
    A pytree of the same structure with boolean arrays, True where the value is NaN or +-Inf
    (all False for non-floating leaves). Jit-able.
  """

  def mark(leaf: Any) -> jax.Array:
    leaf = jnp.asarray(leaf)
    if not _is_float(leaf):
      return jnp.zeros(leaf.shape, bool)
    return ~jnp.isfinite(leaf)

  return jax.tree.map(mark, variables)


def has_nonfinite(variables: Any) -> jax.Array:
  """True iff any floating-point entry of `variables` is NaN or +-Inf (a scalar bool, jit-able).

  Args:
    variables: any pytree of arrays.

  Returns:
    A boolean scalar array.
  """
  leaves = jax.tree.leaves(nonfinite_statistics(variables))
  return jnp.any(jnp.stack([jnp.any(leaf) for leaf in leaves])) if leaves else jnp.array(False)


def keep_finite(updated: Any, previous: Any) -> Any:
  """Takes `updated` but keeps `previous` wherever `updated` is not finite, entry by entry.

  A guard for the moving statistics: a batch with a NaN or Inf in one channel then leaves that
  channel's statistics as they were instead of poisoning every later inference. The two trees
  must have the same structure and shapes. Jit-able.

  Args:
    updated: the new values, e.g. the ``updates`` of a training step.
    previous: the values before the step, same structure.

  Returns:
    A tree of the same structure as `updated`.
  """

  def choose(new: Any, old: Any) -> jax.Array:
    value = jnp.asarray(new)
    if not _is_float(value):
      return value
    return jnp.where(jnp.isfinite(value), value, jnp.asarray(old).astype(value.dtype))

  return jax.tree.map(choose, updated, previous)


def assert_finite(variables: Any) -> None:
  """Raises if any floating-point entry of `variables` is NaN or +-Inf (host-side check).

  Call it outside ``jax.jit`` (it reads the values); under ``jit`` use `has_nonfinite` or
  `jax.experimental.checkify` instead.

  Args:
    variables: any pytree of arrays.

  Raises:
    FloatingPointError: naming every non-finite array by its path, with the indices of the
      non-finite entries (the channels, for feature-shaped statistics).
  """
  problems = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    value = np.asarray(leaf)
    if not np.issubdtype(value.dtype, np.inexact):
      continue
    bad = np.argwhere(~np.isfinite(value))
    if bad.size:
      where = [tuple(int(i) for i in index) for index in bad[:8]]
      more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
      problems.append(f"{jax.tree_util.keystr(path)} at {where}{more}")
  if problems:
    raise FloatingPointError(
      "Non-finite values (NaN or Inf) in " + "; ".join(problems) + ". A NaN or Inf in a "
      "training batch propagates into the moving statistics of the channels it touches; find "
      "the bad input, or guard the update with `kbn_jax.diagnostics.keep_finite`."
    )
