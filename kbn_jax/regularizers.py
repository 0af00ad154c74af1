"""Keras regularizer names and configs, resolved onto penalty functions ``w -> scalar``.

Penalties equal Keras's exactly: ``L1`` is ``l1 * sum(|w|)`` and ``L2`` is ``l2 * sum(w**2)``
(no 1/2), with the coefficient rounded to float32 as Keras stores it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from kbn_jax import _keras_identifiers

__all__ = ["Regularizer", "get", "l1_l2"]

Regularizer = Callable[[jax.Array], jax.Array]


def l1_l2(l1: float = 0.0, l2: float = 0.0) -> Regularizer:
  """The penalty ``l1 * sum(|w|) + l2 * sum(w**2)`` (Keras ``L1L2``).

  Args:
    l1: the L1 coefficient.
    l2: the L2 coefficient.

  Returns:
    A function of the weight returning a float32 scalar.
  """
  l1_f32, l2_f32 = np.float32(l1), np.float32(l2)

  def penalty(w: jax.Array) -> jax.Array:
    w = jnp.asarray(w, jnp.float32)
    total = jnp.zeros((), jnp.float32)
    if l1_f32:
      total = total + l1_f32 * jnp.sum(jnp.abs(w))
    if l2_f32:
      total = total + l2_f32 * jnp.sum(jnp.square(w))
    return total

  return penalty


_KERAS_REGULARIZERS: Mapping[str, tuple[Callable[..., Regularizer], dict[str, Any]]] = {
  "l1": (lambda l1: l1_l2(l1=l1), {"l1": 0.01}),
  "l2": (lambda l2: l1_l2(l2=l2), {"l2": 0.01}),
  "l1l2": (l1_l2, {"l1": 0.0, "l2": 0.0}),
  # The name "l1_l2" is Keras's function `l1_l2(l1=0.01, l2=0.01)`.
  "l1_l2": (l1_l2, {"l1": 0.01, "l2": 0.01}),
}


def get(identifier: Any, *, argument: str = "regularizer") -> Regularizer | None:
  """Resolves a Keras regularizer identifier.

  Args:
    identifier: ``None``, a Keras name (``"l1"``, ``"l2"``, ``"l1_l2"``), a Keras config dict
      (``{"class_name": "L2", "config": {"l2": 1e-4}}``) or a callable ``w -> scalar``.
    argument: the constructor argument, for error messages.

  Returns:
    A penalty function, or ``None``.
  """
  if identifier is None or callable(identifier):
    return cast("Regularizer | None", identifier)
  name, config = _keras_identifiers.parse(identifier, argument=argument)
  if isinstance(identifier, Mapping) and name == "l1_l2":
    name = "l1l2"  # A serialized class "L1L2" or "l1_l2" uses the class defaults.
  if name not in _KERAS_REGULARIZERS:
    raise _keras_identifiers.unknown(argument, identifier, _KERAS_REGULARIZERS)
  factory, defaults = _KERAS_REGULARIZERS[name]
  return factory(**_keras_identifiers.pick(config, argument, defaults))
