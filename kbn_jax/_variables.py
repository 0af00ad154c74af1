"""What a layer holds: its variables' names, feature axes and shapes, initial values, penalties.

Parameters (``gamma``, ``beta``) and statistics (``moving_mean``, ``moving_variance``, with renorm
``moving_stddev``, ``renorm_mean``, ``renorm_stddev``, with PyTorch semantics
``num_batches_tracked``) are stored in the feature shape: the input's sizes on the feature axes.
Keras stores them in its own parameter shape (`keras_param_shape`), which initializers and
regularizers see, so fan-based initializers and penalties match Keras.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kbn_jax import _moments, initializers, regularizers
from kbn_jax._config import BatchNormConfig


def stat_names(config: BatchNormConfig) -> tuple[str, ...]:
  """The statistics of a layer, in Keras's ``get_weights()`` order (plus PyTorch's counter)."""
  names = ("moving_mean", "moving_variance")
  if config.renorm:
    names += ("moving_stddev", "renorm_mean", "renorm_stddev")
  if config.semantics == "torch":
    names += ("num_batches_tracked",)
  return names


def param_names(config: BatchNormConfig) -> tuple[str, ...]:
  """The learned parameters of a layer, in Keras's ``get_weights()`` order."""
  return (("gamma",) if config.scale else ()) + (("beta",) if config.center else ())


def layout(
  config: BatchNormConfig, rank: int
) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
  """``(feature_axes, param_names, stat_names)`` of a layer on a rank-`rank` input."""
  return feature_axes(config, rank), param_names(config), stat_names(config)


def feature_axes(config: BatchNormConfig, rank: int) -> tuple[int, ...]:
  """The non-negative feature axes of a rank-`rank` input, in increasing order.

  Raises:
    ValueError: for a scalar input, an axis out of range, a repeated axis, or a ghost-batch
      layer whose axis includes the batch axis.
  """
  axes = normalize_axes(config.axis, rank)  # canonical since the config's construction
  if config.virtual_batch_size is not None:
    _check_ghost_batch_axes(axes)
  return tuple(sorted(axes))


def normalize_axes(axis: int | tuple[int, ...], rank: int) -> tuple[int, ...]:
  """Resolves `axis` against the input rank like Keras's `validate_axis`.

  Args:
    axis: the canonical `axis` (int or tuple of ints).
    rank: the input's rank.

  Returns:
    The feature axes as non-negative ints, in the order given.

  Raises:
    ValueError: for a scalar input, an axis out of range, or a duplicate axis.
  """
  if rank == 0:
    raise ValueError(
      "Input has undefined rank. Received: input_shape=() (a scalar); BatchNormalization "
      "needs at least one feature axis, so pass an array of rank >= 1."
    )
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  resolved = tuple(a + rank if a < 0 else a for a in axes)
  if any(not 0 <= a < rank for a in resolved):
    raise ValueError(
      "Invalid value for `axis` argument. Expected 0 <= axis < inputs.rank (with "
      f"inputs.rank={rank}). Received: axis={axis!r} (normalized: {resolved}); pass axes "
      f"between {-rank} and {rank - 1}."
    )
  if len(set(resolved)) != len(resolved):
    raise ValueError(
      f"Duplicate axis: `axis`={axis!r} names the same axis twice once negative values are "
      f"resolved for rank {rank} ({resolved}); list each feature axis once."
    )
  return resolved


def _check_ghost_batch_axes(axes: Sequence[int]) -> None:
  """Raises if a feature axis is the batch axis, which ghost batches split."""
  if 0 in axes:
    raise ValueError(
      "When using `virtual_batch_size`, the batch dimension must be 0 and thus axis cannot "
      f"include 0. Received axis={list(axes)}; move the batch to dimension 0 or drop "
      "`virtual_batch_size`."
    )


