"""Reads Keras model and weights files, safely and without Keras: the one reader of kbn_jax.

Private, Flax-free (NumPy, plus ``h5py`` imported when a file is read). `kbn_jax.keras_compat`
builds its public loaders on top; nothing else in kbn_jax opens a Keras file.

Formats
-------

* legacy HDF5 model (``.h5``): ``model.save("m.h5")`` of Keras 2.x / tf.keras / tf_keras, and of
  Keras 3 (legacy format). Root attrs ``model_config``, ``keras_version``, ``backend``; weights
  under ``model_weights``, one group per top-level layer (a layer named ``"conv1/conv"`` gets the
  nested group ``conv1/conv``), listed by its ``weight_names`` attr.
* legacy HDF5 weights (``.h5``): ``model.save_weights("w.h5")`` of Keras 2.x / tf_keras; the same
  weight groups at the root, no config.
* ``.keras`` zip: ``model.save("m.keras")`` of tf_keras >= 2.13 and Keras 3; members
  ``metadata.json``, ``config.json``, ``model.weights.h5``.
* ``.weights.h5``: ``model.save_weights("w.weights.h5")`` of tf_keras >= 2.13 and Keras 3, and the
  ``model.weights.h5`` of a ``.keras`` zip. Groups are named after layer *classes*
  (``layers/batch_normalization``, ``layers/batch_normalization_1``, ...: a counter per class and
  container, in the order of the model's layers), variables are ``vars/0`` ... ``vars/n-1``, and a
  nested model nests (``layers/sequential/layers/batch_normalization``). There is no config, so
  layer names come from the model config (``config_path`` / ``model_config``, e.g. the
  ``model.to_json()`` text); Keras 3.15 also records each layer's name as the ``name`` attribute
  of its ``vars`` group, used when present.
* a JSON model config (``model.to_json()``, a ``.keras`` zip's ``config.json``), as
  ``config_path`` or for `read_layer_config`.

Layers are keyed by their own name (``"conv1/conv"`` included); a layer of a nested model (a
Functional or Sequential model used as a layer) is keyed ``"outer/inner"``, and a bare ``"inner"``
also finds it when no other layer has that name. A top-level name equal to a nested path is an
error naming both. Which Keras wrote a layer (V1, V2 or Keras 3) is `kbn_jax._keras_semantics`'s
decision, from the facts collected here (``keras_version`` from the HDF5 attributes,
``metadata.json``, or the top of a ``to_json()`` config; ``backend``; the model's ``module``).

Untrusted files
---------------

A file may have been written by anyone. Nothing from it is executed or deserialized into objects:
configs are parsed as JSON and read as plain dicts (no Lambda, no custom objects, no pickle), and
nothing is extracted to disk (zip members are read by their fixed names into memory). The reader:

* opens only regular files (a FIFO, device or socket is refused before it is opened for reading;
  a directory, a SavedModel one included, gets a message saying what to pass);
* follows HDF5 hard links only, each object reachable by exactly one path (soft and external
  links, objects linked twice and link cycles are refused), and refuses datasets with external
  storage or a virtual layout;
* checks names, counts, dtypes (real numbers; batch-norm weights real floating), shapes and
  storage of every dataset before reading its data, and refuses weight names that are absolute
  or contain ``..``;
* bounds its work by the file's size, with `Limits`: every byte it inflates or allocates (zip
  members, datasets, HDF5 chunks) is charged to a budget of ``expansion`` times the file's size
  (at least ``min_budget_bytes``, at most ``max_budget_bytes``); zip members and filtered HDF5
  datasets must also stay within ``expansion`` times their stored size, and no HDF5 chunk may be
  larger than its dataset; configs are capped in bytes (``max_config_bytes``) and JSON depth
  (``max_json_depth``), models in nesting and layer count, the walk of HDF5 groups in objects
  visited (``max_hdf5_visits``);
* raises `ValueError` (or `TypeError` for a bad argument, `FileNotFoundError` for a missing path)
  naming the file and, where one is being read, the layer; a missing layer raises
  `LayerNotFoundError` (a `KeyError` and a `ValueError`) listing the file's batch-norm layers.

A trusted file larger than the defaults allow is read with a raised limit:
``limits=Limits(max_budget_bytes=64 << 30)`` (`dataclasses.replace(DEFAULT_LIMITS, ...)`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import json
import math
import os
import re
import stat
import struct
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from kbn_jax import _keras_semantics

# Class names read as batch-norm layers (Keras 2 aliases and tf_keras's SyncBatchNormalization).
BATCH_NORM_CLASS_NAMES = frozenset(
  {"BatchNormalization", "BatchNormalizationV1", "BatchNormalizationV2", "SyncBatchNormalization"}
)
# The order of a batch-norm layer's `get_weights()` (absent entries skipped).
WEIGHT_ORDER = (
  "gamma",
  "beta",
  "moving_mean",
  "moving_variance",
  "moving_stddev",
  "renorm_mean",
  "renorm_stddev",
)
SEMANTICS = _keras_semantics.SEMANTICS
MAX_BATCH_NORM_ELEMENTS = 1 << 26  # elements of one batch-norm weight

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_FLOAT_SIZES = (2, 4, 8)
_MAX_RANK = 32


@dataclasses.dataclass(frozen=True)
class Limits:
  """What reading one file may cost; raise them only for files you trust.

  Attributes:
    expansion: bytes the reader may inflate or allocate per byte of the file; also the largest
      ratio of a zip member's or a filtered HDF5 dataset's size to its stored size.
    min_budget_bytes: the budget of a small file (a 1 KB file may still cost this much).
    max_budget_bytes: the budget of any file, however large.
    small_member_bytes: zip members and filtered datasets up to this size skip the ratio check;
      also the largest HDF5 chunk allowed beyond its dataset's own size.
    max_array_bytes: the largest single array.
    max_config_bytes: the largest JSON config (``config.json``, ``model_config``, a JSON file).
    max_json_depth: the deepest nesting of JSON arrays and objects in a config.
    max_model_nesting: the deepest nesting of models used as layers.
    max_layers: the most layers in a model config (nested ones included).
    max_names: the most entries of one name list (``layer_names``, ``weight_names``), and the
      most members of a zip archive.
    max_hdf5_visits: the most HDF5 objects the reader may open or list for one file.
  """

  expansion: int = 100
  min_budget_bytes: int = 256 << 20
  max_budget_bytes: int = 16 << 30
  small_member_bytes: int = 1 << 20
  max_array_bytes: int = 4 << 30
  max_config_bytes: int = 16 << 20
  max_json_depth: int = 200
  max_model_nesting: int = 32
  max_layers: int = 100_000
  max_names: int = 1_000_000
  max_hdf5_visits: int = 2_000_000

  def __post_init__(self) -> None:
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Limits.{field.name} must be a positive int, got {value!r}.")


DEFAULT_LIMITS = Limits()


class LayerNotFoundError(KeyError, ValueError):
  """No such layer in the file (or an ambiguous name): the message lists what the file holds."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True, eq=False)
