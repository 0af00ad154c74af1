"""Keras interop: layer configs, ``get_weights()`` lists and HDF5 weight files.

Four conversions move a Keras 2.x V1 ``BatchNormalization`` layer to `kbn_jax` and back:

* `from_keras_config` / `to_keras_config`: a Keras ``get_config()`` dict (every format Keras
  writes) to a `kbn_jax.BatchNormalization`, and a Module to a dict that ``tf_keras``'s V1
  ``BatchNormalization.from_config`` accepts;
* `variables_from_keras` / `keras_weights_from_variables`: a layer's ``get_weights()`` list to
  Flax variables (``{"params": ..., "batch_stats": ...}``) and back;
* `load_keras_h5_weights` / `load_keras_h5_config`: the weights and config of one layer of a
  Keras HDF5 file (``model.save("m.h5")`` or ``model.save_weights("w.h5")``), by layer name. They
  need the optional dependency ``h5py``.

Keras stores the weights of a layer in its *parameter shape*: ``(C,)`` for one feature axis, the
full input rank with 1s on the other axes for several feature axes (``(1, C1, 1, C2)``), and one
more leading 1 with ghost batches (``(1, 1, C)`` for a rank-2 input). `kbn_jax` stores the
*feature shape* (``(C,)``, ``(C1, C2)``); the weight converters reshape between the two.

Example::

  >>> import numpy as np, kbn_jax
  >>> from kbn_jax import keras_compat
  >>> config = {"axis": -1, "momentum": 0.9, "epsilon": 1e-3, "center": True, "scale": True,
  ...           "gamma_regularizer": {"class_name": "L2", "config": {"l2": 1e-4}}}
  >>> layer = keras_compat.from_keras_config(config)
  >>> weights = [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]  # layer.get_weights()
  >>> variables = keras_compat.variables_from_keras(layer, weights, input_shape=(None, 3))
  >>> sorted(variables["batch_stats"])
  ['moving_mean', 'moving_variance']
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from kbn_jax import (
  _batch_norm,
  _keras_files,
  _keras_identifiers,
  _keras_semantics,
  _suspicious,
  _validation,
  functional,
)
from kbn_jax._grafting import graft_batch_norms as graft_batch_norms

if TYPE_CHECKING:
  from kbn_jax.layers import BatchNormalization

# The order of `get_weights()` (spec section 2.8), with each weight's Flax collection.
KERAS_WEIGHT_ORDER = _keras_files.WEIGHT_ORDER
_COLLECTION = {"gamma": "params", "beta": "params"}

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


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def from_keras_config(
  config: Mapping[str, Any],
  cls: type[BatchNormalization] | None = None,
  *,
  axis_saved_after_build: bool | None = None,
  keep_name: bool = False,
  **overrides: Any,
) -> BatchNormalization:
  """Builds a `kbn_jax.BatchNormalization` from a Keras ``BatchNormalization`` config.

  Accepts every format of Keras's ``get_config()`` (spec section 6.1): the plain config dict or
  the serialized layer (``{"class_name": "BatchNormalization", "config": {...}}``, with Keras >=
  2.13's ``module``/``registered_name``/``build_config`` keys or without them, as in model JSON
  and HDF5 ``model_config``); initializers, regularizers and constraints as names, legacy
  ``{"class_name", "config"}`` dicts, Keras >= 2.13 dicts, or TF1 (V1 initializer) dicts with a
  ``dtype`` key. Base-layer keys map as follows: ``trainable`` to `trainable`; ``dtype`` (a name
  such as ``"float32"``/``"mixed_float16"`` or a serialized ``Policy``) to `dtype` and
  `param_dtype` (16-bit and mixed policies compute in 16 bits with float32 weights, as Keras
  does); ``name`` is dropped unless `keep_name`; ``batch_input_shape`` and the other input-shape
  keys are dropped. Serialized objects are stored as frozen dicts, so the Module stays
  hashable and `to_keras_config` writes them back.

  **The ghost-batch axis quirk.** Keras shifts ``self.axis`` by +1 when it builds a layer with
  ``virtual_batch_size`` (rank 2, ``axis=-1`` is saved as ``[2]``; axis 1 on rank 4 as ``[2]``),
  and its own ``from_config`` then fails or picks the wrong axis. Keras keeps the axis as given
  until build and writes a list of non-negative ints after build, so for a ghost-batch config:

  * an int, or a list with a negative entry or an entry 1 (never a shifted value: built entries
    are >= 2), was saved before build and is kept;
  * a list whose entries are all >= 2 is taken as saved after build and shifted back by -1.
    Saved models (HDF5 ``model_config``, model JSON, ``build_config`` layers) hold built layers,
    so this is right for them; only a hand-written unbuilt config such as ``axis=[2]`` is
    misread. Pass `axis_saved_after_build` to decide explicitly. (`to_keras_config` writes a
    one-axis ghost-batch axis as an int, so its output is never misread.)

  Args:
    config: a Keras layer config or serialized layer.
    cls: the Module class to build (default `kbn_jax.BatchNormalization`).
    axis_saved_after_build: force (True) or forbid (False) the ghost-batch axis shift.
    keep_name: pass the Keras ``name`` on as the Module's `name` (a Flax scope name; leave it
      False for Modules assigned in ``setup``).
    **overrides: Module attributes set after conversion, e.g. ``semantics="keras_v2"`` (without
      it: ``"keras3"`` for a config that says Keras 3 (a ``synchronized`` key or a
      ``DTypePolicy`` dtype), the class name's version for ``BatchNormalizationV1``/``V2``,
      else ``"keras_v1"``, with a warning for a frozen layer, where V1 and V2 differ), or
      ``axis_name="batch"``, ``dtype=None``.

  Returns:
    The Module.

  Raises:
    TypeError: for unknown config keys or overrides.
    ValueError: for values Keras or kbn_jax rejects.
  """
  if cls is None:
    from kbn_jax.layers import BatchNormalization as cls  # noqa: N813 (a default class)
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
  _check_synchronized(config.get("synchronized"), overrides)
  if "dtype" in config:
    kwargs["dtype"], kwargs["param_dtype"] = _dtypes_from_keras(config["dtype"])
  if keep_name and config.get("name"):
    kwargs["name"] = config["name"]
  for key, kind in _OBJECT_KINDS.items():
    if key in kwargs:
      kwargs[key] = _canonical_object(kwargs[key], kind)
  if kwargs.get("renorm_clipping") is not None:
    kwargs["renorm_clipping"] = _freeze(kwargs["renorm_clipping"])
  if "axis" in kwargs:
    kwargs["axis"] = _axis_from_keras(
      kwargs["axis"],
      virtual_batch_size=kwargs.get("virtual_batch_size"),
      saved_after_build=axis_saved_after_build,
    )
  if "semantics" not in overrides:
    trainable = kwargs.get("trainable", True)
    kwargs["semantics"] = _keras_semantics.semantics_of_config(
      original, trainable=trainable, stacklevel=2
    )
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent"}
  bad = set(overrides) - fields
  if bad:
    raise TypeError(f"Unknown overrides {sorted(bad)}; they must be attributes of {cls.__name__}.")
  kwargs.update(overrides)
  return cls(**kwargs)


def to_keras_config(module: BatchNormalization) -> dict[str, Any]:
  """Returns a config dict that ``tf_keras``'s V1 ``BatchNormalization.from_config`` accepts.

  The dict has the keys of Keras's ``get_config()``: ``renorm*`` only with `renorm`,
  ``virtual_batch_size`` only when set; ``fused`` appears only when False (Keras never writes it,
  and ``None``/``True`` mean the same in V1). Initializers, regularizers and constraints are written
  as given (names, or ``{"class_name", "config"}`` dicts). A ghost-batch `axis` given as a
  one-element list is written as an int, so that no reader takes it for Keras's post-build
  shifted axis. `axis_name` and `axis_index_groups` (JAX distribution settings) have no Keras
  counterpart and are left out; an `adjustment` is left out with a warning, as Keras does.

  Args:
    module: a `kbn_jax.BatchNormalization`.

  Returns:
    A JSON-serializable dict.

  Raises:
    ValueError: if an initializer, regularizer or constraint is a callable, or the dtypes have
      no Keras equivalent.
  """
  config: dict[str, Any] = {
    "name": getattr(module, "name", None) or "batch_normalization",
    "trainable": module.trainable,
    "dtype": _dtype_to_keras(module.dtype, module.param_dtype),
    "axis": _axis_to_keras(module.axis, module.virtual_batch_size),
    "momentum": float(module.momentum),
    "epsilon": float(module.epsilon),
    "center": module.center,
    "scale": module.scale,
  }
  for key in _OBJECT_KINDS:
    config[key] = _object_to_keras(getattr(module, key), key)
  if module.renorm:
    config["renorm"] = True
    config["renorm_clipping"] = {k: float(v) for k, v in (module.renorm_clipping or {}).items()}
    config["renorm_momentum"] = float(module.renorm_momentum)
  if module.virtual_batch_size is not None:
    config["virtual_batch_size"] = module.virtual_batch_size
  if module.fused is False:
    config["fused"] = False
  if module.adjustment is not None:
    warnings.warn(
      "`adjustment` is not serializable and is left out of the Keras config (as Keras does); "
      "set it again on the Keras layer.",
      stacklevel=2,
    )
  return config


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


def _check_synchronized(synchronized: Any, overrides: Mapping[str, Any]) -> None:
  if synchronized and overrides.get("axis_name") is None:
    raise ValueError(
      "The config has `synchronized=True` (Keras's cross-replica batch norm); in JAX pass the "
      "mapped axis name instead: from_keras_config(config, axis_name='batch')."
    )


def _axis_from_keras(axis, *, virtual_batch_size, saved_after_build):
  """Keras's axis, with the post-build ghost-batch shift undone (see `from_keras_config`)."""
  if not isinstance(axis, (list, tuple)):
    return _validation.canonicalize_axis(axis)
  axis = _validation.canonicalize_axis(tuple(axis))
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
  return _freeze({"class_name": class_name, "config": config})


