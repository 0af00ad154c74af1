"""Keras constraint names and configs, resolved onto projections ``w -> w'``.

The projections are Keras's, axis conventions included: they act on the weight in Keras's
parameter shape (``(C,)`` for one feature axis; full rank for several axes or ghost batches),
which is how `BatchNormalization` applies them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp

from kbn_jax import _keras_identifiers

__all__ = [
  "Constraint",
  "get",
  "max_norm",
  "min_max_norm",
  "non_neg",
  "radial_constraint",
  "unit_norm",
]

Constraint = Callable[[jax.Array], jax.Array]
_KERAS_EPSILON = 1e-7  # backend.epsilon()


def _norms(w: jax.Array, axis: int | Sequence[int]) -> jax.Array:
  axis = tuple(axis) if isinstance(axis, (list, tuple)) else axis
  return jnp.sqrt(jnp.sum(jnp.square(w), axis=axis, keepdims=True))


def non_neg() -> Constraint:
  """Keras ``NonNeg``: ``w * (w >= 0)``."""
  return lambda w: w * (w >= 0).astype(w.dtype)


def min_max_norm(
  min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis: Any = 0
) -> Constraint:
  """Keras ``MinMaxNorm``: rescales the norms along `axis` toward ``[min_value, max_value]``."""

  def project(w: jax.Array) -> jax.Array:
    norms = _norms(w, axis)
    desired = rate * jnp.clip(norms, min_value, max_value) + (1 - rate) * norms
    return w * (desired / (_KERAS_EPSILON + norms))

  return project


def max_norm(max_value: float = 2.0, axis: Any = 0) -> Constraint:
  """Keras ``MaxNorm``: caps the norms along `axis` at `max_value`."""

  def project(w: jax.Array) -> jax.Array:
    norms = _norms(w, axis)
    desired = jnp.clip(norms, 0, max_value)
    return w * (desired / (_KERAS_EPSILON + norms))

  return project


def unit_norm(axis: Any = 0) -> Constraint:
  """Keras ``UnitNorm``: divides by the norms along `axis`."""
  return lambda w: w / (_KERAS_EPSILON + _norms(w, axis))


def radial_constraint() -> Constraint:
  """Keras ``RadialConstraint``: defined for 4-D convolution kernels only."""

  def project(w: jax.Array) -> jax.Array:
    raise ValueError(
      f"`radial_constraint` applies to 4-D convolution kernels; got a weight of shape "
      f"{tuple(w.shape)}. Batch-norm weights are not kernels: use another constraint."
    )

  return project


_KERAS_CONSTRAINTS: Mapping[str, tuple[Callable[..., Constraint], dict[str, Any]]] = {
  "non_neg": (non_neg, {}),
  "max_norm": (max_norm, {"max_value": 2.0, "axis": 0}),
  "min_max_norm": (min_max_norm, {"min_value": 0.0, "max_value": 1.0, "rate": 1.0, "axis": 0}),
  "unit_norm": (unit_norm, {"axis": 0}),
  "radial_constraint": (radial_constraint, {}),
}
_ALIASES = {"nonneg": "non_neg", "maxnorm": "max_norm", "unitnorm": "unit_norm"}


def get(identifier: Any, *, argument: str = "constraint") -> Constraint | None:
  """Resolves a Keras constraint identifier.

  Args:
    identifier: ``None``, a Keras name (``"non_neg"``, ``"max_norm"``, ``"min_max_norm"``,
      ``"unit_norm"``, ``"radial_constraint"``), a Keras config dict
      (``{"class_name": "MaxNorm", "config": {"max_value": 3, "axis": 0}}``) or a callable.
    argument: the constructor argument, for error messages.

  Returns:
    A projection, or ``None``.
  """
  if identifier is None or callable(identifier):
    return cast("Constraint | None", identifier)
  name, config = _keras_identifiers.parse(identifier, argument=argument)
  name = _ALIASES.get(name, name)
  if name not in _KERAS_CONSTRAINTS:
    raise _keras_identifiers.unknown(argument, identifier, _KERAS_CONSTRAINTS)
  factory, defaults = _KERAS_CONSTRAINTS[name]
  return factory(**_keras_identifiers.pick(config, argument, defaults))