class KerasBatchNormRecord:
  """One BatchNormalization layer read from a Keras file.

  Attributes:
    name: the layer's key: its name, ``"outer/inner"`` inside a nested model.
    config: the layer's ``get_config()`` dict as saved (``class_name`` unwrapped), a plain dict.
    weights: NumPy arrays in ``get_weights()`` order: gamma (if ``scale``), beta (if
      ``center``), moving_mean, moving_variance, then with renorm moving_stddev, renorm_mean,
      renorm_stddev; in Keras's parameter shape.
    semantics: ``"keras_v1"``, ``"keras_v2"`` or ``"keras3"``: the behaviour the file's layer had.
    semantics_evidence: what in the file decided ``semantics``, as a sentence.
    ambiguous: True when the file cannot tell V1 from V2 (``semantics`` is then a default).
    input_shape: the layer's build input shape when the file records it (``build_config``,
      the inbound tensor's shape, or an input layer's batch shape), with None for unknown
      dimensions; else None.
    class_name: the saved class name (``"BatchNormalization"`` ...).
    file_format: ``"h5"`` (legacy model), ``"h5_weights"`` (legacy ``save_weights``),
      ``"keras"`` (zip) or ``"weights_h5"``.
    weights_path: where the weights are inside the HDF5 file (a group path).
  """

  name: str
  config: dict[str, Any]
  weights: list[np.ndarray]
  semantics: str
  semantics_evidence: str
  ambiguous: bool
  input_shape: tuple[int | None, ...] | None
  class_name: str = "BatchNormalization"
  file_format: str = ""
  weights_path: str = ""


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def read_batch_norm_layers(
  path: str | os.PathLike[str],
  *,
  config_path: str | os.PathLike[str] | None = None,
  model_config: Mapping[str, Any] | str | None = None,
  limits: Limits = DEFAULT_LIMITS,
) -> dict[str, KerasBatchNormRecord]:
  """Reads every BatchNormalization layer of a Keras model file.

  Args:
    path: a legacy ``.h5`` model (``model.save("m.h5")``, Keras 2 or 3), a ``.keras`` zip
      (tf_keras >= 2.13 or Keras 3), or a weights-only file (``.weights.h5`` or a legacy
      ``save_weights`` ``.h5``) together with ``config_path`` or ``model_config``.
    config_path: where the model config is, for weights-only files: the ``.keras`` or ``.h5``
      model file, or a JSON file (``config.json`` of a ``.keras`` zip, ``model.to_json()``).
      Overrides a config that ``path`` holds.
    model_config: the model config itself (``model.get_config()``, ``{"class_name": ...,
      "config": ...}`` or its JSON text), instead of ``config_path``.
    limits: what reading may cost (`Limits`); raise them for a trusted huge file.

  Returns:
    ``{key: KerasBatchNormRecord}`` in the model's layer order; nested layers keyed
    ``"outer/inner"``.

  Raises:
    ImportError: without h5py.
    ValueError: an unreadable, corrupted, truncated, oversized or mismatched file (the message
      names the file and the layer), or a weights-only file without a config.
  """
  with _open_model(path, config_path, model_config, limits) as model:
    if model.layers is None:
      raise ValueError(_no_config_message(model))
    _need_weights(model)
    facts = model.facts()
    records = {}
    for layer in model.layers:
      if layer.class_name in BATCH_NORM_CLASS_NAMES:
        model.current = layer.key
        _check_serialized_objects(layer.config)
        weights, where = _batch_norm_weights(model, layer)
        detection = _keras_semantics.detect(layer.class_name, layer.config, facts)
        records[layer.key] = KerasBatchNormRecord(
          name=layer.key,
          config=copy.deepcopy(dict(layer.config)),
          weights=weights,
          semantics=detection.semantics,
          semantics_evidence=detection.evidence,
          ambiguous=detection.ambiguous,
          input_shape=layer.input_shape,
          class_name=layer.class_name,
          file_format=model.format,
          weights_path=where,
        )
    return records


# The keys Keras writes in a serialized initializer, regularizer or constraint (Keras 2.13+ and
# Keras 3 add module/registered_name; shared objects carry an id).
_SERIALIZED_OBJECT_KEYS = frozenset(
  {"class_name", "config", "module", "registered_name", "shared_object_id"}
)
_OBJECT_SUFFIXES = ("_initializer", "_regularizer", "_constraint")


def _check_serialized_objects(config: Mapping[str, Any]) -> None:
  """Refuses a serialized initializer/regularizer/constraint with a key Keras never writes.

  A damaged byte can turn ``"config"`` into another valid key; read as is, the object would
  silently lose its arguments.
  """
  for argument, value in config.items():
    if isinstance(value, Mapping) and str(argument).endswith(_OBJECT_SUFFIXES):
      unknown = sorted(map(str, set(value) - _SERIALIZED_OBJECT_KEYS))
      if unknown:
        raise ValueError(
          f"`{argument}` has keys {unknown} that Keras never writes (it writes "
          f"{sorted(_SERIALIZED_OBJECT_KEYS)}); the config is damaged or was not written by Keras."
        )


def read_layer_weights(
  path: str | os.PathLike[str],
  layer_name: str,
  *,
  config_path: str | os.PathLike[str] | None = None,
  model_config: Mapping[str, Any] | str | None = None,
  limits: Limits = DEFAULT_LIMITS,
) -> list[np.ndarray]:
  """Reads one layer's weights (any layer: convolutions, dense, batch norm) from a Keras file.

  Batch-norm weights come back in ``get_weights()`` order, checked against the layer's config
  when the file (or ``config_path`` / ``model_config``) has one; other layers' weights in the
  file's order, which is their ``get_weights()`` order.

  Args:
    path: a legacy ``.h5`` model or ``save_weights`` file, a ``.keras`` zip or a ``.weights.h5``
      file.
    layer_name: the layer's name, or ``"outer/inner"`` in a nested model. In a ``.weights.h5``
      file without config, also the group path (``"layers/batch_normalization_1"``).
    config_path: as in `read_batch_norm_layers`; a ``.weights.h5`` file needs it (or
      ``model_config``) to map names to groups, unless Keras recorded layer names in it.
    model_config: as in `read_batch_norm_layers`.
    limits: as in `read_batch_norm_layers`.

  Returns:
    The arrays, in Keras's parameter shapes.

  Raises:
    ImportError: without h5py.
    LayerNotFoundError: no such layer (the message lists the file's BatchNormalization layers).
    ValueError: an unreadable, corrupted, oversized or mismatched file.
  """
  _check_layer_name(layer_name)
  with _open_model(path, config_path, model_config, limits) as model:
    _need_weights(model)
    model.current = layer_name
    if model.layers is not None:
      layer = _find_layer(model, layer_name)
      if layer.class_name in BATCH_NORM_CLASS_NAMES:
        return _batch_norm_weights(model, layer)[0]
      return _layer_weights(model, layer)
    return _weights_without_config(model, layer_name)


def read_layer_config(
  path: str | os.PathLike[str],
  layer_name: str,
  *,
  config_path: str | os.PathLike[str] | None = None,
  model_config: Mapping[str, Any] | str | None = None,
  limits: Limits = DEFAULT_LIMITS,
) -> dict[str, Any]:
  """Reads one layer's serialized config from a Keras model file.

  Args:
    path: a legacy ``.h5`` model, a ``.keras`` zip, a JSON model config, or a weights-only file
      with ``config_path`` / ``model_config``.
    layer_name: the layer's name, or ``"outer/inner"`` in a nested model.
    config_path: as in `read_batch_norm_layers`.
    model_config: as in `read_batch_norm_layers`.
    limits: as in `read_batch_norm_layers`.

  Returns:
    The serialized layer as saved: ``{"class_name": ..., "config": {...}, ...}`` (which
    `kbn_jax.keras_compat.from_keras_config` accepts).

  Raises:
    ImportError: without h5py (for HDF5 files).
    LayerNotFoundError: no such layer, or a weights-only file without a config.
    ValueError: an unreadable or corrupted file.
  """
  _check_layer_name(layer_name)
  with _open_model(path, config_path, model_config, limits, need_weights=False) as model:
    if model.layers is None:
      raise LayerNotFoundError(_no_config_message(model))
    return copy.deepcopy(_find_layer(model, layer_name).entry)


def _check_layer_name(layer_name: Any) -> None:
  if not isinstance(layer_name, str) or not layer_name:
    raise TypeError(f"layer_name must be a non-empty str, got {layer_name!r}.")


def _no_config_message(model: _Model) -> str:
  return (
    f"{model.path} holds no model config ({model.format_description}): it has weights only, so "
    "its layers' names and configs are unknown; pass config_path= (the .keras or .h5 model file, "
    "its config.json, or the model.to_json() text saved to a file) or "
    "model_config=model.get_config()."
  )


# ---------------------------------------------------------------------------------------------
# Opening files
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Layer:
  key: str
  parts: tuple[str, ...]
  entry: dict[str, Any]
  class_name: str
  config: dict[str, Any]
  group: str  # the layer's group in the new (.weights.h5) layout
  input_shape: tuple[int | None, ...] | None


class _Budget:
  """Bytes the reader may still inflate or allocate for one file (see `Limits`)."""

  def __init__(self, name: str, file_size: int, limits: Limits):
    self.name, self.file_size = name, file_size
    scaled = max(limits.expansion * file_size, limits.min_budget_bytes)
    self.total = self.left = min(scaled, limits.max_budget_bytes)

  def charge(self, nbytes: int, what: str) -> None:
    if nbytes > self.left:
      raise ValueError(
        f"{self.name}: {what} needs {nbytes} bytes, beyond what this {self.file_size}-byte file "
        f"may cost ({self.total} bytes in all, {self.left} left; {_RAISE_LIMITS})."
      )
    self.left -= nbytes


