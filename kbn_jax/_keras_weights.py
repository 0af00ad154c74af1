"""Keras ``get_weights()`` lists to ``{"params", "batch_stats"}`` variables and back.

Keras stores the weights of a layer in its *parameter shape*: ``(C,)`` for one feature axis, the
full input rank with 1s on the other axes for several feature axes (``(1, C1, 1, C2)``), and one
more leading 1 with ghost batches (``(1, 1, C)`` for a rank-2 input). `kbn_jax` stores the
*feature shape* (``(C,)``, ``(C1, C2)``); these converters reshape between the two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from kbn_jax import _moments, _variables
from kbn_jax._config import BatchNormConfig
from kbn_jax._keras_files import WEIGHT_ORDER

_COLLECTION = {"gamma": "params", "beta": "params"}


@dataclasses.dataclass(frozen=True)
class _Layout:
  names: tuple[str, ...]
  feature_shape: tuple[int, ...]
  keras_shape: tuple[int, ...]
  param_dtype: Any
  stats_dtype: Any


def layout(config: BatchNormConfig, input_shape: Sequence[int | None]) -> _Layout:
  """Names, feature shape, Keras shape and dtypes of a layer's weights on `input_shape`."""
  input_shape = tuple(input_shape)
  feature_axes = _variables.feature_axes(config, len(input_shape))
  feature_shape = tuple(input_shape[a] for a in feature_axes)
  if any(not isinstance(d, (int, np.integer)) for d in feature_shape):
    raise ValueError(
      f"Input has undefined `axis` dimension: `input_shape`={input_shape} with axis="
      f"{config.axis!r}; give the feature sizes as ints."
    )
  feature_shape = tuple(int(d) for d in feature_shape)
  keras_shape = _variables.keras_param_shape(config, input_shape)
  return _Layout(
    names=weight_names(config),
    feature_shape=feature_shape,
    keras_shape=keras_shape,
    param_dtype=jnp.dtype(config.param_dtype),
    stats_dtype=_moments.promote_dtypes(config.param_dtype, jnp.float32),
  )


def _axes_count(axis: Any) -> int:
  return len(axis) if isinstance(axis, (list, tuple)) else 1


def weight_names(config: BatchNormConfig) -> tuple[str, ...]:
  """The Keras weight names of a layer, in ``get_weights()`` order."""
  present = (config.scale, config.center, True, True) + (config.renorm,) * 3
  return tuple(n for n, p in zip(WEIGHT_ORDER, present, strict=True) if p)


def variables_from_keras(
  config: BatchNormConfig,
  weights: Sequence[Any] | Mapping[str, Any],
  input_shape: Sequence[int | None],
) -> dict[str, dict[str, Any]]:
  """``get_weights()`` (Keras's order and parameter shapes, or a dict by name) to variables.

  See `kbn_jax.keras_compat.variables_from_keras`.
  """
  shapes = layout(config, input_shape)
  if isinstance(weights, Mapping):
    missing = [n for n in shapes.names if n not in weights]
    extra = sorted(set(weights) - set(shapes.names))
    if missing or extra:
      raise ValueError(
        f"`weights` has names {sorted(weights)} but this layer's weights are "
        f"{list(shapes.names)} (missing {missing}, unexpected {extra})."
      )
    weights = [weights[n] for n in shapes.names]
  weights = list(weights)
  if len(weights) != len(shapes.names):
    raise ValueError(
      f"`weights` has {len(weights)} arrays but this layer has {len(shapes.names)}: "
      f"{list(shapes.names)} (Keras's get_weights() order). Check `scale`, `center` and "
      "`renorm` against the Keras layer."
    )
  variables: dict[str, dict[str, Any]] = {}
  for name, value in zip(shapes.names, weights, strict=True):
    value = np.asarray(value)
    if value.shape not in (shapes.keras_shape, shapes.feature_shape):
      raise ValueError(
        f"Keras weight `{name}` has shape {value.shape}, but on inputs of shape "
        f"{tuple(input_shape)} with axis={config.axis!r} Keras's shape is "
        f"{shapes.keras_shape} (feature shape {shapes.feature_shape}); check `axis`, "
        "`virtual_batch_size` and `input_shape`."
      )
    collection = _COLLECTION.get(name, "batch_stats")
    dtype = shapes.param_dtype if collection == "params" else shapes.stats_dtype
    variables.setdefault(collection, {})[name] = jnp.asarray(
      value.reshape(shapes.feature_shape), dtype
    )
  return variables


def keras_weights_from_variables(
  config: BatchNormConfig,
  variables: Mapping[str, Mapping[str, Any]],
  input_shape: Sequence[int | None] | None = None,
) -> list[np.ndarray]:
  """Variables to a ``set_weights()`` list (see `kbn_jax.keras_compat`)."""
  stats = variables.get("batch_stats", {})
  if "moving_mean" not in stats:
    raise ValueError(
      "`variables` has no batch_stats/moving_mean; pass this layer's variables "
      '({"params": ..., "batch_stats": ...}), not the whole model\'s.'
    )
  feature_shape = tuple(np.shape(stats["moving_mean"]))
  if input_shape is not None:
    shapes = layout(config, input_shape)
  elif _axes_count(config.axis) == 1 and config.virtual_batch_size is None:
    shapes = _Layout(weight_names(config), feature_shape, feature_shape, None, None)
  else:
    raise ValueError(
      f"With axis={config.axis!r} and virtual_batch_size={config.virtual_batch_size!r} "
      "Keras's weights have the input's full rank; pass `input_shape` (e.g. x.shape)."
    )
  weights = []
  for name in shapes.names:
    collection = variables.get(_COLLECTION.get(name, "batch_stats"), {})
    if name not in collection:
      raise ValueError(f"`variables` has no `{name}`, which this layer's Keras weights include.")
    value = np.asarray(collection[name])
    if value.shape != shapes.feature_shape:
      raise ValueError(
        f"Variable `{name}` has shape {value.shape}, expected the feature shape "
        f"{shapes.feature_shape}."
      )
    weights.append(value.reshape(shapes.keras_shape))
  return weights
