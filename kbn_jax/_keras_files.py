"""Reads BatchNormalization layers from Keras model and weights files, safely and without Keras.

Private, Flax-free (NumPy, plus ``h5py`` imported when a file is read). `kbn_jax.keras_compat`
builds its public loaders on top.

Formats
-------

* legacy HDF5 model (``.h5``): ``model.save("m.h5")`` of Keras 2.x / tf.keras / tf_keras, and of
  Keras 3 (legacy format). Root attrs ``model_config``, ``keras_version``, ``backend``; weights
  under ``model_weights``, one group per top-level layer, listed by its ``weight_names`` attr.
* legacy HDF5 weights (``.h5``): ``model.save_weights("w.h5")`` of Keras 2.x / tf_keras; the same
  weight groups at the root, no config.
* ``.keras`` zip: ``model.save("m.keras")`` of tf_keras >= 2.13 and Keras 3; members
  ``metadata.json``, ``config.json``, ``model.weights.h5``.
* ``.weights.h5``: ``model.save_weights("w.weights.h5")`` of tf_keras >= 2.13 and Keras 3, and the
  ``model.weights.h5`` of a ``.keras`` zip. Groups are named after layer *classes*
  (``layers/batch_normalization``, ``layers/batch_normalization_1``, ...: a counter per class and
  container, in the order of the model's layers), variables are ``vars/0`` ... ``vars/n-1``, and a
  nested model nests (``layers/sequential/layers/batch_normalization``). There is no config, so
  layer names come from the model config (``config_path`` / ``model_config``); Keras 3.15 also
  records each layer's name as the ``name`` attribute of its ``vars`` group, used when present.

Layers of nested models (a Functional or Sequential model used as a layer) are keyed
``"outer/inner"``. A bare ``"inner"`` also finds such a layer when no other layer has that name.

Semantics detection
-------------------

Each `KerasBatchNormRecord` says which Keras behaviour the file's layer had (``semantics``), why
(``semantics_evidence``) and whether the file could not tell (``ambiguous``). The first matching
rule wins:

==  ===================================================================  ============  =========
#   what the file says                                                   semantics     ambiguous
==  ===================================================================  ============  =========
1   layer class name ``BatchNormalizationV1`` / ``BatchNormalizationV2``  keras_v1 / v2  no
2   ``keras_version`` 3.x (HDF5 root attrs or ``metadata.json``)          keras3        no
3   a ``synchronized`` key in the layer config (only Keras 3 writes it)  keras3        no
4   ``backend`` jax / torch / numpy / openvino                           keras3        no
5   the layer's ``dtype`` is a ``DTypePolicy`` dict (Keras 3)            keras3        no
6   the model's ``module`` is ``keras.src.models...`` (Keras 3)          keras3        no
7   ``backend`` theano / cntk (standalone multi-backend Keras 2)         keras_v1      no
8   ``keras_version`` ``2.x.y-tf``: tf.keras of TF 1.x (V1) *and* of     keras_v1      yes
    the first TF 2 releases (V2) wrote these
9   ``keras_version`` >= 2.4 without ``-tf``: tf.keras / tf_keras under  keras_v2      no
    TF2, where ``BatchNormalization`` is the V2 class
10  ``keras_version`` 2.0-2.3 without ``-tf``: standalone Keras          keras_v1      no
11  no version, but the model's ``module`` is ``tf_keras...`` /          keras_v2      no
    ``keras.src.engine...`` (tf_keras / Keras 2.13+ ``.keras`` config)
12  nothing of the above                                                 keras_v1      yes
==  ===================================================================  ============  =========

Caveat of rule 9 (measured with tf_keras 2.21): a model built with the explicitly imported V1
class (``tf_keras.src.layers.normalization.batch_normalization_v1.BatchNormalization``), or under
``tf.compat.v1.disable_v2_behavior()``, saves exactly as a V2 model does (class name
``BatchNormalization``, module ``keras.layers``, same config keys) in ``.h5`` and ``.keras``
files alike; no file can tell it from V2. ``module``/``registered_name`` keys are *not* a Keras 3
marker: tf_keras >= 2.13 writes them too.

Untrusted files
---------------

Nothing from a file is executed or deserialized into objects: configs are parsed as JSON and
read as plain dicts (no Lambda, no custom objects, no pickle); zip members are read by their
fixed names into memory (never extracted), with size caps; HDF5 soft/external links, external and
virtual datasets are refused, and so are weight names that are absolute or contain ``..``; every
array's dtype and shape are checked against the layer config before and after reading.
Truncated, corrupted or mismatched files raise `ValueError` naming the file (and the layer); a
missing layer raises `KeyError` listing the file's BatchNormalization layers.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

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
SEMANTICS = ("keras_v1", "keras_v2", "keras3")

# Size caps for untrusted input.
MAX_JSON_BYTES = 64 << 20  # config.json, metadata.json, the `model_config` attribute
MAX_WEIGHTS_MEMBER_BYTES = 4 << 30  # model.weights.h5 read from a .keras zip into memory
MAX_NESTING = 64  # nested models / JSON depth
MAX_BATCH_NORM_ELEMENTS = 1 << 26  # elements of one batch-norm weight
_BOMB_FLOOR_BYTES = 1 << 32  # a dataset declaring more than this ...
_BOMB_EXPANSION = 1000  # ... must store at least 1/this of it

_KERAS3_BACKENDS = frozenset({"jax", "torch", "numpy", "openvino"})
_MULTI_BACKENDS = frozenset({"theano", "cntk"})
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


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

  Returns:
    ``{key: KerasBatchNormRecord}`` in the model's layer order; nested layers keyed
    ``"outer/inner"``.

  Raises:
    ImportError: without h5py.
    ValueError: an unreadable, corrupted, truncated or mismatched file (the message names the
      file and the layer), or a weights-only file without a config.
  """
  with _open_model(path, config_path, model_config) as model:
    if model.layers is None:
      raise ValueError(
        f"{model.path} holds weights but no model config ({model.format_description}), so its "
        "layers' names and configs are unknown; pass config_path= (the .keras or .h5 model "
        "file, or the config.json) or model_config=model.get_config()."
      )
    _need_weights(model)
    records = {}
    for layer in model.layers:
      if layer.class_name in BATCH_NORM_CLASS_NAMES:
        weights, where = _batch_norm_weights(model, layer)
        semantics, evidence, ambiguous = _detect_semantics(model, layer)
        records[layer.key] = KerasBatchNormRecord(
          name=layer.key,
          config=copy.deepcopy(dict(layer.config)),
          weights=weights,
          semantics=semantics,
          semantics_evidence=evidence,
          ambiguous=ambiguous,
          input_shape=layer.input_shape,
          class_name=layer.class_name,
          file_format=model.format,
          weights_path=where,
        )
    return records