_RAISE_LIMITS = (
  "for a file you trust, pass limits=dataclasses.replace(DEFAULT_LIMITS, ...) with a larger "
  "value, see kbn_jax._keras_files.Limits"
)


@dataclasses.dataclass
class _Model:
  path: str
  format: str  # "h5", "h5_weights", "keras", "weights_h5", "json"
  limits: Limits
  budget: _Budget
  h5: Any = None  # the open weights file (h5py.File) or None
  layers: list[_Layer] | None = None
  keras_version: str | None = None
  backend: str | None = None
  model_module: str | None = None
  version_source: str = ""
  current: str = ""  # the layer being read, for error messages
  visits: int = 0
  by_key: dict[str, _Layer] | None = None
  by_short: dict[str, list[_Layer]] | None = None
  legacy_root: Any = None  # the group holding `layer_names`, found once
  legacy_names: dict[str, int] | None = None  # `layer_names`, decoded once, with their order

  @property
  def format_description(self) -> str:
    return {
      "h5": "a legacy HDF5 model file",
      "h5_weights": "a legacy HDF5 weights file written by save_weights",
      "keras": "a .keras zip archive",
      "weights_h5": "a .weights.h5 file written by save_weights of tf_keras >= 2.13 or Keras 3",
      "json": "a JSON model config",
    }[self.format]

  def facts(self) -> _keras_semantics.FileFacts:
    return _keras_semantics.FileFacts(
      keras_version=self.keras_version,
      version_source=self.version_source,
      backend=self.backend,
      model_module=self.model_module,
    )

  def label(self) -> str:
    return f"{self.path}: layer {self.current!r}" if self.current else self.path

  def visit(self) -> None:
    self.visits += 1
    if self.visits > self.limits.max_hdf5_visits:
      raise ValueError(
        f"{self.label()}: more than {self.limits.max_hdf5_visits} HDF5 objects visited; the "
        f"file's groups are not a Keras layout ({_RAISE_LIMITS})."
      )


def _h5py() -> Any:
  try:
    import h5py  # noqa: PLC0415 (optional dependency)
  except ImportError as error:
    raise ImportError(
      "Reading Keras HDF5 and .keras files needs the optional dependency h5py: "
      "`pip install h5py` (or `pip install kbn_jax[keras]`)."
    ) from error
  return h5py


# What h5py, zipfile and the JSON parser raise on damaged or hostile input, wrapped into a
# ValueError naming the file (UnicodeError: undecodable names; KeyError: h5py's missing object;
# RecursionError / OverflowError / MemoryError: structures too deep or large to decode).
_READ_ERRORS = (
  OSError,
  RuntimeError,
  KeyError,
  TypeError,
  zipfile.BadZipFile,
  zipfile.LargeZipFile,
  EOFError,
  UnicodeError,
  RecursionError,
  OverflowError,
  MemoryError,
  AttributeError,
  IndexError,
)


@contextmanager
def _open_model(
  path: Any, config_path: Any, model_config: Any, limits: Limits, need_weights: bool = True
) -> Iterator[_Model]:
  if not isinstance(limits, Limits):
    raise TypeError(f"limits must be a kbn_jax._keras_files.Limits, got {limits!r}.")
  try:
    name = os.fspath(path)
  except TypeError:
    raise TypeError(f"path must be a str or os.PathLike, got {path!r}.") from None
  stack: list[Any] = []
  model = None
  try:
    try:
      model = _open_file(name, stack, need_weights, limits)
      if config_path is not None or model_config is not None:
        _attach_config(model, config_path, model_config, limits)
      yield model
    except (FileNotFoundError, LayerNotFoundError):
      raise
    except ValueError as error:
      if name in str(error) or "config_path" in str(error) or "model_config" in str(error):
        raise
      raise ValueError(f"{_where(name, model)}: {error}") from error
    except _READ_ERRORS as error:
      if isinstance(error, TypeError) and "must be" in str(error):
        raise  # a bad argument, already worded
      raise ValueError(
        f"{_where(name, model)}: cannot be read as a Keras file; it is truncated, corrupted or "
        f"hostile ({_describe(error)})."
      ) from error
  finally:
    for close in reversed(stack):
      try:
        close()
      except Exception:  # noqa: BLE001, S110 (closing a corrupted file may fail again)
        pass


def _where(name: str, model: _Model | None) -> str:
  return model.label() if model is not None else name


def _describe(error: BaseException) -> str:
  text = str(error)
  return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


_SAVED_MODEL = (
  "{name} is a TensorFlow SavedModel directory; kbn_jax does not read SavedModels (their "
  "weights are TensorFlow checkpoint shards and their layers are traced graphs). Load it with "
  "TensorFlow and save it in a Keras format: `model = tf_keras.models.load_model(path)` (or "
  "`tf.keras.models.load_model`), then `model.save('model.keras')` or "
  "`model.save('model.h5', save_format='h5')`, and pass that file."
)


def _open_regular(name: str) -> Any:
  """Opens `name` for reading only if it is a regular file (never blocks on a FIFO)."""
  info = os.stat(name)
  if stat.S_ISDIR(info.st_mode):
    if os.path.exists(os.path.join(name, "saved_model.pb")):
      raise ValueError(_SAVED_MODEL.format(name=name))
    raise ValueError(
      f"{name} is a directory; pass a Keras file (.h5, .keras or .weights.h5), not an unzipped "
      "save."
    )
  if not stat.S_ISREG(info.st_mode):
    raise ValueError(
      f"{name} is not a regular file (a FIFO, socket or device); pass a Keras file on disk."
    )
  fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the check
    os.close(fd)
    raise ValueError(f"{name} is not a regular file.")
  return os.fdopen(fd, "rb")


def _open_file(name: str, stack: list[Any], need_weights: bool, limits: Limits) -> _Model:
  file = _open_regular(name)
  stack.append(file.close)
  size = os.fstat(file.fileno()).st_size
  head = file.read(8)
  file.seek(0)
  budget = _Budget(name, size, limits)
  if head.startswith(_HDF5_SIGNATURE):
    h5py = _h5py()
    h5 = h5py.File(file, "r")
    stack.append(h5.close)
    return _from_h5(name, h5, limits, budget)
  if head.startswith(b"PK"):
    return _from_zip(name, file, stack, need_weights, limits, budget)
  if head.lstrip()[:1] in (b"{", b"["):
    model = _Model(path=name, format="json", limits=limits, budget=budget)
    data = file.read(limits.max_config_bytes + 1)
    if len(data) > limits.max_config_bytes:
      raise ValueError(f"{name}: the JSON config is larger than {limits.max_config_bytes} bytes.")
    _set_config(model, _parse_json(data, name, "the model config", limits), name)
    return model
  raise ValueError(
    f"{name} is not a Keras file: it is neither an HDF5 file (.h5, .weights.h5) nor a zip "
    f"archive (.keras) nor JSON (it starts with {head!r})."
  )


def _from_h5(name: str, file: Any, limits: Limits, budget: _Budget) -> _Model:
  model = _Model(path=name, format="", limits=limits, budget=budget, h5=file)
  _check_object(model, file, "/")
  attrs = file.attrs
  weights_group = _child(model, file, "model_weights")
  weights_attrs = weights_group.attrs if weights_group is not None else {}
  if "model_config" in attrs:
    model.format = "h5"
    text = _read_attr(model, file, "model_config", "`model_config`", limits.max_config_bytes)
    if not isinstance(text, (bytes, str)):
      raise ValueError(f"{name}: the `model_config` attribute is not a string.")
    _set_config(model, _parse_json(text, name, "`model_config`", limits), name)
  elif _has_names(attrs, "layer_names") or _has_names(weights_attrs, "layer_names"):
    model.format = "h5_weights"
  elif any(_child(model, file, k) is not None for k in ("layers", "vars")) or (
    _child(model, file, "_layer_checkpoint_dependencies") is not None
  ):
    model.format = "weights_h5"
  else:
    raise ValueError(
      f"{name} is an HDF5 file but not a Keras model or weights file: it has no "
      "`model_config`/`layer_names` attributes (legacy .h5) and no `layers`/`vars` groups "
      "(.weights.h5)."
    )
  for source in (file, weights_group):
    if source is None:
      continue
    if model.keras_version is None and "keras_version" in source.attrs:
      model.keras_version = _attr_text(_read_attr(model, source, "keras_version", "", 256))[:256]
      model.version_source = "the HDF5 attributes"
    if model.backend is None and "backend" in source.attrs:
      model.backend = _attr_text(_read_attr(model, source, "backend", "", 256))[:64]
  return model