def feature_shape(config: BatchNormConfig, input_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of every variable: the input's sizes on the feature axes."""
  return tuple(input_shape[a] for a in feature_axes(config, len(input_shape)))


def keras_param_shape(config: BatchNormConfig, input_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Keras's weight shape (tf_keras ``BatchNormalizationBase.build``: ``param_shape``).

  Args:
    config: the layer.
    input_shape: the input shape (only the rank and the feature sizes are read).

  Returns:
    ``(C,)`` for one feature axis without ghost batches; otherwise the input rank with 1 on the
    other axes, and one more 1 inserted at index 1 with ghost batches.
  """
  axes = feature_axes(config, len(input_shape))
  if len(axes) == 1 and config.virtual_batch_size is None:
    return (input_shape[axes[0]],)
  full = tuple(input_shape[a] if a in axes else 1 for a in range(len(input_shape)))
  return full[:1] + (1,) + full[1:] if config.virtual_batch_size is not None else full


_STAT_INITIALIZERS = {
  "moving_mean": "moving_mean_initializer",
  "moving_variance": "moving_variance_initializer",
  "moving_stddev": "moving_variance_initializer",
  "renorm_mean": "moving_mean_initializer",
  "renorm_stddev": "moving_variance_initializer",
}
_INITIALIZERS = {
  "gamma": "gamma_initializer",
  "beta": "beta_initializer",
  **_STAT_INITIALIZERS,
}
_KEYLESS_INITIALIZERS = {"zeros", "ones", "constant"}


def initializer_needs_key(config: BatchNormConfig, name: str) -> bool:
  """Whether the initializer of variable `name` may draw random numbers."""
  if name == "num_batches_tracked":
    return False
  identifier = getattr(config, _INITIALIZERS[name])
  if isinstance(identifier, Mapping):
    identifier = identifier.get("class_name", "")
  return not (
    isinstance(identifier, str) and identifier.lower().replace("_", "") in _KEYLESS_INITIALIZERS
  )


def initial_value(
  config: BatchNormConfig, name: str, key: jax.Array | None, input_shape: tuple[int, ...]
) -> jax.Array:
  """The initial value of one variable, in the feature shape.

  Initializers are called with Keras's parameter shape (so fan-based ones see Keras's fans) and
  the result is reshaped to the feature shape. The standard deviations of renorm
  (``moving_stddev``, ``renorm_stddev``) start at the square root of the variance initializer.

  Args:
    config: the layer.
    name: a name from `param_names` or `stat_names`.
    key: a PRNG key; may be None when `initializer_needs_key` is False.
    input_shape: the input shape, with the batch dimension.
  """
  input_shape = tuple(input_shape)
  if name == "num_batches_tracked":
    return jnp.zeros((), jnp.int32)
  shape = feature_shape(config, input_shape)
  dtype = config.param_dtype
  if name in _STAT_INITIALIZERS:
    dtype = _moments.promote_dtypes(config.param_dtype, jnp.float32)
  argument = _INITIALIZERS[name]
  init = initializers.get(getattr(config, argument), argument=argument)
  key = jax.random.key(0) if key is None else key  # a keyless initializer ignores it
  value = init(key, keras_param_shape(config, input_shape), dtype).reshape(shape)
  return jnp.sqrt(value) if name in ("moving_stddev", "renorm_stddev") else value


def init_variables(
  config: BatchNormConfig, key: jax.Array, input_shape: tuple[int, ...]
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Creates a layer's parameters and statistics for inputs of `input_shape`.

  Args:
    config: the layer.
    key: a PRNG key (only random initializers use it); each variable gets its own.
    input_shape: the input shape, with the batch dimension.

  Returns:
    ``(params, stats)``: ``{"gamma"?, "beta"?}`` in `param_dtype`, and the statistics (see
    `stat_names`) in at least float32, all in the feature shape.
  """
  names = param_names(config) + stat_names(config)
  keys = dict(zip(names, jax.random.split(key, len(names)), strict=True))
  values = {name: initial_value(config, name, keys[name], input_shape) for name in names}
  params = {name: values[name] for name in param_names(config)}
  return params, {name: values[name] for name in stat_names(config)}


def adjustment_takes_key(config: BatchNormConfig) -> bool:
  """Whether the layer's `adjustment` asks for a PRNG key (a ``key`` parameter)."""
  return config.adjustment is not None and (
    "key" in inspect.signature(config.adjustment).parameters
  )


def regularization_penalties(
  config: BatchNormConfig, params: Mapping[str, jax.Array], input_shape: tuple[int, ...]
) -> dict[str, jax.Array]:
  """Keras's weight penalties, on the weights in Keras's parameter shape.

  Returns:
    ``{"gamma_regularizer": ..., "beta_regularizer": ...}`` for the regularized weights that
    exist, float32 scalars.
  """
  keras_shape = keras_param_shape(config, tuple(input_shape))
  penalties = {}
  for name, weight in (("gamma_regularizer", "gamma"), ("beta_regularizer", "beta")):
    penalty = regularizers.get(getattr(config, name), argument=name)
    if penalty is not None and weight in params:
      value = penalty(jnp.reshape(params[weight], keras_shape))
      penalties[name] = jnp.asarray(value, jnp.float32)
  return penalties


def proxy_input_shape(config: BatchNormConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The smallest input shape with the feature sizes on the feature axes (batch on axis 0)."""
  axes = config.axis if isinstance(config.axis, tuple) else (config.axis,)
  rank = max(2, *(a + 1 if a >= 0 else 1 - a for a in axes))
  while len({a % rank for a in axes}) < len(axes):  # e.g. axis=(1, -1) needs rank 3
    rank += 1
  resolved = sorted(a % rank for a in axes)
  proxy = [1] * rank
  for axis, size in zip(resolved, shape, strict=True):
    proxy[axis] = size
  return tuple(proxy)


def checked_num_features(num_features: Any, config: BatchNormConfig) -> tuple[int, ...]:
  """The feature shape a front-end was given as `num_features` (an int or one size per axis)."""
  axes = config.axis if isinstance(config.axis, tuple) else (config.axis,)
  sizes = num_features if isinstance(num_features, (tuple, list)) else (num_features,)
  if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes):
    raise TypeError(
      f"`num_features`={num_features!r} must be a non-negative int, or a tuple of ints (one "
      "per feature axis)."
    )
  if len(sizes) != len(axes):
    raise ValueError(
      f"`num_features`={num_features!r} gives {len(sizes)} size(s) but `axis`={config.axis!r} "
      f"has {len(axes)} axis/axes; pass one size per feature axis, in increasing axis order."
    )
  return tuple(sizes)
