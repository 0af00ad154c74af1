"""Keras initializer names and configs, resolved onto JAX initializers.

A resolved initializer has JAX's signature ``init(key, shape, dtype) -> Array``. Keras's fan
rules are reproduced (a 1-D shape ``(C,)`` has ``fan_in = fan_out = C``), so variance-scaling
initializers draw from Keras's distributions; the random streams are JAX's, so the values differ.
`BatchNormalization` calls initializers with Keras's parameter shape (see `layers`), so fans match
Keras for multi-axis layers too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp

from kbn_jax import _keras_identifiers

__all__ = ["Initializer", "get", "keras_fans"]

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]

# Keras's truncated normal keeps draws within 2 stddev; this rescales it to unit variance.
_TRUNCATED_STDDEV = 0.87962566103423978


def _constant(value: float) -> Initializer:
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    del key
    return jnp.full(shape, value, dtype)

  return init


def _random_normal(mean: float, stddev: float) -> Initializer:
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return (mean + stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  return init


def _random_uniform(minval: float, maxval: float | None) -> Initializer:
  maxval = 1.0 if maxval is None else maxval  # TF1 configs write None for the default 1.0

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, minval, maxval).astype(dtype)

  return init


def _truncated_normal(mean: float, stddev: float) -> Initializer:
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    draw = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    return (mean + stddev * draw).astype(dtype)

  return init


def keras_fans(shape: tuple[int, ...]) -> tuple[int, int]:
  """Keras's ``_compute_fans``: ``(fan_in, fan_out)`` of a weight shape."""
  if len(shape) < 1:
    return 1, 1
  if len(shape) == 1:
    return shape[0], shape[0]
  if len(shape) == 2:
    return shape[0], shape[1]
  receptive_field = math.prod(shape[:-2])
  return shape[-2] * receptive_field, shape[-1] * receptive_field


def _variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
  if distribution == "normal":  # Keras reads "normal" as the truncated normal
    distribution = "truncated_normal"
  if mode not in ("fan_in", "fan_out", "fan_avg"):
    raise ValueError(f"VarianceScaling `mode`={mode!r} must be 'fan_in', 'fan_out' or 'fan_avg'.")
  if distribution not in ("truncated_normal", "untruncated_normal", "normal", "uniform"):
    raise ValueError(
      f"VarianceScaling `distribution`={distribution!r} must be 'truncated_normal', "
      "'untruncated_normal' or 'uniform'."
    )

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    fan_in, fan_out = keras_fans(tuple(shape))
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[mode]
    variance = scale / max(1.0, fan)
    if distribution == "uniform":
      limit = math.sqrt(3.0 * variance)
      return _random_uniform(-limit, limit)(key, shape, dtype)
    if distribution == "truncated_normal":
      return _truncated_normal(0.0, math.sqrt(variance) / _TRUNCATED_STDDEV)(key, shape, dtype)
    return _random_normal(0.0, math.sqrt(variance))(key, shape, dtype)

  return init


def _orthogonal(gain: float) -> Initializer:
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    if len(shape) < 2:
      raise ValueError(
        f"The 'orthogonal' initializer needs a weight of rank >= 2; got shape {tuple(shape)}. "
        "Batch-norm weights are 1-D for one feature axis: use another initializer."
      )
    return jax.nn.initializers.orthogonal(gain)(key, shape, dtype)

  return init


def _identity(gain: float) -> Initializer:
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    del key
    if len(shape) != 2:
      raise ValueError(
        f"The 'identity' initializer needs a 2-D weight; got shape {tuple(shape)}. "
        "Use 'ones' for batch-norm weights."
      )
    return gain * jnp.eye(shape[0], shape[1], dtype=dtype)

  return init


def _scaling(scale: float, mode: str, distribution: str) -> Callable[[], Initializer]:
  return lambda: _variance_scaling(scale, mode, distribution)


# name -> (factory, defaults of its config)
_KERAS_INITIALIZERS: Mapping[str, tuple[Callable[..., Initializer], dict[str, Any]]] = {
  "zeros": (lambda: _constant(0.0), {}),
  "ones": (lambda: _constant(1.0), {}),
  "constant": (_constant, {"value": 0.0}),
  "random_normal": (_random_normal, {"mean": 0.0, "stddev": 0.05}),
  "random_uniform": (_random_uniform, {"minval": -0.05, "maxval": 0.05}),
  "truncated_normal": (_truncated_normal, {"mean": 0.0, "stddev": 0.05}),
  "variance_scaling": (
    _variance_scaling,
    {"scale": 1.0, "mode": "fan_in", "distribution": "truncated_normal"},
  ),
  "glorot_uniform": (_scaling(1.0, "fan_avg", "uniform"), {}),
  "glorot_normal": (_scaling(1.0, "fan_avg", "truncated_normal"), {}),
  "he_normal": (_scaling(2.0, "fan_in", "truncated_normal"), {}),
  "he_uniform": (_scaling(2.0, "fan_in", "uniform"), {}),
  "lecun_normal": (_scaling(1.0, "fan_in", "truncated_normal"), {}),
  "lecun_uniform": (_scaling(1.0, "fan_in", "uniform"), {}),
  "orthogonal": (_orthogonal, {"gain": 1.0}),
  "identity": (_identity, {"gain": 1.0}),
}
_ALIASES = {
  "zero": "zeros",
  "one": "ones",
  "normal": "random_normal",
  "uniform": "random_uniform",
  "xavier_uniform": "glorot_uniform",
  "xavier_normal": "glorot_normal",
}


def get(identifier: Any, *, argument: str = "initializer") -> Initializer:
  """Resolves a Keras initializer identifier or a JAX initializer.

  Args:
    identifier: a Keras name (``"zeros"``, ``"he_normal"``, ...), a Keras config dict
      (``{"class_name": "Constant", "config": {"value": 0.5}}``, with or without Keras 2.13's
      ``module``/``registered_name`` keys), or a callable ``(key, shape, dtype) -> Array``.
    argument: the constructor argument, for error messages.

  Returns:
    A JAX initializer.

  Raises:
    TypeError, ValueError: for identifiers that name no supported initializer.
  """
  if callable(identifier):
    return cast(Initializer, identifier)
  name, config = _keras_identifiers.parse(identifier, argument=argument)
  name = _ALIASES.get(name, name)
  if name not in _KERAS_INITIALIZERS:
    raise _keras_identifiers.unknown(argument, identifier, _KERAS_INITIALIZERS)
  factory, defaults = _KERAS_INITIALIZERS[name]
  return factory(**_keras_identifiers.pick(config, argument, defaults))
