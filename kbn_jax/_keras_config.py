"""Keras ``BatchNormalization`` configs to `BatchNormConfig` arguments and back.

Accepts every format of Keras's ``get_config()``: the plain config dict or the serialized layer
(``{"class_name": "BatchNormalization", "config": {...}}``, with Keras >= 2.13's
``module``/``registered_name``/``build_config`` keys or without them, as in model JSON and HDF5
``model_config``); initializers, regularizers and constraints as names, legacy ``{"class_name",
"config"}`` dicts, Keras >= 2.13 dicts, or TF1 (V1 initializer) dicts with a ``dtype`` key.
Imports neither Flax nor a front-end: every front-end builds itself from `config_kwargs`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from kbn_jax import _keras_identifiers, _keras_semantics
from kbn_jax._config import BatchNormConfig, canonicalize_axis, freeze

_LAYER_ARGS = (
  "axis",
  "momentum",
  "epsilon",
  "center",
  "scale",
  "beta_initializer",
  "gamma_initializer",
  "moving_mean_initializer",
  "moving_variance_initializer",
  "beta_regularizer",
  "gamma_regularizer",
  "beta_constraint",
  "gamma_constraint",
  "renorm",
  "renorm_clipping",
  "renorm_momentum",
  "fused",
  "trainable",
  "virtual_batch_size",
  "adjustment",
)
_OBJECT_KINDS = {
  "beta_initializer": "initializer",
  "gamma_initializer": "initializer",
  "moving_mean_initializer": "initializer",
  "moving_variance_initializer": "initializer",
  "beta_regularizer": "regularizer",
  "gamma_regularizer": "regularizer",
  "beta_constraint": "constraint",
  "gamma_constraint": "constraint",
}
# Base-layer keys of a Keras config that are dropped.
_SHAPE_KEYS = ("batch_input_shape", "input_shape", "batch_size", "input_dim")
_DROPPED_KEYS = ("autocast", "dynamic")
_LAYER_CLASS_NAMES = ("BatchNormalization", "BatchNormalizationV1", "BatchNormalizationV2")

_F16, _BF16, _F32, _F64 = (jnp.dtype(t) for t in ("float16", "bfloat16", "float32", "float64"))
# Keras policy name -> (dtype, param_dtype): Keras keeps BN weights in float32 for 16-bit layers.
_KERAS_DTYPES = {
  "float16": (_F16, _F32),
  "bfloat16": (_BF16, _F32),
  "float32": (_F32, _F32),
  "float64": (_F64, _F64),
}


_CONFIG_FIELDS = frozenset(BatchNormConfig.__dataclass_fields__)


def config_kwargs(
  config: Mapping[str, Any],
  *,
  fields: Iterable[str],
  axis_saved_after_build: bool | None = None,
  keep_name: bool = False,
  **overrides: Any,
) -> dict[str, Any]:
  """The arguments of a layer equal to a Keras config (see `keras_compat.from_keras_config`).

  Args:
    config: a Keras layer config or serialized layer.
    fields: the argument names the target layer accepts (for the overrides' check).
    axis_saved_after_build: force (True) or forbid (False) the ghost-batch axis shift.
    keep_name: pass the Keras ``name`` on as ``name``.
    **overrides: arguments set after conversion, e.g. ``semantics="keras_v2"``.

  Returns:
    The keyword arguments, validated by building a `BatchNormConfig` from them.

  Raises:
    TypeError: for unknown config keys or overrides.
    ValueError: for values Keras or kbn_jax rejects.
  """
  original = config
  config = dict(_unwrap_layer(config))
  unknown = set(config) - set(_LAYER_ARGS) - {"name", "dtype", "synchronized"}
  unknown -= set(_SHAPE_KEYS) | set(_DROPPED_KEYS)
  if unknown:
    raise TypeError(
      f"Unknown keys {sorted(unknown)} in the Keras BatchNormalization config; supported: "
      f"{sorted(_LAYER_ARGS)} and the base-layer keys name, dtype, {', '.join(_SHAPE_KEYS)}."
    )
  kwargs = {key: config[key] for key in _LAYER_ARGS if key in config}
  if kwargs.get("adjustment") is not None:
    raise ValueError(
      "`adjustment` cannot come from a config (Keras never serializes it); pass the callable "
      "as an override: from_keras_config(config, adjustment=fn)."
    )
  if config.get("synchronized"):
    _check_synchronized(kwargs.get("fused"), overrides)
    kwargs["fused"] = False  # tf_keras's synchronized layers never fuse
  if "dtype" in config:
    kwargs["dtype"], kwargs["param_dtype"] = _dtypes_from_keras(config["dtype"])
  if keep_name and config.get("name"):
    kwargs["name"] = config["name"]
  for key, kind in _OBJECT_KINDS.items():
    if key in kwargs:
      kwargs[key] = _canonical_object(kwargs[key], kind)
  if kwargs.get("renorm_clipping") is not None:
    kwargs["renorm_clipping"] = freeze(kwargs["renorm_clipping"])
  if "axis" in kwargs:
    kwargs["axis"] = _axis_from_keras(
      kwargs["axis"],
      virtual_batch_size=kwargs.get("virtual_batch_size"),
      saved_after_build=axis_saved_after_build,
    )
  if "semantics" not in overrides:
    trainable = kwargs.get("trainable", True)
    kwargs["semantics"] = _keras_semantics.semantics_of_config(
      original, trainable=trainable, stacklevel=3
    )
  bad = set(overrides) - set(fields)
  if bad:
    raise TypeError(f"Unknown overrides {sorted(bad)}; they must be arguments of the layer.")
  kwargs.update(overrides)
  BatchNormConfig(**{k: v for k, v in kwargs.items() if k in _CONFIG_FIELDS})  # validates
  return kwargs


def to_keras(config: BatchNormConfig, name: str | None = None) -> dict[str, Any]:
  """A config dict that ``tf_keras``'s V1 ``BatchNormalization.from_config`` accepts.

  The dict has the keys of Keras's ``get_config()``: ``renorm*`` only with `renorm`,
  ``virtual_batch_size`` only when set; ``fused`` appears only when False (Keras never writes it,
  and ``None``/``True`` mean the same in V1). Initializers, regularizers and constraints are written
  as given (names, or ``{"class_name", "config"}`` dicts). A ghost-batch `axis` given as a
  one-element list is written as an int, so that no reader takes it for Keras's post-build
  shifted axis. `axis_name` and `axis_index_groups` (JAX distribution settings) have no Keras
  counterpart and are left out; an `adjustment` is left out with a warning, as Keras does.

  Args:
    config: the layer's configuration.
    name: the layer's name (default ``"batch_normalization"``).

  Returns:
    A JSON-serializable dict.

  Raises:
    ValueError: if an initializer, regularizer or constraint is a callable, or the dtypes have
      no Keras equivalent.
  """
  keras: dict[str, Any] = {
    "name": name or "batch_normalization",
    "trainable": config.trainable,
    "dtype": _dtype_to_keras(config.dtype, config.param_dtype),
    "axis": _axis_to_keras(config.axis, config.virtual_batch_size),
    "momentum": float(config.momentum),
    "epsilon": float(config.epsilon),
    "center": config.center,
    "scale": config.scale,
  }
  for key in _OBJECT_KINDS:
    keras[key] = _object_to_keras(getattr(config, key), key)
  if config.renorm:
    keras["renorm"] = True
    keras["renorm_clipping"] = {k: float(v) for k, v in (config.renorm_clipping or {}).items()}
    keras["renorm_momentum"] = float(config.renorm_momentum)
  if config.virtual_batch_size is not None:
    keras["virtual_batch_size"] = config.virtual_batch_size
  if config.fused is False:
    keras["fused"] = False
  if config.adjustment is not None:
    warnings.warn(
      "`adjustment` is not serializable and is left out of the Keras config (as Keras does); "
      "set it again on the Keras layer.",
      stacklevel=3,
    )
  return keras


def _unwrap_layer(config: Mapping[str, Any]) -> Mapping[str, Any]:
  """Returns the inner config of a serialized layer (``{"class_name", "config", ...}``)."""
  if not isinstance(config, Mapping):
    raise TypeError(
      f"`config` must be a Keras config dict (layer.get_config()), got {type(config).__name__}."
    )
  if "class_name" not in config:
    return config
  class_name = config["class_name"]
  if class_name not in _LAYER_CLASS_NAMES:
    raise ValueError(
      f"A serialized {class_name!r} layer is not a Keras BatchNormalization; expected a class "
      f"name among {list(_LAYER_CLASS_NAMES)}."
    )
  return config.get("config") or {}


def _check_synchronized(fused: Any, overrides: Mapping[str, Any]) -> None:
  """A ``synchronized=True`` config: never fused (Keras's error), and an `axis_name` to sync."""
  if fused or overrides.get("fused"):
    raise ValueError("`fused=True` is not supported when `synchronized=True`.")
  if overrides.get("axis_name") is None:
    raise ValueError(
      "The config has `synchronized=True` (Keras's cross-replica batch norm); in JAX pass the "
      "mapped axis name instead: from_keras_config(config, axis_name='batch')."
    )


def _axis_from_keras(axis, *, virtual_batch_size, saved_after_build):
  """Keras's axis, with the post-build ghost-batch shift undone (see `from_keras_config`)."""
  if not isinstance(axis, (list, tuple)):
    return canonicalize_axis(axis)
  axis = canonicalize_axis(tuple(axis))
  if virtual_batch_size is None:
    if saved_after_build:
      raise ValueError(
        "`axis_saved_after_build=True` needs a `virtual_batch_size` config: only ghost-batch "
        "layers shift their axis when built."
      )
    return axis
  could_be_shifted = all(a >= 2 for a in axis)
  if saved_after_build is None:
    saved_after_build = could_be_shifted
  if not saved_after_build:
    return axis
  if not could_be_shifted:
    raise ValueError(
      f"`axis`={list(axis)} cannot be Keras's post-build (shifted) ghost-batch axis, whose "
      "entries are >= 2; pass axis_saved_after_build=False."
    )
  return tuple(a - 1 for a in axis)


def _axis_to_keras(axis, virtual_batch_size):
  if isinstance(axis, int):
    return axis
  axis = [int(a) for a in axis]
  if virtual_batch_size is not None and len(axis) == 1:
    return axis[0]
  return axis


def _dtypes_from_keras(dtype: Any) -> tuple[Any, Any]:
  """Keras's layer dtype (a name or a serialized policy) -> ``(dtype, param_dtype)``."""
  name = dtype
  if isinstance(dtype, Mapping):
    name = (dtype.get("config") or {}).get("name", "")
  if name is None or name in ("infer", "_infer"):
    return None, jnp.float32
  name = str(name)
  base = name.removeprefix("mixed_")
  if base not in _KERAS_DTYPES or (base != name and base not in ("float16", "bfloat16")):
    raise ValueError(
      f"Keras `dtype`={dtype!r} is not supported; expected one of {sorted(_KERAS_DTYPES)}, "
      "'mixed_float16', 'mixed_bfloat16', or a serialized Policy of one of them."
    )
  return _KERAS_DTYPES[base]


def _dtype_to_keras(dtype: Any, param_dtype: Any) -> str:
  compute = None if dtype is None else jnp.dtype(dtype)
  param = jnp.dtype(param_dtype)
  if param == _F32 and compute in (None, _F32):
    return "float32"
  if param == _F32 and compute in (_F16, _BF16):
    return compute.name
  if param == _F64 and compute in (None, _F64):
    return "float64"
  raise ValueError(
    f"`dtype`={dtype!r} with `param_dtype`={param_dtype!r} has no Keras equivalent: Keras keeps "
    "batch-norm weights in float32 for float16/bfloat16/float32 layers and in float64 for "
    "float64 layers. Use param_dtype=float32 (or float64 with dtype float64/None)."
  )


def _canonical_object(value: Any, kind: str) -> Any:
  """A Keras initializer/regularizer/constraint identifier in one hashable form.

  Serialized dicts lose Keras >= 2.13's ``module``/``registered_name`` keys and TF1's ``dtype``
  and ``verify_shape``; TF1's ``VarianceScaling(distribution="normal")`` (a truncated normal in
  both TF1 and Keras) becomes ``"truncated_normal"`` and TF1's ``RandomUniform(maxval=None)``
  gets its float default 1.0.
  """
  if not isinstance(value, Mapping) or "class_name" not in value:
    return value
  class_name = str(value["class_name"])
  config = dict(value.get("config") or {})
  if kind == "initializer":
    config.pop("dtype", None)
    config.pop("verify_shape", None)
    snake = _keras_identifiers.snake_case(class_name)
    if snake == "variance_scaling" and config.get("distribution") == "normal":
      config["distribution"] = "truncated_normal"
    if snake in ("random_uniform", "uniform") and "maxval" in config and config["maxval"] is None:
      config["maxval"] = 1.0
  return freeze({"class_name": class_name, "config": config})


def _object_to_keras(value: Any, argument: str) -> Any:
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping):
    return _thaw(value)
  raise ValueError(
    f"`{argument}`={value!r} is a callable, which a Keras config cannot hold; use a Keras name "
    'or config dict (e.g. {"class_name": "L2", "config": {"l2": 1e-4}}) to export the layer.'
  )


def _thaw(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _thaw(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_thaw(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value