def _zip_entry_count(file: Any, size: int) -> int | None:
  """The entry count of a zip's end record (None for zip64 or when not found), read first."""
  tail = min(size, 22 + 65535)
  file.seek(size - tail)
  data = file.read(tail)
  file.seek(0)
  at = data.rfind(b"PK\x05\x06")
  if at < 0 or len(data) - at < 22:
    return None
  count = struct.unpack("<H", data[at + 10 : at + 12])[0]
  return None if count == 0xFFFF else count


def _from_zip(
  name: str, file: Any, stack: list[Any], need_weights: bool, limits: Limits, budget: _Budget
) -> _Model:
  count = _zip_entry_count(file, budget.file_size)
  if count is not None and count > limits.max_names:
    raise ValueError(
      f"{name}: the zip archive lists {count} members, over the cap of {limits.max_names} "
      f"(a .keras archive has a few; {_RAISE_LIMITS})."
    )
  archive = zipfile.ZipFile(file, "r")
  stack.append(archive.close)
  names = archive.namelist()
  model = _Model(path=name, format="keras", limits=limits, budget=budget)
  if "config.json" not in names:
    raise ValueError(
      f"{name} is a zip archive but not a .keras model: it has no config.json (members: "
      f"{sorted(names)[:10]})."
    )
  counts: dict[str, int] = {}
  for member in names:
    counts[member] = counts.get(member, 0) + 1
  for member in ("config.json", "metadata.json", "model.weights.h5"):
    if counts.get(member, 0) > 1:
      raise ValueError(f"{name}: the zip archive holds {member} more than once.")
  config = _parse_json(
    _read_member(model, archive, "config.json", limits.max_config_bytes), name, "", limits
  )
  _set_config(model, config, name)
  if "metadata.json" in counts:
    data = _read_member(model, archive, "metadata.json", limits.max_config_bytes)
    metadata = _parse_json(data, name, "metadata.json", limits)
    if not isinstance(metadata, Mapping):
      raise ValueError(f"{name}: metadata.json is not a JSON object.")
    version = metadata.get("keras_version")
    if version is not None:
      model.keras_version, model.version_source = str(version)[:256], "metadata.json"
  if not need_weights:
    return model
  if "model.weights.h5" not in counts:
    other = [n for n in names if n.startswith("model.weights")]
    hint = (
      f" It holds {other}: weights saved as .npz or sharded are not supported; re-save with "
      "model.save('m.keras') (the default h5 weights)."
      if other
      else ""
    )
    raise ValueError(f"{name}: the .keras archive has no model.weights.h5 member.{hint}")
  data = _read_member(model, archive, "model.weights.h5", limits.max_budget_bytes)
  if not data.startswith(_HDF5_SIGNATURE):
    raise ValueError(f"{name}: model.weights.h5 inside the archive is not an HDF5 file.")
  h5 = _h5py().File(io.BytesIO(data), "r")
  stack.append(h5.close)
  model.h5 = h5
  _check_object(model, h5, "model.weights.h5")
  return model


def _read_member(model: _Model, archive: zipfile.ZipFile, member: str, cap: int) -> bytes:
  """A zip member's bytes, its declared size and ratio checked before anything is inflated."""
  name, limits = model.path, model.limits
  info = archive.getinfo(member)
  if info.flag_bits & 0x1:
    raise ValueError(f"{name}: {member} is encrypted.")
  if info.compress_type not in _ZIP_METHODS:
    raise ValueError(
      f"{name}: {member} uses the zip compression method {info.compress_type}; Keras writes "
      "stored or deflated members only."
    )
  if info.file_size > cap:
    raise ValueError(f"{name}: {member} declares {info.file_size} bytes, over the cap of {cap}.")
  ratio_cap = max(limits.expansion * info.compress_size, limits.small_member_bytes)
  if info.file_size > ratio_cap:
    raise ValueError(
      f"{name}: {member} declares {info.file_size} bytes from {info.compress_size} compressed, "
      f"a ratio over {limits.expansion}: refusing a zip bomb ({_RAISE_LIMITS})."
    )
  model.budget.charge(info.file_size, f"inflating {member}")
  with archive.open(info) as stream:
    data = stream.read(info.file_size + 1)  # to the end, so the CRC is checked
  if len(data) != info.file_size:
    raise ValueError(f"{name}: {member} is not the size its header declares.")
  return data


def _parse_json(data: bytes | str, name: str, what: str, limits: Limits) -> Any:
  label = f"{what} " if what else ""
  where = f"{label}in {name}" if what else f"{name} (config.json)"
  if len(data) > limits.max_config_bytes:
    raise ValueError(f"The JSON {where} is larger than {limits.max_config_bytes} bytes.")
  try:
    value = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
  except RecursionError:
    raise ValueError(f"The JSON {where} is nested deeper than the parser follows.") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f"Malformed JSON {where}: {_describe(error)}.") from error
  _check_json_depth(value, limits.max_json_depth, where)
  return value


def _check_json_depth(value: Any, max_depth: int, where: str) -> None:
  """Refuses JSON nested deeper than `max_depth` (iteratively: no recursion to exhaust)."""
  stack = [(value, 1)]
  while stack:
    item, depth = stack.pop()
    if not isinstance(item, (dict, list)):
      continue
    children = item.values() if isinstance(item, dict) else item
    if depth > max_depth:
      raise ValueError(
        f"The JSON {where} is nested deeper than {max_depth} levels; no Keras config is "
        f"({_RAISE_LIMITS})."
      )
    stack.extend((child, depth + 1) for child in children)


def _attr_text(value: Any) -> str:
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value[()]
  return value.decode("utf8", "replace") if isinstance(value, bytes) else str(value)


def _set_config(model: _Model, config: Any, name: str) -> None:
  """The model's layers and module from a model config, and the version facts on its top."""
  model.layers, model.model_module = _layers_from_config(config, name, model.limits)
  model.by_key = {layer.key: layer for layer in model.layers}
  model.by_short = {}
  for layer in model.layers:
    model.by_short.setdefault(layer.parts[-1], []).append(layer)
  if isinstance(config, Mapping):  # model.to_json() writes keras_version and backend on top
    version, backend = config.get("keras_version"), config.get("backend")
    if model.keras_version is None and isinstance(version, str):
      model.keras_version, model.version_source = version[:256], "the model config's JSON"
    if model.backend is None and isinstance(backend, str):
      model.backend = backend[:64]


def _attach_config(model: _Model, config_path: Any, model_config: Any, limits: Limits) -> None:
  if config_path is not None and model_config is not None:
    raise ValueError("Pass config_path or model_config, not both.")
  if model_config is not None:
    if isinstance(model_config, (str, bytes)):
      model_config = _parse_json(model_config, "model_config", "the argument", limits)
    elif isinstance(model_config, Mapping):
      _check_json_depth(model_config, limits.max_json_depth, "model_config")
    _set_config(model, model_config, "model_config")
    if model.version_source == "the model config's JSON":
      model.version_source = "model_config"
    return
  try:
    source = os.fspath(config_path)
  except TypeError:
    raise TypeError(f"config_path must be a str or os.PathLike, got {config_path!r}.") from None
  with _open_model(source, None, None, limits, need_weights=False) as other:
    if other.layers is None:
      raise ValueError(f"config_path={source} holds no model config ({other.format_description}).")
    model.layers, model.model_module = other.layers, other.model_module
    model.by_key, model.by_short = other.by_key, other.by_short
    if model.keras_version is None and other.keras_version is not None:
      model.keras_version = other.keras_version
      model.version_source = f"{other.version_source} of {source}"
    if model.backend is None:
      model.backend = other.backend


