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

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from kbn_jax.layers import BatchNormalization

_NAMES = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}


def from_flax_batch_norm(
  layer: nn.BatchNorm | nnx.BatchNorm, variables: Mapping[str, Any] | None = None
) -> tuple[BatchNormalization, dict[str, dict[str, Any]]]:
  """A `kbn_jax.BatchNormalization` equal to a Flax batch norm, with its converted variables.

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
    TypeError: for another layer type, or a linen layer without `variables`.
    ValueError: for Flax options kbn_jax has no counterpart for.
  """
  if isinstance(layer, nnx.BatchNorm):
    axis = layer.axis
    options = {"axis_name": layer.axis_name, "axis_index_groups": layer.axis_index_groups}
    flax_vars = {
      name: getattr(layer, name)[...] for name in _NAMES if getattr(layer, name, None) is not None
    }
  elif isinstance(layer, nn.BatchNorm):
    if variables is None:
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
  missing = [name for name in ("mean", "var") if name not in flax_vars]
  if missing:
    raise ValueError(f"The Flax variables lack {missing}; pass the layer's batch_stats too.")
  kbn_layer = BatchNormalization(
    axis=tuple(axis) if isinstance(axis, (list, tuple)) else axis,
    momentum=float(layer.momentum),
    epsilon=float(layer.epsilon),
    center=layer.use_bias,
    scale=layer.use_scale,
    fused=False,
    **options,
  )
  converted: dict[str, dict[str, Any]] = {"batch_stats": {}}
  for theirs, ours in _NAMES.items():
    if theirs in flax_vars:
      collection = "params" if ours in ("gamma", "beta") else "batch_stats"
      value = jnp.asarray(flax_vars[theirs])
      if collection == "batch_stats":
        value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
      converted.setdefault(collection, {})[ours] = value
  return kbn_layer, converted
