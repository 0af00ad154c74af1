"""Folding trained batch normalization into the preceding ``Dense`` or ``Conv`` layer.

In inference, `kbn_jax.BatchNormalization` is a per-channel affine map of its input,

.. math::
  y = x \\cdot a + b, \\qquad a = \\frac{\\gamma}{\\sqrt{v + \\epsilon}}, \\qquad b = \\beta - m a,

with ``m = moving_mean`` and ``v = moving_variance``. When the layer directly follows a linear
layer ``x = u K + c`` whose output features are on the last axis (``flax.linen.Dense``, or
``flax.linen.Conv`` with channels last), the two compose into one linear layer with kernel
``K a`` (each output channel scaled) and bias ``c a + b``. The folded model computes the same
function with one layer fewer, which is what a serving graph wants.

This holds for every Keras V1 configuration, because V1 inference always reads
``moving_mean`` and ``moving_variance``: with ``renorm=True`` the stored ``moving_variance`` is
the one Keras derives from ``moving_stddev`` (the renorm statistics are not used in inference),
ghost batches do not change inference, and ``trainable=False`` does not either.

Example::

  >>> import jax, jax.numpy as jnp, flax.linen as nn, kbn_jax
  >>> from kbn_jax import folding
  >>> x = jax.random.normal(jax.random.key(0), (8, 3))
  >>> dense, bn = nn.Dense(4), kbn_jax.BatchNormalization()
  >>> dense_params = dense.init(jax.random.key(1), x)["params"]
  >>> bn_variables = bn.init(jax.random.key(2), dense.apply({"params": dense_params}, x))
  >>> folded = folding.fold_batch_norm(dense_params, bn, bn_variables)
  >>> y = bn.apply(bn_variables, dense.apply({"params": dense_params}, x))
  >>> bool(jnp.allclose(dense.apply({"params": folded}, x), y, atol=1e-5))
  True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from kbn_jax import _moments
from kbn_jax._config import canonicalize_axis
from kbn_jax.linen import BatchNormalization

__all__ = ["fold_batch_norm", "fold_into_kernel", "inference_affine"]


def inference_affine(
  layer: BatchNormalization, variables: Mapping[str, Any]
) -> tuple[jax.Array, jax.Array]:
  """The per-channel ``(scale, shift)`` with ``layer.apply(variables, x) == x * scale + shift``.

  Args:
    layer: the `kbn_jax.BatchNormalization` whose configuration (``epsilon``, ``center``,
      ``scale``, ``axis``) produced `variables`; it must normalize a single feature axis.
    variables: that layer's variables, as passed to ``layer.apply``: ``{"params": {"gamma",
      "beta"}, "batch_stats": {"moving_mean", "moving_variance", ...}}`` (``gamma``/``beta``
      only where ``scale``/``center`` are set).

  Returns:
    ``(scale, shift)``, each of the feature shape ``(C,)``, in the dtype the layer computes its
    statistics in (at least float32).

  Raises:
    TypeError: if `layer` is not a `kbn_jax.BatchNormalization`.
    ValueError: if the layer normalizes several axes, or a variable is missing or misshaped.
  """
  _check_layer(layer)
  params = variables.get("params", {})
  stats = variables.get("batch_stats", {})
  mean = _required(stats, "moving_mean", "batch_stats")
  variance = _required(stats, "moving_variance", "batch_stats")
  gamma = _required(params, "gamma", "params") if layer.scale else None
  beta = _required(params, "beta", "params") if layer.center else None
  dtype = _moments.reduction_dtype(jnp.asarray(mean).dtype)
  mean, variance = jnp.asarray(mean, dtype), jnp.asarray(variance, dtype)
  if mean.ndim != 1 or variance.shape != mean.shape:
    raise ValueError(
      f"`moving_mean` and `moving_variance` must have the feature shape (C,) of a single axis; "
      f"received shapes {mean.shape} and {variance.shape}. Pass the variables of one layer "
      "(e.g. {'params': params['bn0'], 'batch_stats': batch_stats['bn0']})."
    )
  # The same arithmetic as `kbn_jax.functional.normalize` in inference: rsqrt(v + eps) * gamma.
  scale = jax.lax.rsqrt(variance + jnp.asarray(layer.epsilon, dtype))
  for name, value in (("gamma", gamma), ("beta", beta)):
    if value is not None and jnp.shape(value) != mean.shape:
      raise ValueError(
        f"`{name}` has shape {jnp.shape(value)} but `moving_mean` has {mean.shape}; the "
        "variables must come from one layer."
      )
  if gamma is not None:
    scale = scale * jnp.asarray(gamma).astype(dtype)
  shift = -mean * scale
  if beta is not None:
    shift = jnp.asarray(beta).astype(dtype) + shift
  return scale, shift


def fold_into_kernel(
  kernel: jax.typing.ArrayLike,
  bias: jax.typing.ArrayLike | None,
  scale: jax.typing.ArrayLike,
  shift: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  """Composes a linear layer ``u @ kernel + bias`` with the channel-wise ``x * scale + shift``.

  Args:
    kernel: a kernel whose last axis holds the output features: ``(in, out)`` for
      ``flax.linen.Dense``, ``(*window, in, out)`` for ``flax.linen.Conv``.
    bias: the layer's bias of shape ``(out,)``, or ``None`` for a layer without bias.
    scale, shift: per-output-channel arrays of shape ``(out,)``, e.g. from `inference_affine`.

  Returns:
    ``(kernel * scale, bias * scale + shift)``, computed in at least float32 and returned in the
    kernel's (and the bias's, or else the kernel's) dtype.

  Raises:
    ValueError: if the shapes of `bias`, `scale` or `shift` do not match the output features.
  """
  kernel = jnp.asarray(kernel)
  features = kernel.shape[-1] if kernel.ndim else None
  for name, value in (("bias", bias), ("scale", scale), ("shift", shift)):
    if value is not None and jnp.shape(value) != (features,):
      raise ValueError(
        f"`{name}` has shape {jnp.shape(value)} but the kernel of shape {kernel.shape} has "
        f"{features} output features on its last axis; batch normalization can only be folded "
        "into the layer right before it, with channels last."
      )
  bias_dtype = kernel.dtype if bias is None else jnp.asarray(bias).dtype
  dtype = _moments.promote_dtypes(kernel.dtype, bias_dtype, jnp.asarray(scale).dtype)
  dtype = _moments.reduction_dtype(dtype)
  scale = jnp.asarray(scale).astype(dtype)
  shift = jnp.asarray(shift).astype(dtype)
  bias = jnp.zeros((features,), dtype) if bias is None else jnp.asarray(bias).astype(dtype)
  new_kernel = kernel.astype(dtype) * scale.reshape((1,) * (kernel.ndim - 1) + (features,))
  new_bias = bias * scale + shift
  return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)


def fold_batch_norm(
  params: Mapping[str, Any], layer: BatchNormalization, variables: Mapping[str, Any]
) -> dict[str, Any]:
  """Folds a trained `kbn_jax.BatchNormalization` into the ``Dense``/``Conv`` layer before it.

  Args:
    params: the preceding layer's parameters, ``{"kernel": ..., "bias": ...}`` (``bias`` is
      optional, e.g. ``nn.Conv(..., use_bias=False)``); the output features must be the kernel's
      last axis and the batch-norm layer's feature axis.
    layer: the batch-norm layer (its configuration: ``epsilon``, ``center``, ``scale``).
    variables: the batch-norm layer's variables, as passed to ``layer.apply``.

  Returns:
    New parameters ``{"kernel", "bias"}`` (plus any other entries of `params`, unchanged) for the
    same layer type *with* a bias, e.g. ``nn.Conv(..., use_bias=True)``, such that it equals the
    original layer followed by ``layer`` in inference.

  Raises:
    TypeError, ValueError: for a wrong layer type, several feature axes or mismatched shapes.
  """
  if "kernel" not in params:
    raise ValueError(
      f"`params` must hold the preceding layer's 'kernel' (and optionally 'bias'); received "
      f"keys {sorted(params)}. Pass e.g. variables['params']['Conv_0']."
    )
  scale, shift = inference_affine(layer, variables)
  kernel, bias = fold_into_kernel(params["kernel"], params.get("bias"), scale, shift)
  folded = dict(params)
  folded.update(kernel=kernel, bias=bias)
  return folded


def _check_layer(layer: Any) -> None:
  if not isinstance(layer, BatchNormalization):
    raise TypeError(
      f"`layer` must be a kbn_jax.BatchNormalization (its configuration gives epsilon, center "
      f"and scale); received {type(layer).__name__}. Pass the layer instance, e.g. "
      "kbn_jax.BatchNormalization(epsilon=1e-3)."
    )
  axis = canonicalize_axis(layer.axis)
  if not isinstance(axis, int) and len(axis) != 1:
    raise ValueError(
      f"`axis`={layer.axis!r} normalizes several axes; folding into a kernel needs a single "
      "feature axis, the last one (axis=-1), which holds the preceding layer's output features."
    )


def _required(collection: Mapping[str, Any], name: str, collection_name: str) -> Any:
  if name not in collection:
    raise ValueError(
      f"`variables[{collection_name!r}]` has no {name!r} (keys: {sorted(collection)}); pass the "
      "batch-norm layer's own variables, with a `layer` configured as in training (a layer with "
      "scale=False has no 'gamma', with center=False no 'beta')."
    )
  return collection[name]
