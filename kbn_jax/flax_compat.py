"""The way in from Flax's own batch norm: ``nn.BatchNorm`` / ``nnx.BatchNorm`` to kbn_jax.

`from_flax_batch_norm` turns a Flax layer (and a trained model's variables for it) into a
`kbn_jax.BatchNormalization` and its variables, so a Flax user switches layers without losing a
checkpoint. The names map ``scale -> gamma``, ``bias -> beta``, ``mean -> moving_mean``,
``var -> moving_variance``. Two conventions differ, and the converter keeps Flax's values:

* ``epsilon``: Flax's default is 1e-5, Keras's (and kbn_jax's) 1e-3; the layer's own epsilon is
  carried over, so the numbers do not move.
* ``momentum``: both weigh the *old* value (Flax's 0.99 is Keras's 0.99); carried over as is.

The mode is not carried over (Flax code sets ``use_running_average`` per use, e.g.
``not train``): pass ``training=`` or set it on the returned layer. The layer comes back with
``fused=False``: Flax moves its running variance toward the biased
batch variance at every rank, while Keras's fused path (rank-4/5 channel-first or -last layers)
would apply Bessel's correction. Use `kbn_jax.nnx.BatchNormalization.from_linen` for NNX.

Example::

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from kbn_jax import flax_compat
  >>> flax_layer = nn.BatchNorm(use_running_average=False, momentum=0.9)
  >>> flax_vars = flax_layer.init(jax.random.key(0), jnp.ones((4, 3)))
  >>> layer, variables = flax_compat.from_flax_batch_norm(flax_layer, flax_vars)
  >>> layer.epsilon, layer.momentum, sorted(variables["batch_stats"])
  (1e-05, 0.9, ['moving_mean', 'moving_variance'])
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kbn_jax import _suspicious
from kbn_jax.linen import BatchNormalization

_NAMES = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}


def from_flax_batch_norm(
  layer: nn.BatchNorm | nnx.BatchNorm, variables: Mapping[str, Any] | None = None
) -> tuple[BatchNormalization, dict[str, dict[str, Any]]]:
  """A `kbn_jax.BatchNormalization` equal to a Flax batch norm, with its converted variables.

  The variables are checked first: complete (``scale``/``bias`` as the layer's ``use_scale``/
  ``use_bias`` say), real floating, one shared shape. NaN/Inf values and negative variances load
  (Flax loads them) with a warning naming the layer and the count.

  Args:
    layer: an ``flax.linen.BatchNorm`` (then `variables` are its ``{"params": {"scale",
      "bias"}, "batch_stats": {"mean", "var"}}``, e.g. ``model_vars["params"]["BatchNorm_0"]``
      and the same key of ``batch_stats``, gathered into one dict) or an ``nnx.BatchNorm``
      (its own attributes are the variables).
    variables: the linen layer's variables; not used for NNX.

  Returns:
    ``(layer, variables)``: the kbn_jax layer (``fused=False``, Flax's epsilon and momentum)
    and ``{"params": {"gamma", "beta"}, "batch_stats": {"moving_mean", "moving_variance"}}``.

  Raises:
    TypeError: for another layer type, a linen layer without `variables`, or a variable that is
      not a real floating array.
    ValueError: for missing, extra or mismatched variables (the message names the variable),
      or Flax options kbn_jax has no counterpart for.
  """
  if isinstance(layer, nnx.BatchNorm):
    axis = layer.axis
    options = {"axis_name": layer.axis_name, "axis_index_groups": layer.axis_index_groups}
    flax_vars = {
      name: getattr(layer, name)[...] for name in _NAMES if getattr(layer, name, None) is not None
    }
  elif isinstance(layer, nn.BatchNorm):
    if not isinstance(variables, Mapping):
      raise TypeError(
        "`variables` are needed for a linen nn.BatchNorm: pass {'params': ..., "
        "'batch_stats': ...} of that layer (its sub-trees of the model's variables)."
      )
    axis = layer.axis
    options = {"axis_name": layer.axis_name, "axis_index_groups": layer.axis_index_groups}
    flax_vars = {**variables.get("params", {}), **variables.get("batch_stats", {})}
  else:
    raise TypeError(
      f"`layer` must be flax.linen.BatchNorm or flax.nnx.BatchNorm, got {type(layer).__name__}."
    )
  label = _label(layer)
  arrays = _checked_variables(flax_vars, layer, label)
  kbn_layer = BatchNormalization(
    axis=tuple(axis) if isinstance(axis, (list, tuple)) else axis,
    momentum=float(layer.momentum),
    epsilon=float(layer.epsilon),
    center=layer.use_bias,
    scale=layer.use_scale,
    fused=False,
    **options,
  )
  found = _suspicious.describe(arrays, ("var",))
  if found:
    warnings.warn(_SUSPICIOUS.format(label=label, found=found), stacklevel=2)
  converted: dict[str, dict[str, Any]] = {"batch_stats": {}}
  for theirs, ours in _NAMES.items():
    if theirs in arrays:
      collection = "params" if ours in ("gamma", "beta") else "batch_stats"
      value = jnp.asarray(arrays[theirs])
      if collection == "batch_stats":
        value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
      converted.setdefault(collection, {})[ours] = value
  return kbn_layer, converted


_SUSPICIOUS = (
  "{label}: {found}; loaded as they are, as Flax does (a negative variance makes inference NaN "
  "on its channels, a non-finite value spreads to every output)."
)


def _label(layer: Any) -> str:
  name = getattr(layer, "name", None) if isinstance(layer, nn.Module) else None
  return f"Flax {type(layer).__name__}" + (f" {name!r}" if name else "")


def _checked_variables(
  flax_vars: Mapping[str, Any], layer: Any, label: str
) -> dict[str, np.ndarray]:
  """The layer's variables as NumPy arrays: complete, real floating, one shared feature shape."""
  unknown = sorted(str(k) for k in flax_vars if k not in _NAMES)
  if unknown:
    raise ValueError(
      f"{label}: unknown variables {unknown}; a Flax batch norm has {sorted(_NAMES)}."
    )
  needed = ["mean", "var"] + ["scale"] * bool(layer.use_scale) + ["bias"] * bool(layer.use_bias)
  missing = [name for name in needed if name not in flax_vars]
  if missing:
    raise ValueError(
      f"{label}: the variables lack {missing} (use_scale={layer.use_scale}, "
      f"use_bias={layer.use_bias}); pass the layer's params and batch_stats together."
    )
  extra = [n for n in ("scale", "bias") if n in flax_vars and n not in needed]
  if extra:
    raise ValueError(
      f"{label}: the variables have {extra}, but the layer has use_scale={layer.use_scale}, "
      f"use_bias={layer.use_bias}; they do not belong to this layer."
    )
  arrays = {}
  for name in needed:
    try:
      array = np.asarray(flax_vars[name])
    except (TypeError, ValueError) as error:
      raise TypeError(f"{label}: variable {name!r} is not an array ({error}).") from None
    if array.dtype.kind != "f" and str(array.dtype) != "bfloat16":
      raise TypeError(
        f"{label}: variable {name!r} has dtype {array.dtype}; batch-norm variables are real "
        "floating arrays."
      )
    arrays[name] = array
  shapes = {name: a.shape for name, a in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"{label}: the variables' shapes differ: {shapes}; they share one shape.")
  shape = arrays["mean"].shape
  expected = getattr(layer, "num_features", None)
  if not shape or 0 in shape or (expected is not None and shape != (expected,)):
    want = f"({expected},)" if expected is not None else "a non-empty feature shape"
    raise ValueError(f"{label}: the variables have the shape {shape}; {want} expected.")
  return arrays