# ---------------------------------------------------------------------------------------------
# Model configs
# ---------------------------------------------------------------------------------------------
def _layers_from_config(config: Any, name: str, limits: Limits) -> tuple[list[_Layer], str | None]:
  """The model's layers (recursing into nested models), keyed and mapped to weight groups."""
  if not isinstance(config, Mapping):
    raise ValueError(f"{name}: the model config is not a JSON object.")
  module = config.get("module")
  inner = config.get("config") if "class_name" in config else config
  if not isinstance(inner, Mapping) or not isinstance(inner.get("layers"), list):
    raise ValueError(
      f"{name}: the model config has no list of layers (a Functional or Sequential model's "
      "config is needed; subclassed models are not supported)."
    )
  tf_keras_naming = isinstance(module, str) and (
    module.startswith("tf_keras") or module.startswith("keras.src.engine")
  )
  layers: list[_Layer] = []
  _walk(inner, (), "layers", layers, name, tf_keras_naming, 0, limits)
  seen: dict[str, _Layer] = {}
  for layer in layers:
    other = seen.get(layer.key)
    if other is not None:
      if other.parts == layer.parts:
        raise ValueError(f"{name}: the model config has two layers keyed {layer.key!r}.")
      raise ValueError(
        f"{name}: the layer {_describe_parts(other.parts)} and the layer "
        f"{_describe_parts(layer.parts)} are both keyed {layer.key!r}; the file cannot be read "
        "unambiguously (rename one of them in Keras and save again)."
      )
    seen[layer.key] = layer
  return layers, module if isinstance(module, str) else None


def _describe_parts(parts: tuple[str, ...]) -> str:
  if len(parts) == 1:
    return f"{parts[0]!r} (top level)"
  return f"{parts[-1]!r} inside the nested model {'/'.join(parts[:-1])!r}"


def _walk(
  model_cfg: Mapping[str, Any],
  prefix: tuple[str, ...],
  group_prefix: str,
  out: list[_Layer],
  name: str,
  tf_keras_naming: bool,
  depth: int,
  limits: Limits,
) -> None:
  if depth > limits.max_model_nesting:
    raise ValueError(f"{name}: models nested deeper than {limits.max_model_nesting} levels.")
  entries = model_cfg["layers"]
  by_name = {}
  for entry in entries:
    if isinstance(entry, Mapping) and isinstance(entry.get("config"), Mapping):
      n = entry["config"].get("name", entry.get("name"))
      if isinstance(n, str):
        by_name[n] = entry
  used: dict[str, int] = {}
  previous = None
  for index, entry in enumerate(entries):
    where = f"{name}: layer {index} of {'/'.join(prefix) or 'the model'}"
    if not isinstance(entry, Mapping) or not isinstance(entry.get("class_name"), str):
      raise ValueError(f"{where} has no class_name.")
    config = entry.get("config")
    if not isinstance(config, Mapping):
      raise ValueError(f"{where} ({entry['class_name']}) has no config object.")
    layer_name = config.get("name", entry.get("name"))
    if not _valid_layer_name(layer_name):
      raise ValueError(f"{where} ({entry['class_name']}) has an invalid name {layer_name!r}.")
    class_name = entry["class_name"]
    snake = _snake_case(class_name, tf_keras_naming)
    count = used.get(snake)
    used[snake] = 0 if count is None else count + 1
    group = f"{group_prefix}/{snake if count is None else f'{snake}_{count + 1}'}"
    parts = (*prefix, layer_name)
    if isinstance(config.get("layers"), list):
      _walk(config, parts, f"{group}/layers", out, name, tf_keras_naming, depth + 1, limits)
    else:
      if len(out) >= limits.max_layers:
        raise ValueError(f"{name}: the model config has more than {limits.max_layers} layers.")
      shape = _input_shape(entry, config, previous, by_name, model_cfg)
      out.append(
        _Layer(
          key="/".join(parts),
          parts=parts,
          entry=dict(entry),
          class_name=class_name,
          config=dict(config),
          group=group,
          input_shape=shape,
        )
      )
    previous = entry


def _valid_layer_name(name: Any) -> bool:
  """A Keras layer name as an HDF5 path: '/' separates groups, but no empty or '..' part."""
  if not isinstance(name, str) or not name or len(name) > 1024:
    return False
  return not any(p in ("", ".", "..") for p in name.split("/"))


def _snake_case(class_name: str, tf_keras_naming: bool) -> str:
  """Keras's group name for a class (tf_keras's and Keras 3's rules differ only in corners)."""
  if tf_keras_naming:
    text = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    text = re.sub("([a-z])([A-Z])", r"\1_\2", text).lower()
    return text if not text.startswith("_") else "private" + text
  text = re.sub(r"\W+", "", class_name)
  text = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", text)
  return re.sub("([a-z])([A-Z])", r"\1_\2", text).lower()


def _shape(value: Any) -> tuple[int | None, ...] | None:
  if isinstance(value, list) and 0 < len(value) <= _MAX_RANK:
    if all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in value):
      return tuple(value)
  return None


def _input_shape(
  entry: Mapping[str, Any],
  config: Mapping[str, Any],
  previous: Any,
  by_name: Mapping[str, Any],
  model_cfg: Mapping[str, Any],
) -> tuple[int | None, ...] | None:
  build = entry.get("build_config")
  if isinstance(build, Mapping) and _shape(build.get("input_shape")):
    return _shape(build.get("input_shape"))
  for key in ("batch_input_shape", "batch_shape"):
    if _shape(config.get(key)):
      return _shape(config.get(key))
  nodes = entry.get("inbound_nodes")
  if isinstance(nodes, list) and len(nodes) >= 1:
    node = nodes[0]
    if isinstance(node, Mapping):  # Keras 3: the inbound KerasTensor records its shape
      args = node.get("args")
      if isinstance(args, list) and args and isinstance(args[0], Mapping):
        tensor = args[0].get("config")
        if isinstance(tensor, Mapping) and _shape(tensor.get("shape")):
          return _shape(tensor.get("shape"))
    elif isinstance(node, list) and node and isinstance(node[0], list) and node[0]:
      inbound = (
        by_name.get(node[0][0]) if isinstance(node[0][0], str) else None
      )  # Keras 2: [[layer_name, node, tensor, kwargs]]
      if inbound is not None and inbound.get("class_name") == "InputLayer":
        return _input_layer_shape(inbound)
  if nodes is None and isinstance(previous, Mapping):  # Sequential
    if previous.get("class_name") == "InputLayer":
      return _input_layer_shape(previous)
  if nodes is None and previous is None and _shape(model_cfg.get("build_input_shape")):
    return _shape(model_cfg.get("build_input_shape"))
  return None


def _input_layer_shape(entry: Mapping[str, Any]) -> tuple[int | None, ...] | None:
  config = entry.get("config")
  if isinstance(config, Mapping):
    for key in ("batch_input_shape", "batch_shape"):
      if _shape(config.get(key)):
        return _shape(config.get(key))
  return None


def _find_layer(model: _Model, layer_name: str) -> _Layer:
  assert model.layers is not None and model.by_key is not None and model.by_short is not None
  layer = model.by_key.get(layer_name)
  if layer is not None:
    return layer
  matches = model.by_short.get(layer_name, [])
  if len(matches) == 1:
    return matches[0]
  if model.format in ("keras", "weights_h5") and not matches:
    group = layer_name.strip("/")
    matches_group = [la for la in model.layers if la.group == group]
    if len(matches_group) == 1:
      return matches_group[0]
  if matches:
    raise LayerNotFoundError(
      f"{model.path}: the name {layer_name!r} is ambiguous: "
      f"{[la.key for la in matches]}; pass the full key."
    )
  batch_norms = [la.key for la in model.layers if la.class_name in BATCH_NORM_CLASS_NAMES]
  raise LayerNotFoundError(
    f"{model.path}: no layer named {layer_name!r}. BatchNormalization layers in the file: "
    f"{_some(batch_norms)} (nested layers are keyed 'outer/inner'); {len(model.layers)} layers "
    "in all."
  )


def _some(names: list[str], n: int = 50) -> str:
  return f"{names[:n]}" + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------
# HDF5 access: hard links only, each object once, everything checked before data is read
# ---------------------------------------------------------------------------------------------
def _check_object(model: _Model, obj: Any, where: str) -> None:
  """Refuses an object reachable by more than one path (hard-link cycles and diamonds)."""
  h5py = _h5py()
  if h5py.h5o.get_info(obj.id).rc != 1:
    raise ValueError(
      f"{model.label()}: the HDF5 object {where!r} is linked from more than one place; Keras "
      "never writes that, and a hostile file uses it to make a small file look endless."
    )


