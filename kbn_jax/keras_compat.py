"""Keras interop: layer configs, ``get_weights()`` lists and Keras model files.

Every function takes a layer as a `kbn_jax.functional.BatchNormConfig` or any front-end carrying
one (the linen and NNX Modules, Equinox, Haiku):

* `from_keras_config` / `to_keras_config`: a Keras ``get_config()`` dict (every format Keras
  writes) to a layer, and a layer to a dict that ``tf_keras``'s V1
  ``BatchNormalization.from_config`` accepts;
* `variables_from_keras` / `keras_weights_from_variables`: a layer's ``get_weights()`` list to
  ``{"params": ..., "batch_stats": ...}`` variables and back;
* `load_batch_norms`, `load_layer_weights`, `load_layer_config`: Keras model files (``.h5``,
  ``.keras``, ``.weights.h5``), read by one hardened reader. They need ``h5py``.

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
from typing import Any

import numpy as np

from kbn_jax import _keras_config, _keras_files, _keras_weights, _suspicious
from kbn_jax._config import BatchNormConfig
from kbn_jax._grafting import graft_batch_norms as graft_batch_norms
from kbn_jax.linen import BatchNormalization

KERAS_WEIGHT_ORDER = _keras_files.WEIGHT_ORDER


def _config_of(layer: Any) -> BatchNormConfig:
  """The `BatchNormConfig` of a layer given as a config or a front-end that carries one."""
  config = getattr(layer, "config", layer)
  if not isinstance(config, BatchNormConfig):
    raise TypeError(
      f"Expected a kbn_jax layer or a BatchNormConfig, got {type(layer).__name__}; build one "
      "with keras_compat.from_keras_config or kbn_jax.functional.BatchNormConfig."
    )
  return config


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def from_keras_config(
  config: Mapping[str, Any],
  cls: Any = None,
  *,
  axis_saved_after_build: bool | None = None,
  keep_name: bool = False,
  **overrides: Any,
) -> Any:
  """Builds a layer from a Keras ``BatchNormalization`` config.

  Accepts every format of Keras's ``get_config()``: the plain config dict or the serialized
  layer (``{"class_name": "BatchNormalization", "config": {...}}``, with Keras >= 2.13's
  ``module``/``registered_name``/``build_config`` keys or without them, as in model JSON and
  HDF5 ``model_config``); initializers, regularizers and constraints as names, legacy
  ``{"class_name", "config"}`` dicts, Keras >= 2.13 dicts, or TF1 (V1 initializer) dicts with a
  ``dtype`` key. Base-layer keys map as follows: ``trainable`` to `trainable`; ``dtype`` (a name
  such as ``"float32"``/``"mixed_float16"`` or a serialized ``Policy``) to `dtype` and
  `param_dtype` (16-bit and mixed policies compute in 16 bits with float32 weights, as Keras
  does); ``name`` is dropped unless `keep_name`; ``batch_input_shape`` and the other input-shape
  keys are dropped. tf_keras's ``synchronized=True`` means the non-fused path (Keras refuses
  ``fused=True`` with it) and needs an `axis_name` override.

  .. note::
    Keras shifts ``self.axis`` by +1 when it builds a layer with ``virtual_batch_size`` (rank
    2, ``axis=-1`` is saved as ``[2]``), and its own ``from_config`` then fails or picks the
    wrong axis. For a ghost-batch config, an int or a list with a negative entry or an entry 1
    was saved before build and is kept; a list whose entries are all >= 2 is taken as saved
    after build and shifted back by -1 (right for saved models; a hand-written unbuilt
    ``axis=[2]`` is misread). Pass `axis_saved_after_build` to decide explicitly.

  Args:
    config: a Keras layer config or serialized layer.
    cls: the layer class to build: `kbn_jax.BatchNormalization` (linen, default),
      `kbn_jax.functional.BatchNormConfig`, or any class taking the config's arguments.
    axis_saved_after_build: force (True) or forbid (False) the ghost-batch axis shift.
    keep_name: pass the Keras ``name`` on as the Module's `name` (a Flax scope name; leave it
      False for Modules assigned in ``setup``).
    **overrides: layer arguments set after conversion, e.g. ``semantics="keras_v2"`` (without
      it: what the config says, ``"keras_v1"`` when it cannot tell, with a warning for a frozen
      layer, where V1 and V2 differ), or ``axis_name="batch"``, ``dtype=None``.

  Returns:
    The layer.

  Raises:
    TypeError: for unknown config keys or overrides.
    ValueError: for values Keras or kbn_jax rejects.
  """
  cls = BatchNormalization if cls is None else cls
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent"}
  kwargs = _keras_config.config_kwargs(
    config,
    fields=fields,
    axis_saved_after_build=axis_saved_after_build,
    keep_name=keep_name,
    **overrides,
  )
  return cls(**kwargs)


def to_keras_config(layer: Any) -> dict[str, Any]:
  """A config dict that ``tf_keras``'s V1 ``BatchNormalization.from_config`` accepts.

  Args:
    layer: a kbn_jax layer (linen, NNX, ...) or a `BatchNormConfig`.

  Returns:
    A JSON-serializable dict (see `kbn_jax._keras_config.to_keras`).
  """
  return _keras_config.to_keras(_config_of(layer), getattr(layer, "name", None))


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
def keras_param_shape(layer: Any, input_shape: Sequence[int | None]) -> tuple[int, ...]:
  """Keras's weight shape for a layer on inputs of `input_shape`.

  Args:
    layer: a kbn_jax layer or a `BatchNormConfig`.
    input_shape: the input shape, with the batch dimension (which may be None).

  Returns:
    ``(C,)`` for one feature axis without ghost batches; otherwise the input rank with 1 on the
    non-feature axes, and one more 1 at index 1 with ghost batches.
  """
  return _keras_weights.layout(_config_of(layer), input_shape).keras_shape


def variables_from_keras(
  layer: Any,
  weights: Sequence[Any] | Mapping[str, Any],
  input_shape: Sequence[int | None],
) -> dict[str, dict[str, Any]]:
  """Converts a Keras layer's ``get_weights()`` to this layer's variables.

  Args:
    layer: a kbn_jax layer (e.g. from `from_keras_config`) or a `BatchNormConfig`.
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
    ValueError: if the number, names or shapes of the weights do not fit the layer.
  """
  return _keras_weights.variables_from_keras(_config_of(layer), weights, input_shape)


def keras_weights_from_variables(
  layer: Any,
  variables: Mapping[str, Mapping[str, Any]],
  input_shape: Sequence[int | None] | None = None,
) -> list[np.ndarray]:
  """Converts a layer's variables to a Keras ``set_weights()`` list.

  Args:
    layer: a kbn_jax layer or a `BatchNormConfig`.
    variables: its variables, ``{"params": ..., "batch_stats": ...}`` (e.g. the result of
      ``module.init`` or the layer's sub-tree of a model's variables).
    input_shape: the input shape; needed only when Keras's weights have the full input rank
      (several feature axes or ghost batches).

  Returns:
    NumPy arrays in Keras's ``get_weights()`` order and parameter shapes.

  Raises:
    ValueError: for missing variables, or a missing `input_shape` where it is needed.
  """
  return _keras_weights.keras_weights_from_variables(_config_of(layer), variables, input_shape)


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
  shape: list[int | None] = [None] * rank
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