def read_layer_weights(
  path: str | os.PathLike[str],
  layer_name: str,
  *,
  config_path: str | os.PathLike[str] | None = None,
  model_config: Mapping[str, Any] | str | None = None,
) -> list[np.ndarray]:
  """Reads one layer's weights from any Keras model or weights file.

  Batch-norm weights come back in ``get_weights()`` order, checked against the layer's config
  when the file (or ``config_path`` / ``model_config``) has one; other layers' weights in the
  file's order.

  Args:
    path: a legacy ``.h5`` model or ``save_weights`` file, a ``.keras`` zip or a ``.weights.h5``
      file.
    layer_name: the layer's name, or ``"outer/inner"`` in a nested model. In a ``.weights.h5``
      file without config, also the group path (``"layers/batch_normalization_1"``).
    config_path: as in `read_batch_norm_layers`; a ``.weights.h5`` file needs it (or
      ``model_config``) to map names to groups, unless Keras recorded layer names in it.
    model_config: as in `read_batch_norm_layers`.

  Returns:
    The arrays, in Keras's parameter shapes.

  Raises:
    ImportError: without h5py.
    KeyError: no such layer (the message lists the file's BatchNormalization layers).
    ValueError: an unreadable, corrupted or mismatched file.
  """
  with _open_model(path, config_path, model_config) as model:
    _need_weights(model)
    if model.layers is not None:
      layer = _find_layer(model, layer_name)
      if layer.class_name in BATCH_NORM_CLASS_NAMES:
        return _batch_norm_weights(model, layer)[0]
      return _layer_weights(model, layer)[0]
    return _weights_without_config(model, layer_name)


def read_layer_config(
  path: str | os.PathLike[str],
  layer_name: str,
  *,
  config_path: str | os.PathLike[str] | None = None,
  model_config: Mapping[str, Any] | str | None = None,
) -> dict[str, Any]:
  """Reads one layer's serialized config from a Keras model file.

  Args:
    path: a legacy ``.h5`` model, a ``.keras`` zip, a JSON model config, or a weights-only file
      with ``config_path`` / ``model_config``.
    layer_name: the layer's name, or ``"outer/inner"`` in a nested model.
    config_path: as in `read_batch_norm_layers`.
    model_config: as in `read_batch_norm_layers`.

  Returns:
    The serialized layer as saved: ``{"class_name": ..., "config": {...}, ...}`` (which
    `kbn_jax.keras_compat.from_keras_config` accepts).

  Raises:
    ImportError: without h5py (for HDF5 files).
    KeyError: no such layer, or a weights-only file without a config.
    ValueError: an unreadable or corrupted file.
  """
  with _open_model(path, config_path, model_config, need_weights=False) as model:
    if model.layers is None:
      raise _LayerNotFound(
        f"{model.path} holds no model config ({model.format_description}); pass config_path= "
        "(the .keras or .h5 model file, or its config.json) or model_config=model.get_config()."
      )
    return copy.deepcopy(_find_layer(model, layer_name).entry)