def _child(model: _Model, group: Any, key: str, where: str = "") -> Any:
  """The object a group links to under one name, through a hard link only; None if absent."""
  h5py = _h5py()
  model.visit()
  if not isinstance(group, h5py.Group):
    return None
  raw = key.encode("utf8")
  if not group.id.links.exists(raw):
    return None
  kind = group.id.links.get_info(raw).type
  if kind != h5py.h5l.TYPE_HARD:
    name = {h5py.h5l.TYPE_SOFT: "SoftLink", h5py.h5l.TYPE_EXTERNAL: "ExternalLink"}.get(
      kind, "user-defined link"
    )
    raise ValueError(
      f"{model.label()}: refusing the {name} at {where or key!r} (only hard links are read)."
    )
  obj = group[key]
  _check_object(model, obj, where or key)
  return obj


def _get(model: _Model, parent: Any, path: str, want: str) -> Any:
  """A group or dataset below `parent` by a relative path, through hard links only."""
  h5py = _h5py()
  parts = path.split("/")
  if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
    raise ValueError(f"{model.label()}: refusing the HDF5 path {path!r} (absolute or with '..').")
  node = parent
  for part in parts:
    node = _child(model, node, part, path)
    if node is None:
      return None
  kind = h5py.Group if want == "group" else h5py.Dataset
  if not isinstance(node, kind):
    raise ValueError(f"{model.label()}: {path!r} is not an HDF5 {want}.")
  return node


def _read_attr(model: _Model, obj: Any, key: str, what: str, max_bytes: int) -> Any:
  """An attribute's value, its size checked before it is read."""
  attr = obj.attrs.get_id(key)
  stored = attr.get_storage_size()
  if stored > max_bytes:
    raise ValueError(f"{model.label()}: the attribute {what or key!r} holds {stored} bytes.")
  model.budget.charge(stored, f"the attribute {what or key!r}")
  return obj.attrs[key]


def _has_names(attrs: Any, key: str) -> bool:
  return key in attrs or f"{key}0" in attrs


def _names_attr(model: _Model, obj: Any, key: str, where: str) -> list[str]:
  """A list-of-names attribute (``layer_names``, ``weight_names``), its count checked first.

  Keras splits a list over 64 KB into ``layer_names0``, ``layer_names1``, ...: read in order.
  """
  if key in obj.attrs:
    return _names_chunk(model, obj, key, where, 0)
  names: list[str] = []
  index = 0
  while f"{key}{index}" in obj.attrs:
    model.visit()
    names += _names_chunk(model, obj, f"{key}{index}", where, len(names))
    index += 1
  return names


def _names_chunk(model: _Model, obj: Any, key: str, where: str, before: int) -> list[str]:
  attr = obj.attrs.get_id(key)
  count = math.prod(attr.shape) if attr.shape is not None else 0
  if before + count > model.limits.max_names:
    raise ValueError(
      f"{model.label()}: `{key}` of {where!r} lists {count} names, over the cap of "
      f"{model.limits.max_names} ({_RAISE_LIMITS})."
    )
  if not count:
    return []
  if attr.dtype.kind not in "SUO":
    raise ValueError(f"{model.label()}: `{key}` of {where!r} is not a list of names.")
  value = _read_attr(model, obj, key, f"{key} of {where}", model.budget.left)
  names = [
    n.decode("utf8", "replace") if isinstance(n, bytes) else str(n)
    for n in np.asarray(value).ravel().tolist()
  ]
  model.budget.charge(sum(len(n) for n in names), f"the names of `{key}` of {where!r}")
  return names


@dataclasses.dataclass(frozen=True)
class _Planned:
  """A dataset checked and charged, ready to be read."""

  dataset: Any
  what: str
  shape: tuple[int, ...]
  dtype: np.dtype
  bfloat16: bool


def _plan(
  model: _Model, dataset: Any, what: str, kinds: str, max_elements: int | None = None
) -> _Planned:
  """Checks a dataset's storage, dtype and shape and charges its cost, before any data is read."""
  h5py, limits, label = _h5py(), model.limits, f"{model.label()}: {what}"
  layout = dataset.id.get_create_plist().get_layout()
  if dataset.external or layout not in (h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED):
    kind = "external storage" if dataset.external else "a virtual layout"
    raise ValueError(f"{label} has {kind}; refusing to read data from outside the file.")
  shape = dataset.shape
  if shape is None:
    raise ValueError(f"{label} is an empty (null) dataset.")
  try:
    dtype = dataset.dtype
  except (TypeError, ValueError) as error:
    raise ValueError(f"{label} has an HDF5 type NumPy cannot hold ({error}).") from error
  tag = _read_attr(model, dataset, "dtype", "", 64) if "dtype" in dataset.attrs else None
  bfloat16 = tag is not None and _attr_text(tag) == "bfloat16"
  if bfloat16 and (dtype.kind not in "ui" or dtype.itemsize != 2):
    raise ValueError(f"{label} is marked bfloat16 but has the dtype {dtype}.")
  if not bfloat16:
    if dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
      allowed = "a real floating" if kinds == "f" else "a real numeric"
      raise ValueError(f"{label} has the dtype {dtype}, not {allowed} type.")
    if dtype.kind == "f" and dtype.itemsize not in _FLOAT_SIZES:
      raise ValueError(f"{label} has the dtype {dtype}; float16, float32 or float64 expected.")
  if len(shape) > _MAX_RANK:
    raise ValueError(f"{label} has rank {len(shape)}.")
  size = math.prod(shape)
  if max_elements is not None and size > max_elements:
    raise ValueError(f"{label} has {size} elements, over the cap of {max_elements}.")
  nbytes = size * dtype.itemsize
  if nbytes > limits.max_array_bytes:
    raise ValueError(
      f"{label} declares {nbytes} bytes, over the cap of {limits.max_array_bytes} "
      f"({_RAISE_LIMITS})."
    )
  cost = nbytes
  if layout == h5py.h5d.CHUNKED:
    chunk_bytes = math.prod(dataset.chunks) * dtype.itemsize
    if chunk_bytes > max(nbytes, limits.small_member_bytes):
      raise ValueError(
        f"{label} is stored in chunks of {chunk_bytes} bytes, larger than the dataset "
        f"({nbytes} bytes): inflating one would cost more than the data."
      )
    filtered = dataset.id.get_create_plist().get_nfilters() > 0
    stored = dataset.id.get_storage_size()
    if filtered and nbytes > max(limits.expansion * stored, limits.small_member_bytes):
      raise ValueError(
        f"{label} declares {nbytes} bytes from {stored} stored, a compression ratio over "
        f"{limits.expansion}: refusing a decompression bomb ({_RAISE_LIMITS})."
      )
    cost += chunk_bytes if filtered else 0
  model.budget.charge(cost, what)
  return _Planned(dataset, what, tuple(shape), dtype, bfloat16)


def _read(model: _Model, planned: _Planned) -> np.ndarray:
  array = np.empty(planned.shape, planned.dtype.newbyteorder("="))
  if array.size:
    planned.dataset.read_direct(array)
  if planned.bfloat16:  # Keras 3 writes bfloat16 as 2-byte values tagged with a `dtype` attribute
    bits = array.view(np.uint16).astype(np.uint32) << 16
    array = bits.view(np.float32)
  return array


def _legacy_root(model: _Model) -> Any:
  if model.legacy_root is not None:
    return model.legacy_root
  weights_group = _child(model, model.h5, "model_weights")
  root = model.h5 if weights_group is None else weights_group
  if not isinstance(root, _h5py().Group) or not _has_names(root.attrs, "layer_names"):
    raise ValueError(
      f"{model.path}: the legacy HDF5 weights have no `layer_names` attribute; the file is "
      "truncated or not written by Keras."
    )
  model.legacy_root = root
  return root


def _legacy_layer_names(model: _Model, root: Any) -> dict[str, int]:
  """`layer_names`, decoded once per file: {name: position}."""
  if model.legacy_names is None:
    names = _names_attr(model, root, "layer_names", "the weights root")
    model.legacy_names = {}
    for i, n in enumerate(names):
      model.legacy_names.setdefault(n, i)
  return model.legacy_names


