"""Which Keras a file or a bare config came from: the V1 / V2 / Keras 3 decision, in one place.

Private and framework-free. `kbn_jax._keras_files` calls `detect` with what a file records
(`FileFacts`); `kbn_jax.keras_compat.from_keras_config` calls `semantics_of_config` for a bare
layer config, which is `detect` without file facts.

The first matching rule wins:

==  ===================================================================  ============  =========
#   what the file (or config) says                                       semantics     ambiguous
==  ===================================================================  ============  =========
1   layer class name ``BatchNormalizationV1`` / ``BatchNormalizationV2``  keras_v1 / v2  no
2   ``keras_version`` 3.x (HDF5 root attrs, ``metadata.json``, or the     keras3        no
    top of a ``model.to_json()`` config)
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

A bare layer config has no file facts, so only rules 1, 3, 5 and 12 apply to it.

Caveat of rule 9 (measured with tf_keras 2.21): a model built with the explicitly imported V1
class (``tf_keras.src.layers.normalization.batch_normalization_v1.BatchNormalization``), or under
``tf.compat.v1.disable_v2_behavior()``, saves exactly as a V2 model does (class name
``BatchNormalization``, module ``keras.layers``, same config keys) in ``.h5`` and ``.keras``
files alike; no file can tell it from V2. ``module``/``registered_name`` keys are *not* a Keras 3
marker: tf_keras >= 2.13 writes them too.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

SEMANTICS = ("keras_v1", "keras_v2", "keras3")
_KERAS3_BACKENDS = frozenset({"jax", "torch", "numpy", "openvino"})
_MULTI_BACKENDS = frozenset({"theano", "cntk"})

_FROZEN_CONFIG_WARNING = (
  "This Keras config has trainable=False but cannot say whether it comes from Keras's V1 layer "
  "(tf.compat.v1) or V2 (tf.keras under TF2, the usual case): it is read as semantics="
  "'keras_v1', where a training call normalizes the frozen layer with batch statistics; V2 and "
  "Keras 3 use the moving statistics. Pass semantics='keras_v2' (or 'keras_v1') to choose and "
  "silence this warning."
)


@dataclasses.dataclass(frozen=True)
class FileFacts:
  """What a file (or the configs given with it) records about the Keras that wrote it.

  Attributes:
    keras_version: the ``keras_version`` text, or None.
    version_source: where it was found, for the evidence sentence ("metadata.json" ...).
    backend: the ``backend`` text, or None.
    model_module: the root model's ``module`` key, or None.
  """

  keras_version: str | None = None
  version_source: str = ""
  backend: str | None = None
  model_module: str | None = None


class Detection(NamedTuple):
  """The decision: `semantics`, the `evidence` sentence, and whether it is a default."""

  semantics: str
  evidence: str
  ambiguous: bool


def _version(text: str | None) -> tuple[int, int] | None:
  match = re.match(r"^\s*(\d+)\.(\d+)", text or "")
  return (int(match.group(1)), int(match.group(2))) if match else None


def detect(class_name: Any, config: Mapping[str, Any], facts: FileFacts | None) -> Detection:
  """Applies the rule table of the module docstring.

  Args:
    class_name: the layer's saved class name (``"BatchNormalization"`` ...), or None.
    config: the layer's inner config dict.
    facts: what the file records, or None for a bare config.

  Returns:
    The `Detection`.
  """
  nothing = (
    "the config records no Keras version and no Keras 3 marker"
    if facts is None
    else "neither the file nor its config records a Keras version or a Keras 3 marker"
  )
  facts = facts or FileFacts()
  version, backend = facts.keras_version, (facts.backend or "").lower()
  source = f" ({facts.version_source})" if facts.version_source else ""
  parsed = _version(version)
  module = facts.model_module or ""
  if class_name == "BatchNormalizationV1":
    return Detection("keras_v1", "the layer's class name is BatchNormalizationV1.", False)
  if class_name == "BatchNormalizationV2":
    return Detection("keras_v2", "the layer's class name is BatchNormalizationV2.", False)
  if parsed is not None and parsed[0] >= 3:
    return Detection("keras3", f"keras_version {version!r}{source}: Keras 3.", False)
  if "synchronized" in config:
    return Detection(
      "keras3", "the layer config has a `synchronized` key, which only Keras 3 writes.", False
    )
  if backend in _KERAS3_BACKENDS:
    return Detection("keras3", f"backend {backend!r}: only Keras 3 runs on it.", False)
  dtype = config.get("dtype")
  if isinstance(dtype, Mapping) and "DTypePolicy" in str(dtype.get("class_name", "")):
    return Detection("keras3", "the layer's dtype is a Keras 3 DTypePolicy.", False)
  if module.startswith("keras.src.models"):
    return Detection("keras3", f"the model class's module is {module!r} (Keras 3).", False)
  if backend in _MULTI_BACKENDS:
    return Detection(
      "keras_v1",
      f"backend {backend!r}: standalone multi-backend Keras 2, whose frozen layers use batch "
      "statistics as V1's do.",
      False,
    )
  if version is not None and version.strip().endswith("-tf"):
    return Detection(
      "keras_v1",
      f"keras_version {version!r}{source} was written by tf.keras of both TF 1.x (V1) and "
      "the first TF 2 releases (V2); the file cannot tell which (V1 assumed, kbn_jax's default).",
      True,
    )
  if parsed is not None and parsed[0] == 2 and parsed[1] >= 4:
    return Detection(
      "keras_v2",
      f"keras_version {version!r}{source}: tf.keras/tf_keras under TF2, where "
      "BatchNormalization is the V2 class (a model built with the explicitly imported V1 "
      "class saves identically).",
      False,
    )
  if parsed is not None and parsed[0] == 2:
    return Detection(
      "keras_v1",
      f"keras_version {version!r}{source}: standalone Keras 2.0-2.3, whose frozen layers use "
      "batch statistics as V1's do.",
      False,
    )
  if module.startswith(("tf_keras", "keras.src.engine", "keras.engine")):
    return Detection(
      "keras_v2",
      f"no keras_version, but the model class's module is {module!r}: tf_keras (or Keras "
      "2.13-2.15) under TF2, where BatchNormalization is the V2 class.",
      False,
    )
  return Detection("keras_v1", f"{nothing}; V1 assumed (kbn_jax's default).", True)


def semantics_of_config(config: Mapping[str, Any], *, trainable: Any, stacklevel: int) -> str:
  """The semantics a bare layer config says it has (`detect` without file facts).

  Warns when the config cannot tell V1 from V2 and the difference matters (a frozen layer).

  Args:
    config: a Keras layer config, or a serialized layer (``{"class_name", "config"}``).
    trainable: the layer's ``trainable`` value.
    stacklevel: passed to `warnings.warn`, counted from the caller of this function.

  Returns:
    ``"keras_v1"``, ``"keras_v2"`` or ``"keras3"``.
  """
  class_name = config.get("class_name")
  inner = config.get("config") if class_name is not None else config
  detection = detect(class_name, inner if isinstance(inner, Mapping) else {}, None)
  if detection.ambiguous and trainable is False:
    warnings.warn(_FROZEN_CONFIG_WARNING, stacklevel=stacklevel + 1)
  return detection.semantics