# ---------------------------------------------------------------------------------------------
# Opening files
# ---------------------------------------------------------------------------------------------
class _LayerNotFound(KeyError):
  """A missing layer (kept apart from h5py's KeyErrors, which mean a corrupted file)."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""


@dataclasses.dataclass
class _Layer:
  key: str
  parts: tuple[str, ...]
  entry: dict[str, Any]
  class_name: str
  config: dict[str, Any]
  group: str  # the layer's group in the new (.weights.h5) layout
  input_shape: tuple[int | None, ...] | None


@dataclasses.dataclass
class _Model:
  path: str
  format: str  # "h5", "h5_weights", "keras", "weights_h5", "json"
  h5: Any = None  # the open weights file (h5py.File) or None
  layers: list[_Layer] | None = None
  keras_version: str | None = None
  backend: str | None = None
  model_module: str | None = None
  version_source: str = ""

  @property
  def format_description(self) -> str:
    return {
      "h5": "a legacy HDF5 model file",
      "h5_weights": "a legacy HDF5 weights file written by save_weights",
      "keras": "a .keras zip archive",
      "weights_h5": "a .weights.h5 file written by save_weights of tf_keras >= 2.13 or Keras 3",
      "json": "a JSON model config",
    }[self.format]


def _h5py():
  try:
    import h5py  # noqa: PLC0415 (optional dependency)
  except ImportError as error:
    raise ImportError(
      "Reading Keras HDF5 and .keras files needs the optional dependency h5py: "
      "`pip install h5py` (or `pip install kbn_jax[keras]`)."
    ) from error
  return h5py


# What h5py / zipfile raise on damaged files (UnicodeError: undecodable names in a damaged file).
_READ_ERRORS = (
  OSError,
  RuntimeError,
  zipfile.BadZipFile,
  zipfile.LargeZipFile,
  EOFError,
  UnicodeError,
)


@contextmanager
def _open_model(path, config_path, model_config, need_weights=True) -> Iterator[_Model]:
  name = os.fspath(path)
  stack = []
  try:
    try:
      model = _open_file(name, stack, need_weights)
      if config_path is not None or model_config is not None:
        _attach_config(model, config_path, model_config)
    except FileNotFoundError:
      raise
    except _READ_ERRORS as error:
      raise ValueError(
        f"{name}: cannot be read as a Keras file; it is truncated or corrupted "
        f"({_describe(error)})."
      ) from error
    try:
      yield model
    except _READ_ERRORS as error:
      raise ValueError(f"{name}: corrupted or truncated file ({_describe(error)}).") from error
    except KeyError as error:
      if isinstance(error, _LayerNotFound):
        raise
      raise ValueError(f"{name}: corrupted file (missing object {error}).") from error
  finally:
    for close in reversed(stack):
      try:
        close()
      except Exception:  # noqa: BLE001, S110 (closing a corrupted file may fail again)
        pass


def _describe(error: BaseException) -> str:
  return f"{type(error).__name__}: {error}"


def _sniff(name: str) -> bytes:
  if os.path.isdir(name):
    raise ValueError(
      f"{name} is a directory; pass a Keras file (.h5, .keras or .weights.h5), not an unzipped "
      "save."
    )
  with open(name, "rb") as file:
    return file.read(8)


def _open_file(name: str, stack: list, need_weights: bool) -> _Model:
  head = _sniff(name)
  if head.startswith(_HDF5_SIGNATURE):
    h5py = _h5py()
    file = h5py.File(name, "r")
    stack.append(file.close)
    return _from_h5(name, file)
  if head.startswith(b"PK"):
    return _from_zip(name, stack, need_weights)
  if head.lstrip()[:1] in (b"{", b"["):
    model = _Model(path=name, format="json")
    config = _parse_json(_read_capped_file(name), name, "the model config")
    model.layers, model.model_module = _layers_from_config(config, name)
    return model
  raise ValueError(
    f"{name} is not a Keras file: it is neither an HDF5 file (.h5, .weights.h5) nor a zip "
    f"archive (.keras) nor JSON (it starts with {head!r})."
  )


def _read_capped_file(name: str) -> bytes:
  with open(name, "rb") as file:
    data = file.read(MAX_JSON_BYTES + 1)
  if len(data) > MAX_JSON_BYTES:
    raise ValueError(f"{name}: the JSON config is larger than {MAX_JSON_BYTES} bytes.")
  return data


def _from_h5(name: str, file) -> _Model:
  attrs = file.attrs
  if "model_config" in attrs:
    model = _Model(path=name, format="h5", h5=file)
    config = _parse_json(_attr_bytes(attrs["model_config"], name), name, "`model_config`")
    model.layers, model.model_module = _layers_from_config(config, name)
  elif "layer_names" in attrs or "layer_names" in _model_weights_attrs(file, name):
    model = _Model(path=name, format="h5_weights", h5=file)
  elif any(k in file for k in ("layers", "vars", "_layer_checkpoint_dependencies")):
    model = _Model(path=name, format="weights_h5", h5=file)
  else:
    raise ValueError(
      f"{name} is an HDF5 file but not a Keras model or weights file: it has no "
      "`model_config`/`layer_names` attributes (legacy .h5) and no `layers`/`vars` groups "
      "(.weights.h5)."
    )
  for source in (attrs, _model_weights_attrs(file, name)):
    if model.keras_version is None and "keras_version" in source:
      model.keras_version = _attr_text(source["keras_version"])
      model.version_source = "the HDF5 attributes"
    if model.backend is None and "backend" in source:
      model.backend = _attr_text(source["backend"])
  return model


def _model_weights_attrs(file, name: str):
  if "model_weights" not in file:
    return {}
  return _get(file, "model_weights", "group", name).attrs


def _from_zip(name: str, stack: list, need_weights: bool) -> _Model:
  archive = zipfile.ZipFile(name, "r")
  stack.append(archive.close)
  names = archive.namelist()
  model = _Model(path=name, format="keras")
  if "config.json" not in names:
    raise ValueError(
      f"{name} is a zip archive but not a .keras model: it has no config.json (members: "
      f"{sorted(names)[:10]})."
    )
  for member in ("config.json", "metadata.json", "model.weights.h5"):
    if names.count(member) > 1:
      raise ValueError(f"{name}: the zip archive holds {member} more than once.")
  config = _parse_json(_read_member(archive, "config.json", MAX_JSON_BYTES, name), name, "")
  model.layers, model.model_module = _layers_from_config(config, name)
  if "metadata.json" in names:
    metadata = _parse_json(
      _read_member(archive, "metadata.json", MAX_JSON_BYTES, name), name, "metadata.json"
    )
    if not isinstance(metadata, Mapping):
      raise ValueError(f"{name}: metadata.json is not a JSON object.")
    version = metadata.get("keras_version")
    model.keras_version = str(version) if version is not None else None
    model.version_source = "metadata.json"
  if not need_weights:
    return model
  if "model.weights.h5" not in names:
    other = [n for n in names if n.startswith("model.weights")]
    hint = (
      f" It holds {other}: weights saved as .npz or sharded are not supported; re-save with "
      "model.save('m.keras') (the default h5 weights)."
      if other
      else ""
    )
    raise ValueError(f"{name}: the .keras archive has no model.weights.h5 member.{hint}")
  data = _read_member(archive, "model.weights.h5", MAX_WEIGHTS_MEMBER_BYTES, name)
  if not data.startswith(_HDF5_SIGNATURE):
    raise ValueError(f"{name}: model.weights.h5 inside the archive is not an HDF5 file.")
  h5py = _h5py()
  file = h5py.File(io.BytesIO(data), "r")
  stack.append(file.close)
  model.h5 = file
  return model


def _read_member(archive: zipfile.ZipFile, member: str, cap: int, name: str) -> bytes:
  info = archive.getinfo(member)
  if info.flag_bits & 0x1:
    raise ValueError(f"{name}: {member} is encrypted.")
  if info.file_size > cap:
    raise ValueError(f"{name}: {member} declares {info.file_size} bytes, over the cap of {cap}.")
  with archive.open(info) as stream:
    data = stream.read(cap + 1)  # reads to the end, so the CRC is checked
  if len(data) > cap:
    raise ValueError(f"{name}: {member} is larger than the cap of {cap} bytes.")
  return data


def _parse_json(data: bytes, name: str, what: str) -> Any:
  label = f"{what} " if what else ""
  try:
    return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
    where = f"{label}in {name}" if what else f"{name} (config.json)"
    raise ValueError(f"Malformed JSON {where}: {_describe(error)}.") from error


def _attr_bytes(value: Any, name: str) -> bytes | str:
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value[()]
  if isinstance(value, (bytes, str)):
    if len(value) > MAX_JSON_BYTES:
      raise ValueError(f"{name}: `model_config` is larger than {MAX_JSON_BYTES} bytes.")
    return value
  raise ValueError(f"{name}: the `model_config` attribute is not a string.")


def _attr_text(value: Any) -> str:
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value[()]
  return value.decode("utf8", "replace") if isinstance(value, bytes) else str(value)


def _attach_config(model: _Model, config_path, model_config) -> None:
  if config_path is not None and model_config is not None:
    raise ValueError("Pass config_path or model_config, not both.")
  if model_config is not None:
    if isinstance(model_config, (str, bytes)):
      model_config = _parse_json(model_config, "model_config", "the argument")
    model.layers, model.model_module = _layers_from_config(model_config, "model_config")
    return
  source = os.fspath(config_path)
  with _open_model(source, None, None, need_weights=False) as other:
    if other.layers is None:
      raise ValueError(f"config_path={source} holds no model config ({other.format_description}).")
    model.layers, model.model_module = other.layers, other.model_module
    if model.keras_version is None and other.keras_version is not None:
      model.keras_version = other.keras_version
      model.version_source = f"{other.version_source} of {source}"
    if model.backend is None:
      model.backend = other.backend


# ---------------------------------------------------------------------------------------------
# Model configs
# ---------------------------------------------------------------------------------------------
def _layers_from_config(config: Any, name: str) -> tuple[list[_Layer], str | None]:
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
  _walk(inner, (), "layers", layers, name, tf_keras_naming, 0)
  seen = set()
  for layer in layers:
    if layer.key in seen:
      raise ValueError(f"{name}: the model config has two layers keyed {layer.key!r}.")
    seen.add(layer.key)
  return layers, module if isinstance(module, str) else None


def _walk(model_cfg, prefix, group_prefix, out, name, tf_keras_naming, depth) -> None:
  if depth > MAX_NESTING:
    raise ValueError(f"{name}: models nested deeper than {MAX_NESTING} levels.")
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
    if not isinstance(layer_name, str) or not layer_name or "/" in layer_name:
      raise ValueError(f"{where} ({entry['class_name']}) has an invalid name {layer_name!r}.")
    class_name = entry["class_name"]
    snake = _snake_case(class_name, tf_keras_naming)
    count = used.get(snake)
    used[snake] = 0 if count is None else count + 1
    group = f"{group_prefix}/{snake if count is None else f'{snake}_{count + 1}'}"
    parts = (*prefix, layer_name)
    if isinstance(config.get("layers"), list):
      _walk(config, parts, f"{group}/layers", out, name, tf_keras_naming, depth + 1)
    else:
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
  if isinstance(value, list) and 0 < len(value) <= 32:
    if all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in value):
      return tuple(value)
  return None


def _input_shape(entry, config, previous, by_name, model_cfg) -> tuple[int | None, ...] | None:
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


def _input_layer_shape(entry) -> tuple[int | None, ...] | None:
  config = entry.get("config")
  if isinstance(config, Mapping):
    for key in ("batch_input_shape", "batch_shape"):
      if _shape(config.get(key)):
        return _shape(config.get(key))
  return None


def _find_layer(model: _Model, layer_name: str) -> _Layer:
  if not isinstance(layer_name, str):
    raise TypeError(f"layer_name must be a str, got {type(layer_name).__name__}.")
  assert model.layers is not None
  for layer in model.layers:
    if layer.key == layer_name:
      return layer
  matches = [layer for layer in model.layers if layer.parts[-1] == layer_name]
  if len(matches) == 1:
    return matches[0]
  if model.format in ("keras", "weights_h5"):
    matches_group = [layer for layer in model.layers if layer.group == layer_name.strip("/")]
    if len(matches_group) == 1:
      return matches_group[0]
  batch_norms = [la.key for la in model.layers if la.class_name in BATCH_NORM_CLASS_NAMES]
  if matches:
    raise _LayerNotFound(
      f"{model.path}: the name {layer_name!r} is ambiguous: "
      f"{[la.key for la in matches]}; pass the full key."
    )
  raise _LayerNotFound(
    f"{model.path}: no layer named {layer_name!r}. BatchNormalization layers in the file: "
    f"{batch_norms} (nested layers are keyed 'outer/inner'); {len(model.layers)} layers in all."
  )


# ---------------------------------------------------------------------------------------------
# HDF5 access
# ---------------------------------------------------------------------------------------------
def _get(parent, path: str, want: str, name: str):
  """A group or dataset below `parent` by a relative path, through hard links only."""
  h5py = _h5py()
  parts = path.split("/")
  if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
    raise ValueError(f"{name}: refusing the HDF5 path {path!r} (absolute or with '..').")
  node = parent
  for index, part in enumerate(parts):
    if not isinstance(node, h5py.Group) or part not in node:
      return None
    link = node.get(part, getlink=True)
    if not isinstance(link, h5py.HardLink):
      raise ValueError(
        f"{name}: refusing the {type(link).__name__} at {path!r} (only hard links are read)."
      )
    node = node[part]
    if index < len(parts) - 1 and not isinstance(node, h5py.Group):
      return None
  kind = h5py.Group if want == "group" else h5py.Dataset
  if not isinstance(node, kind):
    raise ValueError(f"{name}: {path!r} is not an HDF5 {want}.")
  return node


def _read_dataset(dataset, name: str, what: str, max_elements: int | None = None) -> np.ndarray:
  if dataset.external:
    raise ValueError(f"{name}: {what} is an external dataset; refusing to read it.")
  if dataset.is_virtual:
    raise ValueError(f"{name}: {what} is a virtual dataset; refusing to read it.")
  if dataset.shape is None:
    raise ValueError(f"{name}: {what} is an empty (null) dataset.")
  dtype = dataset.dtype
  bfloat16 = _attr_text(dataset.attrs["dtype"]) == "bfloat16" if "dtype" in dataset.attrs else False
  if not bfloat16 and dtype.kind not in "fiub":
    raise ValueError(f"{name}: {what} has the non-numeric dtype {dtype}.")
  if bfloat16 and dtype.itemsize != 2:
    raise ValueError(f"{name}: {what} is marked bfloat16 but has the dtype {dtype}.")
  size = math.prod(dataset.shape) if dataset.shape is not None else 0
  if max_elements is not None and size > max_elements:
    raise ValueError(f"{name}: {what} has {size} elements, over the cap of {max_elements}.")
  declared = size * dtype.itemsize
  if declared > _BOMB_FLOOR_BYTES and declared > _BOMB_EXPANSION * dataset.id.get_storage_size():
    raise ValueError(
      f"{name}: {what} declares {declared} bytes but stores almost nothing; refusing it."
    )
  array = np.array(dataset[()])
  if array.shape != tuple(dataset.shape or ()):
    raise ValueError(f"{name}: {what} read back with a wrong shape.")
  if bfloat16:  # Keras 3 writes bfloat16 as 2-byte values tagged with a `dtype` attribute
    bits = array.view(np.uint16).astype(np.uint32) << 16
    array = bits.view(np.float32)
  return array


def _legacy_root(model: _Model):
  file = model.h5
  root = _get(file, "model_weights", "group", model.path) if "model_weights" in file else file
  if "layer_names" not in root.attrs:
    raise ValueError(
      f"{model.path}: the legacy HDF5 weights have no `layer_names` attribute; the file is "
      "truncated or not written by Keras."
    )
  return root


def _legacy_layer_names(model: _Model, root) -> list[str]:
  names = root.attrs["layer_names"]
  return [_attr_text(n) for n in np.asarray(names).ravel()]


def _weight_names(group, model: _Model, where: str) -> list[str]:
  if "weight_names" not in group.attrs:
    raise ValueError(f"{model.path}: the group {where!r} has no `weight_names` attribute.")
  names = [_attr_text(n) for n in np.asarray(group.attrs["weight_names"]).ravel()]
  for n in names:
    if not n or n.startswith("/") or any(p in ("", ".", "..") for p in n.split("/")):
      raise ValueError(f"{model.path}: refusing the weight name {n!r} in {where!r}.")
  return names


def _short_name(weight_name: str) -> str:
  return weight_name.split("/")[-1].split(":")[0]


def _legacy_weight_entries(model: _Model, parts: tuple[str, ...]):
  """(group, [weight names]) of a layer in a legacy HDF5 file; None if absent."""
  root = _legacy_root(model)
  top = parts[0]
  if top not in _legacy_layer_names(model, root):
    return None
  group = _get(root, top, "group", model.path)
  if group is None:
    raise ValueError(f"{model.path}: `layer_names` lists {top!r}, but it has no group.")
  names = _weight_names(group, model, top)
  if len(parts) == 1:
    return group, names, top
  inner = [n for n in names if len(n.split("/")) >= 2 and n.split("/")[-2] == parts[-1]]
  shorts = [_short_name(n) for n in inner]
  if len(set(shorts)) != len(shorts):  # same inner name in two nested models: use the path
    inner = [n for n in inner if all(p in n.split("/")[:-1] for p in parts[1:])]
    shorts = [_short_name(n) for n in inner]
    if len(set(shorts)) != len(shorts):
      raise ValueError(
        f"{model.path}: layer {'/'.join(parts)!r}: the weight names of {top!r} cannot tell "
        f"this layer from another of the same name: {inner}."
      )
  return group, inner, top


def _read_legacy(model: _Model, group, names: list[str], where: str, cap=None):
  arrays = []
  for n in names:
    dataset = _get(group, n, "dataset", model.path)
    if dataset is None:
      raise ValueError(
        f"{model.path}: weight {n!r} of {where!r} is listed in `weight_names` but missing."
      )
    arrays.append((n, _read_dataset(dataset, model.path, f"weight {n!r} of {where!r}", cap)))
  return arrays


def _new_vars(model: _Model, group_path: str, where: str):
  """The `vars` group of a layer in the new layout; None when the layer has no group."""
  root = model.h5
  group = _get(root, group_path, "group", model.path)
  if group is None and group_path.startswith("layers/"):
    group = _get(root, "_layer_checkpoint_dependencies" + group_path[6:], "group", model.path)
  if group is None:
    return None
  if "vars" not in group:
    return {}
  return _get(group, "vars", "group", model.path)


def _read_vars(model: _Model, vars_group, where: str, cap=None) -> list[np.ndarray]:
  if not vars_group:
    return []
  keys = list(vars_group.keys())
  expected = [str(i) for i in range(len(keys))]
  if sorted(keys, key=lambda k: (len(k), k)) != expected:
    raise ValueError(
      f"{model.path}: {where}: the variables are named {sorted(keys)}, expected {expected}."
    )
  arrays = []
  for k in expected:
    dataset = _get(vars_group, k, "dataset", model.path)
    if dataset is None:
      raise ValueError(f"{model.path}: {where}: variable {k} cannot be opened.")
    arrays.append(_read_dataset(dataset, model.path, f"{where} variable {k}", cap))
  return arrays


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
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
  if model.format in ("h5", "h5_weights"):
    found = _legacy_weight_entries(model, layer.parts)
    if found is None:
      raise ValueError(f"{label}: the file has no weights for it (no group {layer.parts[0]!r}).")
    group, names, top = found
    arrays = _read_legacy(model, group, names, top, MAX_BATCH_NORM_ELEMENTS)
    by_short = {}
    for n, array in arrays:
      short = _short_name(n)
      if short in by_short:
        raise ValueError(f"{label}: the file holds two weights named {short!r}.")
      by_short[short] = array
    if sorted(by_short) != sorted(expected):
      raise ValueError(
        f"{label}: the file holds the weights {sorted(by_short)}, but its config "
        f"(center={layer.config.get('center', True)}, scale={layer.config.get('scale', True)}, "
        f"renorm={layer.config.get('renorm', False)}) needs {expected}."
      )
    weights, where = [by_short[n] for n in expected], group.name.lstrip("/")
  else:
    vars_group = _new_vars(model, layer.group, layer.key)
    if vars_group is None:
      raise ValueError(
        f"{label}: the weights file has no group {layer.group!r}; the config does not match "
        "the weights file (or the model is subclassed)."
      )
    _check_group_name(model, vars_group, layer)
    weights = _read_vars(
      model, vars_group, f"layer {layer.key!r} ({layer.group})", MAX_BATCH_NORM_ELEMENTS
    )
    if len(weights) != len(expected):
      raise ValueError(
        f"{label}: {layer.group} holds {len(weights)} variables, but the layer's config "
        f"(center={layer.config.get('center', True)}, scale={layer.config.get('scale', True)}, "
        f"renorm={layer.config.get('renorm', False)}) needs {len(expected)}: {expected}."
      )
    where = layer.group
  _check_batch_norm_arrays(label, layer, expected, weights)
  return weights, where


def _check_group_name(model: _Model, vars_group, layer: _Layer) -> None:
  if hasattr(vars_group, "attrs") and "name" in vars_group.attrs:
    recorded = _attr_text(vars_group.attrs["name"])
    if recorded != layer.parts[-1]:
      raise ValueError(
        f"{model.path}: the group {layer.group!r} holds the layer {recorded!r}, but the model "
        f"config puts {layer.key!r} there: the config does not belong to this weights file."
      )


def _check_batch_norm_arrays(label, layer: _Layer, names, weights) -> None:
  shapes = {w.shape for w in weights}
  for n, w in zip(names, weights, strict=True):
    if w.dtype.kind != "f":
      raise ValueError(f"{label}: weight {n!r} has the dtype {w.dtype}, not a floating type.")
  if len(shapes) != 1:
    raise ValueError(
      f"{label}: its weights have different shapes "
      f"{dict(zip(names, [w.shape for w in weights], strict=True))}; they must share the "
      "parameter shape."
    )
  shape = shapes.pop()
  if not shape or 0 in shape:
    raise ValueError(f"{label}: its weights have the empty shape {shape}.")
  axes = _axes(layer.config)
  single = axes is not None and len(axes) == 1 and not layer.config.get("virtual_batch_size")
  if single and len(shape) != 1:
    raise ValueError(f"{label}: its weights have the shape {shape}; with one axis, (C,) expected.")
  if layer.input_shape is not None and axes is not None:
    rank = len(layer.input_shape)
    try:
      dims = [layer.input_shape[a] for a in axes]
      bad = any(a >= rank or a < -rank for a in axes)
    except (IndexError, TypeError):
      bad = True
    if bad:
      raise ValueError(f"{label}: axis {axes} is out of range for the input {layer.input_shape}.")
    if all(d is not None for d in dims) and math.prod(shape) != math.prod(dims):
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


def _layer_weights(model: _Model, layer: _Layer) -> tuple[list[np.ndarray], str]:
  if model.format in ("h5", "h5_weights"):
    found = _legacy_weight_entries(model, layer.parts)
    if found is None:
      return [], ""
    group, names, top = found
    return [a for _, a in _read_legacy(model, group, names, top)], group.name
  vars_group = _new_vars(model, layer.group, layer.key)
  if vars_group is None:
    return [], ""
  _check_group_name(model, vars_group, layer)
  return _read_vars(model, vars_group, f"layer {layer.key!r} ({layer.group})"), layer.group


def _weights_without_config(model: _Model, layer_name: str) -> list[np.ndarray]:
  if not isinstance(layer_name, str) or not layer_name:
    raise TypeError(f"layer_name must be a non-empty str, got {layer_name!r}.")
  if model.format == "h5_weights":
    return _legacy_weights_by_name(model, layer_name)
  # .weights.h5: a group path, or a layer name recorded by Keras in the `vars` groups.
  path = layer_name.strip("/")
  if "/" in path:
    vars_group = _new_vars(model, path, path)
    if vars_group is not None:
      return _read_vars(model, vars_group, f"group {path!r}")
  named = _named_groups(model)
  matches = [p for key, p in named if key == layer_name] or [
    p for key, p in named if key.split("/")[-1] == layer_name
  ]
  if len(matches) == 1:
    vars_group = _new_vars(model, matches[0], layer_name)
    return _read_vars(model, vars_group, f"layer {layer_name!r} ({matches[0]})")
  groups = [p for p, _ in _groups_with_vars(model)]
  batch_norm_groups = [p for p in groups if re.search(r"(^|/)batch_normalization(_\d+)?$", p)]
  if len(matches) > 1:
    raise _LayerNotFound(
      f"{model.path}: the name {layer_name!r} is ambiguous: groups {matches}; pass a group path."
    )
  recorded = [key for key, _ in named]
  raise _LayerNotFound(
    f"{model.path}: no layer {layer_name!r} found. This {model.format_description} holds no "
    "model config, so layer names need config_path= (the .keras or .h5 model file, or its "
    "config.json) or model_config=model.get_config(); or pass a group path. BatchNormalization "
    f"groups in the file: {batch_norm_groups}"
    + (f"; layer names recorded in it: {recorded}." if recorded else ".")
  )


def _groups_with_vars(model: _Model):
  """(path, vars group) of every group with a `vars` child, in file order, depth-limited."""
  out = []
  h5py = _h5py()

  def visit(group, path, depth):
    if depth > 2 * MAX_NESTING:
      raise ValueError(f"{model.path}: groups nested deeper than {2 * MAX_NESTING} levels.")
    for key in group:
      link = group.get(key, getlink=True)
      if not isinstance(link, h5py.HardLink):
        continue
      child = group[key]
      if not isinstance(child, h5py.Group):
        continue
      child_path = f"{path}/{key}" if path else key
      if key == "vars":
        out.append((path, child))
      else:
        visit(child, child_path, depth + 1)

  for top in ("layers", "_layer_checkpoint_dependencies"):
    if top in model.h5 and isinstance(model.h5.get(top, getlink=True), h5py.HardLink):
      visit(model.h5[top], top, 0)
  return out


def _named_groups(model: _Model) -> list[tuple[str, str]]:
  """(key, group path) from the layer names Keras 3 records on `vars` groups."""
  names = {}
  for path, vars_group in _groups_with_vars(model):
    if "name" in vars_group.attrs:
      names[path] = _attr_text(vars_group.attrs["name"])
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
  parts = tuple(layer_name.split("/"))
  if parts[0] in layer_names:
    found = _legacy_weight_entries(model, parts)
  else:
    found = None
    hits = []
    for top in layer_names:
      group = _get(root, top, "group", model.path)
      if group is None:
        continue
      names = _weight_names(group, model, top)
      if any(len(n.split("/")) >= 2 and n.split("/")[-2] == parts[-1] for n in names):
        hits.append(top)
    if len(hits) > 1:
      raise _LayerNotFound(
        f"{model.path}: the name {layer_name!r} is ambiguous: it is inside {hits}; pass "
        "'outer/inner'."
      )
    if hits:
      found = _legacy_weight_entries(model, (hits[0], parts[-1]))
  if found is None or (not found[1] and len(parts) > 1):
    with_weights = []
    for top in layer_names:
      group = _get(root, top, "group", model.path)
      if group is not None and len(_weight_names(group, model, top)):
        with_weights.append(top)
    batch_norms = []
    for top in with_weights:
      group = _get(root, top, "group", model.path)
      for n in _weight_names(group, model, top):
        if _short_name(n) == "moving_mean":
          inner = n.split("/")[-2] if len(n.split("/")) >= 2 else top
          batch_norms.append(top if inner == top else f"{top}/{inner}")
    raise _LayerNotFound(
      f"{model.path}: no layer named {layer_name!r} with weights. Batch-norm layers (by their "
      f"moving_mean) in the file: {batch_norms}; layers with weights: {with_weights}."
    )
  group, names, top = found
  arrays = _read_legacy(model, group, names, top)
  shorts = [_short_name(n) for n, _ in arrays]
  if all(s in WEIGHT_ORDER for s in shorts) and len(set(shorts)) == len(shorts):
    arrays = sorted(arrays, key=lambda item: WEIGHT_ORDER.index(_short_name(item[0])))
    if "moving_mean" in shorts:
      _check_same_float_shape(model, layer_name, arrays)
  return [a for _, a in arrays]


def _check_same_float_shape(model: _Model, layer_name: str, arrays) -> None:
  label = f"{model.path}: layer {layer_name!r}"
  if any(a.dtype.kind != "f" for _, a in arrays):
    raise ValueError(
      f"{label}: a batch-norm weight is not floating: {[a.dtype for _, a in arrays]}."
    )
  if len({a.shape for _, a in arrays}) != 1:
    raise ValueError(
      f"{label}: its batch-norm weights have different shapes {[a.shape for _, a in arrays]}."
    )


# ---------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------
def _version(text: str | None) -> tuple[int, int] | None:
  match = re.match(r"^\s*(\d+)\.(\d+)", text or "")
  return (int(match.group(1)), int(match.group(2))) if match else None


def _detect_semantics(model: _Model, layer: _Layer) -> tuple[str, str, bool]:
  """(semantics, evidence, ambiguous) by the rule table of the module docstring."""
  class_name, config = layer.class_name, layer.config
  version, backend = model.keras_version, (model.backend or "").lower()
  source = f" ({model.version_source})" if model.version_source else ""
  parsed = _version(version)
  module = model.model_module or ""
  if class_name == "BatchNormalizationV1":
    return "keras_v1", "the layer's class name is BatchNormalizationV1 (the V1 class).", False
  if class_name == "BatchNormalizationV2":
    return "keras_v2", "the layer's class name is BatchNormalizationV2 (the V2 class).", False
  if parsed is not None and parsed[0] >= 3:
    return "keras3", f"keras_version {version!r}{source}: Keras 3.", False
  if "synchronized" in config:
    return "keras3", "the layer config has a `synchronized` key, which only Keras 3 writes.", False
  if backend in _KERAS3_BACKENDS:
    return "keras3", f"backend {backend!r}: only Keras 3 runs on it.", False
  dtype = config.get("dtype")
  if isinstance(dtype, Mapping) and "DTypePolicy" in str(dtype.get("class_name", "")):
    return "keras3", "the layer's dtype is a Keras 3 DTypePolicy.", False
  if module.startswith("keras.src.models"):
    return "keras3", f"the model class's module is {module!r} (Keras 3).", False
  if backend in _MULTI_BACKENDS:
    return (
      "keras_v1",
      f"backend {backend!r}: standalone multi-backend Keras 2, whose frozen layers use batch "
      "statistics as V1's do.",
      False,
    )
  if version is not None and version.strip().endswith("-tf"):
    return (
      "keras_v1",
      f"keras_version {version!r}{source} was written by tf.keras of both TF 1.x (V1) and "
      "the first TF 2 releases (V2); the file cannot tell which (V1 assumed, kbn_jax's default).",
      True,
    )
  if parsed is not None and parsed[0] == 2 and parsed[1] >= 4:
    return (
      "keras_v2",
      f"keras_version {version!r}{source}: tf.keras/tf_keras under TF2, where "
      "BatchNormalization is the V2 class (a model built with the explicitly imported V1 "
      "class saves identically).",
      False,
    )
  if parsed is not None and parsed[0] == 2:
    return (
      "keras_v1",
      f"keras_version {version!r}{source}: standalone Keras 2.0-2.3, whose frozen layers use "
      "batch statistics as V1's do.",
      False,
    )
  if module.startswith(("tf_keras", "keras.src.engine", "keras.engine")):
    return (
      "keras_v2",
      f"no keras_version, but the model class's module is {module!r}: tf_keras (or Keras "
      "2.13-2.15) under TF2, where BatchNormalization is the V2 class.",
      False,
    )
  return (
    "keras_v1",
    "the file records no Keras version and no Keras 3 marker; V1 assumed (kbn_jax's default).",
    True,
  )