def _weight_names(model: _Model, group: Any, where: str) -> list[str]:
  if not _has_names(group.attrs, "weight_names"):
    raise ValueError(f"{model.path}: the group {where!r} has no `weight_names` attribute.")
  names = _names_attr(model, group, "weight_names", where)
  for n in names:
    if not n or n.startswith("/") or any(p in ("", ".", "..") for p in n.split("/")):
      raise ValueError(f"{model.label()}: refusing the weight name {n!r} in {where!r}.")
  if len(set(names)) != len(names):
    twice = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    raise ValueError(f"{model.label()}: {where!r} lists the weights {twice} more than once.")
  return names


def _short_name(weight_name: str) -> str:
  return weight_name.split("/")[-1].split(":")[0]


def _owner(weight_name: str) -> str:
  """The layer path a legacy weight name starts with: ``"a/b/gamma:0"`` -> ``"a/b"``."""
  return weight_name.rsplit("/", 1)[0] if "/" in weight_name else ""


def _owned_by(weight_name: str, layer: str) -> bool:
  owner = _owner(weight_name)
  return owner == layer or owner.endswith("/" + layer)


def _legacy_weight_entries(
  model: _Model, parts: tuple[str, ...]
) -> tuple[Any, list[str], str] | None:
  """(group, [weight names], top) of a layer in a legacy HDF5 file; None if absent."""
  root = _legacy_root(model)
  top = parts[0]
  if top not in _legacy_layer_names(model, root):
    return None
  group = _get(model, root, top, "group")
  if group is None:
    raise ValueError(f"{model.path}: `layer_names` lists {top!r}, but it has no group.")
  names = _weight_names(model, group, top)
  if len(parts) == 1:
    return group, names, top
  inner = [n for n in names if _owned_by(n, parts[-1])]
  shorts = [_short_name(n) for n in inner]
  if len(set(shorts)) != len(shorts):  # same inner name in two nested models: use the path
    path = "/".join(parts[1:])
    inner = [n for n in inner if _owner(n) == path or _owner(n).endswith("/" + path)]
    shorts = [_short_name(n) for n in inner]
    if len(set(shorts)) != len(shorts):
      raise ValueError(
        f"{model.path}: layer {'/'.join(parts)!r}: the weight names of {top!r} cannot tell "
        f"this layer from another of the same name: {inner}."
      )
  return group, inner, top


def _plan_legacy(
  model: _Model, group: Any, names: list[str], where: str, kinds: str, cap: int | None = None
) -> list[_Planned]:
  plans = []
  for n in names:
    dataset = _get(model, group, n, "dataset")
    if dataset is None:
      raise ValueError(
        f"{model.path}: weight {n!r} of {where!r} is listed in `weight_names` but missing."
      )
    plans.append(_plan(model, dataset, f"weight {n!r} of {where!r}", kinds, cap))
  return plans


def _new_vars(model: _Model, group_path: str) -> Any:
  """The `vars` group of a layer in the new layout; None when the layer has no group."""
  root = model.h5
  group = _get(model, root, group_path, "group")
  if group is None and group_path.startswith("layers/"):
    group = _get(model, root, "_layer_checkpoint_dependencies" + group_path[6:], "group")
  if group is None:
    return None
  found = _child(model, group, "vars", f"{group_path}/vars")
  if found is None:
    return {}
  if not isinstance(found, _h5py().Group):
    raise ValueError(f"{model.label()}: {group_path}/vars is not an HDF5 group.")
  return found


def _plan_vars(
  model: _Model, vars_group: Any, where: str, kinds: str, cap: int | None = None
) -> list[_Planned]:
  if not vars_group:
    return []
  count = len(vars_group)
  if count > model.limits.max_names:
    raise ValueError(f"{model.path}: {where}: {count} variables, over the cap.")
  keys = list(vars_group.keys())
  expected = [str(i) for i in range(count)]
  if sorted(keys, key=lambda k: (len(k), k)) != expected:
    raise ValueError(
      f"{model.path}: {where}: the variables are named {_some(sorted(keys), 10)}, expected "
      f"{_some(expected, 10)}."
    )
  plans = []
  for k in expected:
    dataset = _get(model, vars_group, k, "dataset")
    if dataset is None:
      raise ValueError(f"{model.path}: {where}: variable {k} cannot be opened.")
    plans.append(_plan(model, dataset, f"{where} variable {k}", kinds, cap))
  return plans


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
_NUMERIC = "fiu"  # weights of any layer: real numbers (Keras 3 seed states are integers)


def _expected_weight_names(layer: _Layer, model: _Model) -> list[str]:
  config = layer.config
  flags = {}
  for key, default in (("center", True), ("scale", True), ("renorm", False)):
    value = config.get(key, default)
    if not isinstance(value, bool):
      raise ValueError(
        f"{model.path}: layer {layer.key!r}: `{key}` is {value!r} in the config, not a bool."
      )
    flags[key] = value
  names = (["gamma"] if flags["scale"] else []) + (["beta"] if flags["center"] else [])
  names += ["moving_mean", "moving_variance"]
  if flags["renorm"]:
    names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
  return names


def _batch_norm_weights(model: _Model, layer: _Layer) -> tuple[list[np.ndarray], str]:
  expected = _expected_weight_names(layer, model)
  label = f"{model.path}: layer {layer.key!r}"
  flags = (
    f"(center={layer.config.get('center', True)}, scale={layer.config.get('scale', True)}, "
    f"renorm={layer.config.get('renorm', False)})"
  )
  if model.format in ("h5", "h5_weights"):
    found = _legacy_weight_entries(model, layer.parts)
    if found is None:
      raise ValueError(f"{label}: the file has no weights for it (no group {layer.parts[0]!r}).")
    group, names, top = found
    by_short: dict[str, str] = {}
    for n in names:
      short = _short_name(n)
      if short in by_short:
        raise ValueError(f"{label}: the file holds two weights named {short!r}.")
      by_short[short] = n
    if sorted(by_short) != sorted(expected):
      raise ValueError(
        f"{label}: the file holds the weights {_some(sorted(by_short), 10)}, but its config "
        f"{flags} needs {expected}."
      )
    ordered = [by_short[n] for n in expected]
    plans = _plan_legacy(model, group, ordered, top, "f", MAX_BATCH_NORM_ELEMENTS)
    where = group.name.lstrip("/")
  else:
    vars_group = _new_vars(model, layer.group)
    if vars_group is None:
      raise ValueError(
        f"{label}: the weights file has no group {layer.group!r}; the config does not match "
        "the weights file (or the model is subclassed)."
      )
    _check_group_name(model, vars_group, layer)
    count = len(vars_group) if vars_group else 0
    if count != len(expected):
      raise ValueError(
        f"{label}: {layer.group} holds {count} variables, but the layer's config {flags} "
        f"needs {len(expected)}: {expected}."
      )
    plans = _plan_vars(
      model, vars_group, f"layer {layer.key!r} ({layer.group})", "f", MAX_BATCH_NORM_ELEMENTS
    )
    where = layer.group
  _check_batch_norm_shapes(label, layer, expected, [p.shape for p in plans])
  return [_read(model, p) for p in plans], where


def _check_group_name(model: _Model, vars_group: Any, layer: _Layer) -> None:
  if hasattr(vars_group, "attrs") and "name" in vars_group.attrs:
    recorded = _attr_text(_read_attr(model, vars_group, "name", "", 4096))
    if recorded != layer.parts[-1]:
      raise ValueError(
        f"{model.path}: the group {layer.group!r} holds the layer {recorded!r}, but the model "
        f"config puts {layer.key!r} there: the config does not belong to this weights file."
      )