def _object_to_keras(value: Any, argument: str) -> Any:
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping):
    return _thaw(value)
  raise ValueError(
    f"`{argument}`={value!r} is a callable, which a Keras config cannot hold; use a Keras name "
    'or config dict (e.g. {"class_name": "L2", "config": {"l2": 1e-4}}) to export the layer.'
  )


def _freeze(value: Any) -> Any:
  """Nested dicts/lists -> FrozenDict/tuples, so that Module attributes stay hashable."""
  if isinstance(value, Mapping):
    return FrozenDict({str(k): _freeze(v) for k, v in value.items()})
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _thaw(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _thaw(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_thaw(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
  names: tuple[str, ...]
  feature_shape: tuple[int, ...]
  keras_shape: tuple[int, ...]
  param_dtype: Any
  stats_dtype: Any


def keras_param_shape(module: BatchNormalization, input_shape: Sequence[int | None]) -> tuple:
  """Keras's weight shape for `module` on inputs of `input_shape` (spec section 2, step 6).

  Args:
    module: a `kbn_jax.BatchNormalization`.
    input_shape: the input shape, with the batch dimension (which may be None).

  Returns:
    ``(C,)`` for one feature axis without ghost batches; otherwise the input rank with 1 on the
    non-feature axes, and one more 1 at index 1 with ghost batches.
  """
  return _layout(module, input_shape).keras_shape


def _layout(module: BatchNormalization, input_shape: Sequence[int | None]) -> _Layout:
  input_shape = tuple(input_shape)
  rank = len(input_shape)
  axes = _validation.normalize_axes(_validation.canonicalize_axis(module.axis), rank)
  if module.virtual_batch_size is not None:
    _validation.check_ghost_batch_axes(axes)
  feature_axes = tuple(sorted(axes))
  feature_shape = tuple(input_shape[a] for a in feature_axes)
  if any(not isinstance(d, (int, np.integer)) for d in feature_shape):
    raise ValueError(
      f"Input has undefined `axis` dimension: `input_shape`={input_shape} with axis="
      f"{module.axis!r}; give the feature sizes as ints."
    )
  feature_shape = tuple(int(d) for d in feature_shape)
  keras_shape = _batch_norm.keras_param_shape(module.config, input_shape)
  return _Layout(
    names=_weight_names(module),
    feature_shape=feature_shape,
    keras_shape=keras_shape,
    param_dtype=jnp.dtype(module.param_dtype),
    stats_dtype=functional.promote_dtypes(module.param_dtype, jnp.float32),
  )


def _axes_count(axis: Any) -> int:
  return len(axis) if isinstance(axis, (list, tuple)) else 1


def _weight_names(module: BatchNormalization) -> tuple[str, ...]:
  """The Keras weight names of `module`, in ``get_weights()`` order."""
  present = (module.scale, module.center, True, True) + (module.renorm,) * 3
  return tuple(n for n, p in zip(KERAS_WEIGHT_ORDER, present, strict=True) if p)


def variables_from_keras(
  module: BatchNormalization,
  weights: Sequence[Any] | Mapping[str, Any],
  input_shape: Sequence[int | None],
) -> dict[str, dict[str, Any]]:
  """Converts a Keras layer's ``get_weights()`` to this Module's Flax variables.

  Args:
    module: the `kbn_jax.BatchNormalization` (e.g. from `from_keras_config`).
    weights: ``layer.get_weights()``, in Keras's order ``[gamma?, beta?, moving_mean,
      moving_variance, (moving_stddev, renorm_mean, renorm_stddev)?]``, or a dict by those
      names. Each array has Keras's parameter shape (see `keras_param_shape`) or the feature
      shape.
    input_shape: the layer's input shape, with the batch dimension (which may be None).

  Returns:
    ``{"params": {"gamma", "beta"}, "batch_stats": {...}}`` (``params`` only if the layer has
    gamma or beta), arrays in the feature shape, gamma/beta in `param_dtype` and statistics in at
    least float32; pass it to ``module.apply``.

  Raises:
    ValueError: if the number, names or shapes of the weights do not fit the Module.
  """
  layout = _layout(module, input_shape)
  if isinstance(weights, Mapping):
    missing = [n for n in layout.names if n not in weights]
    extra = sorted(set(weights) - set(layout.names))
    if missing or extra:
      raise ValueError(
        f"`weights` has names {sorted(weights)} but this layer's weights are "
        f"{list(layout.names)} (missing {missing}, unexpected {extra})."
      )
    weights = [weights[n] for n in layout.names]
  weights = list(weights)
  if len(weights) != len(layout.names):
    raise ValueError(
      f"`weights` has {len(weights)} arrays but this layer has {len(layout.names)}: "
      f"{list(layout.names)} (Keras's get_weights() order). Check `scale`, `center` and "
      "`renorm` against the Keras layer."
    )
  variables: dict[str, dict[str, Any]] = {}
  for name, value in zip(layout.names, weights, strict=True):
    value = np.asarray(value)
    if value.shape not in (layout.keras_shape, layout.feature_shape):
      raise ValueError(
        f"Keras weight `{name}` has shape {value.shape}, but on inputs of shape "
        f"{tuple(input_shape)} with axis={module.axis!r} Keras's shape is "
        f"{layout.keras_shape} (feature shape {layout.feature_shape}); check `axis`, "
        "`virtual_batch_size` and `input_shape`."
      )
    collection = _COLLECTION.get(name, "batch_stats")
    dtype = layout.param_dtype if collection == "params" else layout.stats_dtype
    variables.setdefault(collection, {})[name] = jnp.asarray(
      value.reshape(layout.feature_shape), dtype
    )
  return variables


def keras_weights_from_variables(
  module: BatchNormalization,
  variables: Mapping[str, Mapping[str, Any]],
  input_shape: Sequence[int | None] | None = None,
) -> list[np.ndarray]:
  """Converts this Module's Flax variables to a Keras ``set_weights()`` list.

  Args:
    module: the `kbn_jax.BatchNormalization`.
    variables: its variables, ``{"params": ..., "batch_stats": ...}`` (e.g. the result of
      ``module.init`` or the layer's sub-tree of a model's variables).
    input_shape: the input shape; needed only when Keras's weights have the full input rank
      (several feature axes or ghost batches).

  Returns:
    NumPy arrays in Keras's ``get_weights()`` order and parameter shapes.

  Raises:
    ValueError: for missing variables, or a missing `input_shape` where it is needed.
  """
  stats = variables.get("batch_stats", {})
  if "moving_mean" not in stats:
    raise ValueError(
      "`variables` has no batch_stats/moving_mean; pass this layer's variables "
      '({"params": ..., "batch_stats": ...}), not the whole model\'s.'
    )
  feature_shape = tuple(np.shape(stats["moving_mean"]))
  if input_shape is not None:
    layout = _layout(module, input_shape)
  elif _axes_count(module.axis) == 1 and module.virtual_batch_size is None:
    layout = _Layout(_weight_names(module), feature_shape, feature_shape, None, None)
  else:
    raise ValueError(
      f"With axis={module.axis!r} and virtual_batch_size={module.virtual_batch_size!r} "
      "Keras's weights have the input's full rank; pass `input_shape` (e.g. x.shape)."
    )
  weights = []
  for name in layout.names:
    collection = variables.get(_COLLECTION.get(name, "batch_stats"), {})
    if name not in collection:
      raise ValueError(f"`variables` has no `{name}`, which this layer's Keras weights include.")
    value = np.asarray(collection[name])
    if value.shape != layout.feature_shape:
      raise ValueError(
        f"Variable `{name}` has shape {value.shape}, expected the feature shape "
        f"{layout.feature_shape}."
      )
    weights.append(value.reshape(layout.keras_shape))
  return weights


# ---------------------------------------------------------------------------------------------
# Keras files, through the one hardened reader (kbn_jax._keras_files)
# ---------------------------------------------------------------------------------------------
Limits = _keras_files.Limits
DEFAULT_LIMITS = _keras_files.DEFAULT_LIMITS
LayerNotFoundError = _keras_files.LayerNotFoundError

_SUSPICIOUS = (
  "{path}: layer {name!r}: {found}; loaded as they are, as Keras does (a negative variance "
  "makes inference NaN on its channels, a non-finite weight spreads to every output)."
)


def load_batch_norms(
  path: Any, *, config_path: Any = None, limits: Limits = DEFAULT_LIMITS, **overrides: Any
) -> dict[str, tuple[Any, dict[str, Any]]]:
  """Every BatchNormalization layer of a saved Keras model, ready to run in JAX.

  Reads legacy ``.h5`` files and ``.keras`` zips of tf_keras and Keras 3 (nested models
  included, keyed ``"outer/inner"``; names with ``/`` such as ``"conv1/bn"`` keyed by
  themselves), and weights-only files with `config_path`, through the hardened reader: nothing
  from the file is executed, and its cost is bounded by its size (see `Limits`). Each layer gets
  the `semantics` the file says it was saved with (the rule table of `kbn_jax._keras_semantics`):
  a tf_keras >= 2.4 file (TF2) gets ``"keras_v2"``, a Keras 3 file ``"keras3"``, a file that
  cannot tell V1 from V2 ``"keras_v1"``, with a warning when that choice matters (a frozen layer,
  ``trainable=False``). NaN/Inf weights and negative variances load, as in Keras, with a warning
  naming the layer and the count.

  Args:
    path: the model file (or a weights-only file, with `config_path`).
    config_path: for weights-only files (``save_weights``): the ``.keras`` or ``.h5`` model, or
      a JSON file with the model config (``config.json``, or ``model.to_json()`` saved to a
      file, whose ``keras_version`` then decides the semantics).
    limits: what reading may cost; ``Limits(max_budget_bytes=...)`` for a trusted huge file.
    **overrides: layer arguments for every layer, e.g. ``semantics="keras_v1"`` (a model built
      with the explicit V1 class saves exactly like V2) or ``axis_name="batch"``.

  Returns:
    ``{layer_name: (module, variables)}``: linen `kbn_jax.BatchNormalization` Modules and their
    ``{"params": ..., "batch_stats": ...}`` (use `kbn_jax.nnx.BatchNormalization.from_linen`
    for NNX).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a corrupted, truncated, oversized or mismatched file, or a layer config Keras or
      kbn_jax rejects (the message names the file and the layer).
  """
  layers = {}
  records = _keras_files.read_batch_norm_layers(path, config_path=config_path, limits=limits)
  for name, record in records.items():
    kwargs = dict(overrides)
    kwargs.setdefault("semantics", record.semantics)
    if (
      "semantics" not in overrides and record.ambiguous and record.config.get("trainable") is False
    ):
      warnings.warn(
        f"{path}: layer {name!r} is frozen (trainable=False) and the file cannot say whether it "
        f"is Keras's V1 or V2 layer ({record.semantics_evidence}); it is loaded with "
        f"semantics={record.semantics!r}, under which a training call normalizes it with batch "
        "statistics (V2 and Keras 3 use the moving ones). Pass semantics='keras_v2' (TF2 "
        "tf.keras) or 'keras_v1' to load_batch_norms to choose.",
        stacklevel=2,
      )
    try:
      module = from_keras_config(record.config, **kwargs)
      shape = record.input_shape or _shape_from_weights(module, record.weights)
      variables = variables_from_keras(module, record.weights, shape)
    except (ValueError, TypeError, RecursionError) as error:
      kind = TypeError if isinstance(error, TypeError) else ValueError
      raise kind(f"{path}: layer {name!r}: {error}") from error
    found = _suspicious.describe(_named_weights(record), ("moving_variance", "moving_stddev"))
    if found:
      warnings.warn(_SUSPICIOUS.format(path=path, name=name, found=found), stacklevel=2)
    layers[name] = (module, variables)
  return layers


def _named_weights(record: _keras_files.KerasBatchNormRecord) -> dict[str, np.ndarray]:
  config = record.config
  names = [
    n
    for n in KERAS_WEIGHT_ORDER
    if (n != "gamma" or config.get("scale", True))
    and (n != "beta" or config.get("center", True))
    and (n in ("gamma", "beta", "moving_mean", "moving_variance") or config.get("renorm", False))
  ]
  return dict(zip(names, record.weights, strict=True))


def _shape_from_weights(module: Any, weights: Sequence[Any]) -> tuple[Any, ...]:
  """An input shape consistent with one-axis weights, when the file recorded none."""
  weight_shape = tuple(np.shape(weights[-1]))
  if len(weight_shape) > 1:  # Keras's full-rank parameter shape (several axes, ghost batches)
    skip = 2 if module.virtual_batch_size is not None else 1
    return (None,) + weight_shape[skip:]
  size = weight_shape[0] if weight_shape else 1
  axis = module.axis if isinstance(module.axis, int) else module.axis[0]
  rank = max(2, axis + 1 if axis >= 0 else -axis + 1)
  shape = [None] * rank
  shape[axis] = size
  return tuple(shape)


def load_layer_weights(
  path: Any, layer_name: str, *, config_path: Any = None, limits: Limits = DEFAULT_LIMITS
) -> list[np.ndarray]:
  """Reads one layer's weights, of any layer, from any Keras file.

  The way to bring the rest of a model across: convolution kernels, dense layers, depthwise
  kernels and batch norms alike, from ``.h5`` (``model.save`` or ``save_weights``), ``.keras``
  and ``.weights.h5`` files, through the hardened reader. Weights come back as NumPy arrays in
  Keras's ``get_weights()`` order and shapes (a batch norm's in ``gamma, beta, moving_mean,
  moving_variance`` order whatever order the file lists them in, ready for
  `variables_from_keras`).

  Args:
    path: the ``.h5``, ``.keras`` or ``.weights.h5`` file.
    layer_name: the Keras layer name (``layer.name``, ``"/"`` included), or ``"outer/inner"``
      for a layer of a nested model (a bare ``"inner"`` works when it is unique).
    config_path: for a ``.weights.h5`` file, whose groups are named after layer classes: the
      ``.keras``/``.h5`` model or JSON file with the model config, to find `layer_name`.
    limits: what reading may cost (`Limits`).

  Returns:
    The arrays (an empty list for a layer without weights).

  Raises:
    LayerNotFoundError: no layer of that name (a `KeyError`, listing the file's batch norms).
    ValueError: a corrupted, oversized or mismatched file (naming the file and the layer).
  """
  return _keras_files.read_layer_weights(path, layer_name, config_path=config_path, limits=limits)


def load_layer_config(
  path: Any, layer_name: str, *, config_path: Any = None, limits: Limits = DEFAULT_LIMITS
) -> dict[str, Any]:
  """Reads one layer's serialized config from a Keras model file.

  Args:
    path: a ``.h5`` model (``model.save``), a ``.keras`` zip, a JSON model config
      (``model.to_json()``), or a weights-only file with `config_path`.
    layer_name: the Keras layer name, or ``"outer/inner"`` for a layer of a nested model.
    config_path: for a weights-only file: the model file or JSON holding the config.
    limits: what reading may cost (`Limits`).

  Returns:
    The serialized layer (``{"class_name": ..., "config": {...}, ...}``), which
    `from_keras_config` accepts for a batch norm.

  Raises:
    LayerNotFoundError: no model config, or no layer of that name.
    ValueError: a corrupted or oversized file.
  """
  return _keras_files.read_layer_config(path, layer_name, config_path=config_path, limits=limits)


_RENAMED = (
  "keras_compat.{old} is deprecated and will be removed in the next release: use "
  "keras_compat.{new}, which reads .h5, .keras and .weights.h5 files alike (the same arguments)."
)


def load_keras_h5_weights(path: Any, layer_name: str, *, config_path: Any = None) -> list[Any]:
  """Deprecated name of `load_layer_weights` (it reads every Keras format, not only HDF5)."""
  warnings.warn(
    _RENAMED.format(old="load_keras_h5_weights", new="load_layer_weights"),
    DeprecationWarning,
    stacklevel=2,
  )
  return load_layer_weights(path, layer_name, config_path=config_path)


def load_keras_h5_config(path: Any, layer_name: str, *, config_path: Any = None) -> dict[str, Any]:
  """Deprecated name of `load_layer_config` (it reads every Keras format, not only HDF5)."""
  warnings.warn(
    _RENAMED.format(old="load_keras_h5_config", new="load_layer_config"),
    DeprecationWarning,
    stacklevel=2,
  )
  return load_layer_config(path, layer_name, config_path=config_path)


__all__ = [
  "DEFAULT_LIMITS",
  "KERAS_WEIGHT_ORDER",
  "LayerNotFoundError",
  "Limits",
  "from_keras_config",
  "graft_batch_norms",
  "keras_param_shape",
  "keras_weights_from_variables",
  "load_batch_norms",
  "load_keras_h5_config",
  "load_keras_h5_weights",
  "load_layer_config",
  "load_layer_weights",
  "to_keras_config",
  "variables_from_keras",
]