def _check_batch_norm_shapes(
  label: str, layer: _Layer, names: list[str], shapes: list[tuple[int, ...]]
) -> None:
  if len(set(shapes)) != 1:
    raise ValueError(
      f"{label}: its weights have different shapes "
      f"{dict(zip(names, shapes, strict=True))}; they must share the parameter shape."
    )
  shape = shapes[0]
  if not shape or 0 in shape:
    raise ValueError(f"{label}: its weights have the empty shape {shape}.")
  axes = _axes(layer.config)
  single = axes is not None and len(axes) == 1 and not layer.config.get("virtual_batch_size")
  if single and len(shape) != 1:
    raise ValueError(f"{label}: its weights have the shape {shape}; with one axis, (C,) expected.")
  if layer.input_shape is not None and axes is not None:
    rank = len(layer.input_shape)
    if any(a >= rank or a < -rank for a in axes):
      raise ValueError(f"{label}: axis {axes} is out of range for the input {layer.input_shape}.")
    dims = [layer.input_shape[a] for a in axes]
    known = [d for d in dims if d is not None]
    if len(known) == len(dims) and math.prod(shape) != math.prod(known):
      raise ValueError(
        f"{label}: its weights have the shape {shape}, but the input {layer.input_shape} has "
        f"{tuple(dims)} features on axis {axes}."
      )


def _axes(config: Mapping[str, Any]) -> list[int] | None:
  axis = config.get("axis", -1)
  values = axis if isinstance(axis, list) else [axis]
  if values and all(isinstance(a, int) and not isinstance(a, bool) for a in values):
    return values
  return None


def _need_weights(model: _Model) -> None:
  if model.format == "json":
    raise ValueError(
      f"{model.path} is a JSON model config and holds no weights; pass the weights file as the "
      "path and this file as config_path=."
    )


def _layer_weights(model: _Model, layer: _Layer) -> list[np.ndarray]:
  if model.format in ("h5", "h5_weights"):
    found = _legacy_weight_entries(model, layer.parts)
    if found is None:
      return []
    group, names, top = found
    plans = _plan_legacy(model, group, names, top, _NUMERIC)
  else:
    vars_group = _new_vars(model, layer.group)
    if vars_group is None:
      return []
    _check_group_name(model, vars_group, layer)
    plans = _plan_vars(model, vars_group, f"layer {layer.key!r} ({layer.group})", _NUMERIC)
  return [_read(model, p) for p in plans]


def _weights_without_config(model: _Model, layer_name: str) -> list[np.ndarray]:
  if model.format == "h5_weights":
    return _legacy_weights_by_name(model, layer_name)
  # .weights.h5: a group path, or a layer name recorded by Keras in the `vars` groups.
  path = layer_name.strip("/")
  if "/" in path and _valid_layer_name(path):
    vars_group = _new_vars(model, path)
    if vars_group is not None:
      return [_read(model, p) for p in _plan_vars(model, vars_group, f"group {path!r}", _NUMERIC)]
  named = _named_groups(model)
  matches = [p for key, p in named if key == layer_name] or [
    p for key, p in named if key.split("/")[-1] == layer_name
  ]
  if len(matches) == 1:
    vars_group = _new_vars(model, matches[0])
    plans = _plan_vars(model, vars_group, f"layer {layer_name!r} ({matches[0]})", _NUMERIC)
    return [_read(model, p) for p in plans]
  if len(matches) > 1:
    raise LayerNotFoundError(
      f"{model.path}: the name {layer_name!r} is ambiguous: groups {matches}; pass a group path."
    )
  groups = [p for p, _ in _groups_with_vars(model)]
  batch_norm_groups = [p for p in groups if re.search(r"(^|/)batch_normalization(_\d+)?$", p)]
  recorded = [key for key, _ in named]
  raise LayerNotFoundError(
    f"{model.path}: no layer {layer_name!r} found. This {model.format_description} holds no "
    "model config, so layer names need config_path= (the .keras or .h5 model file, its "
    "config.json or model.to_json() text) or model_config=model.get_config(); or pass a group "
    f"path. BatchNormalization groups in the file: {_some(batch_norm_groups)}"
    + (f"; layer names recorded in it: {_some(recorded)}." if recorded else ".")
  )


def _groups_with_vars(model: _Model) -> list[tuple[str, Any]]:
  """(path, vars group) of every group with a `vars` child, in file order, within budgets."""
  out = []
  h5py = _h5py()
  depth_cap = 2 * model.limits.max_model_nesting + 2

  def visit(group: Any, path: str, depth: int) -> None:
    if depth > depth_cap:
      raise ValueError(f"{model.path}: groups nested deeper than {depth_cap} levels.")
    for key in group:
      child = _child(model, group, key, f"{path}/{key}")
      if not isinstance(child, h5py.Group):
        continue
      if key == "vars":
        out.append((path, child))
      else:
        visit(child, f"{path}/{key}", depth + 1)

  for top in ("layers", "_layer_checkpoint_dependencies"):
    group = _child(model, model.h5, top)
    if isinstance(group, h5py.Group):
      visit(group, top, 0)
  return out


def _named_groups(model: _Model) -> list[tuple[str, str]]:
  """(key, group path) from the layer names Keras 3 records on `vars` groups."""
  names = {}
  for path, vars_group in _groups_with_vars(model):
    if "name" in vars_group.attrs:
      names[path] = _attr_text(_read_attr(model, vars_group, "name", "", 4096))
  out = []
  for path in names:
    if not path.startswith(("layers/", "_layer_checkpoint_dependencies/")):
      continue
    # Ancestors that are layers: every other component from the top, ".../layers/<group>".
    components = path.split("/")
    chain = ["/".join(components[: i + 1]) for i in range(1, len(components), 2)]
    if any(c not in names for c in chain):
      continue
    out.append(("/".join(names[c] for c in chain), path))
  return out


def _legacy_weights_by_name(model: _Model, layer_name: str) -> list[np.ndarray]:
  root = _legacy_root(model)
  layer_names = _legacy_layer_names(model, root)
  found = None
  if layer_name in layer_names:  # a top-level layer, "/" in its name or not
    found = _legacy_weight_entries(model, (layer_name,))
  else:
    components = layer_name.split("/")
    for i in range(1, len(components)):  # "outer/inner", with "/" in either name
      outer, inner = "/".join(components[:i]), "/".join(components[i:])
      if outer in layer_names:
        found = _legacy_weight_entries(model, (outer, inner))
        break
    if found is None:  # a bare inner name
      hits = []
      for top in layer_names:
        group = _get(model, root, top, "group")
        if group is None:
          continue
        if any(_owned_by(n, layer_name) for n in _weight_names(model, group, top)):
          hits.append(top)
      if len(hits) > 1:
        raise LayerNotFoundError(
          f"{model.path}: the name {layer_name!r} is ambiguous: it is inside {_some(hits)}; "
          "pass 'outer/inner'."
        )
      if hits:
        found = _legacy_weight_entries(model, (hits[0], layer_name))
  if found is None or (not found[1] and layer_name not in layer_names):
    raise LayerNotFoundError(_legacy_not_found(model, root, layer_name))
  group, names, top = found
  plans = _plan_legacy(model, group, names, top, _NUMERIC)
  shorts = [_short_name(n) for n in names]
  if all(s in WEIGHT_ORDER for s in shorts) and len(set(shorts)) == len(shorts):
    order = sorted(range(len(names)), key=lambda i: WEIGHT_ORDER.index(shorts[i]))
    plans = [plans[i] for i in order]
    if "moving_mean" in shorts:
      _check_same_float_shape(model, layer_name, plans)
  return [_read(model, p) for p in plans]


def _legacy_not_found(model: _Model, root: Any, layer_name: str) -> str:
  with_weights, batch_norms = [], []
  for top in _legacy_layer_names(model, root):
    group = _get(model, root, top, "group")
    names = _weight_names(model, group, top) if group is not None else []
    if names:
      with_weights.append(top)
    for n in names:
      if _short_name(n) == "moving_mean":
        inner = _owner(n)
        batch_norms.append(top if inner in ("", top) else f"{top}/{inner.split('/')[-1]}")
  return (
    f"{model.path}: no layer named {layer_name!r} with weights. Batch-norm layers (by their "
    f"moving_mean) in the file: {_some(batch_norms)}; layers with weights: {_some(with_weights)}."
  )


def _check_same_float_shape(model: _Model, layer_name: str, plans: list[_Planned]) -> None:
  label = f"{model.path}: layer {layer_name!r}"
  if any(p.dtype.kind != "f" and not p.bfloat16 for p in plans):
    raise ValueError(f"{label}: a batch-norm weight is not floating: {[p.dtype for p in plans]}.")
  if len({p.shape for p in plans}) != 1:
    raise ValueError(
      f"{label}: its batch-norm weights have different shapes {[p.shape for p in plans]}."
    )
