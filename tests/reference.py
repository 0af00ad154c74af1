"""An independent float64 NumPy reference of the Keras 2.x V1 BatchNormalization layer.

Test-only oracle. It re-derives every formula from the spec (``docs/keras_bn_v1_spec.md``
§§3.3-3.9 and §4; "spec §N" in the tests) without importing `kbn_jax`, JAX or Flax, and
computes in float64 throughout, so tests can compare the library (float32 or 16-bit) against it
with tolerances set by dtype.

State is a dict of float64 arrays in the *feature shape* (the sizes of the feature axes in
increasing axis order), named like the layer's variables: ``gamma``, ``beta`` (params) and
``moving_mean``, ``moving_variance``, ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``.

Entry points:

* `keras_v1_reference`: one call of the layer, returning ``(y, new_state)``;
* `keras_v1_gradients`: closed-form gradients of ``sum(y * dy)`` w.r.t. input, gamma and beta;
* `v1_fused`: Keras V1's fused resolution (which decides the Bessel-corrected variance update);
* `initial_state`, `state_from_keras_weights`: build a state dict;
* small helpers: `feature_axes`, `moments`, `split_ghost_batches`, `bessel_factor`, `ema`,
  `renorm_correction`, `normalize`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STAT_NAMES = ("moving_mean", "moving_variance")
RENORM_STAT_NAMES = ("moving_stddev", "renorm_mean", "renorm_stddev")


# --------------------------------------------------------------------------------------------
# Axes and layout
# --------------------------------------------------------------------------------------------


def feature_axes(axis: int | Sequence[int], rank: int) -> tuple[int, ...]:
  """Non-negative feature axes in increasing order (Keras's `validate_axis`, then sorted)."""
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  resolved = sorted(int(a) + rank if a < 0 else int(a) for a in axes)
  if any(not 0 <= a < rank for a in resolved) or len(set(resolved)) != len(resolved):
    raise ValueError(f"bad axis {axis!r} for rank {rank}")
  return tuple(resolved)


def feature_shape(shape: Sequence[int], axis: int | Sequence[int]) -> tuple[int, ...]:
  """Sizes of the feature axes of an input of `shape`, in increasing axis order."""
  return tuple(shape[a] for a in feature_axes(axis, len(shape)))


def broadcast_feature(value: np.ndarray, axes: Sequence[int], ndim: int) -> np.ndarray:
  """Reshapes a feature-shaped array so it broadcasts against a rank-`ndim` array."""
  shape = [1] * ndim
  for a, size in zip(axes, np.shape(value), strict=True):
    shape[a] = size
  return np.reshape(value, shape)


def reduction_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  """Every axis that is not a feature axis."""
  return tuple(a for a in range(ndim) if a not in axes)


def split_ghost_batches(x: np.ndarray, virtual_batch_size: int) -> np.ndarray:
  """Keras's row-major ``(B, ...) -> (vbs, B // vbs, ...)``: ghost batch j is strided.

  Ghost batch ``j`` (index on axis 1) holds samples ``{j, j + B/vbs, j + 2 B/vbs, ...}``.
  """
  batch = x.shape[0]
  if batch % virtual_batch_size:
    raise ValueError(f"virtual_batch_size {virtual_batch_size} does not divide {batch}")
  return np.reshape(x, (virtual_batch_size, batch // virtual_batch_size) + x.shape[1:])


def merge_ghost_batches(x: np.ndarray) -> np.ndarray:
  """Inverse of `split_ghost_batches`."""
  return np.reshape(x, (x.shape[0] * x.shape[1],) + x.shape[2:])


def ghost_batch_members(batch_size: int, virtual_batch_size: int) -> list[list[int]]:
  """Sample indices of each ghost batch, written out explicitly (for layout tests)."""
  groups = batch_size // virtual_batch_size
  return [list(range(j, batch_size, groups)) for j in range(groups)]


# --------------------------------------------------------------------------------------------
# Elementary formulas
# --------------------------------------------------------------------------------------------


def _f64(value: Any) -> np.ndarray:
  return np.asarray(value, dtype=np.float64)


def moments(
  x: np.ndarray, axes: Sequence[int], *, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Two-pass mean and *biased* variance over `axes`, keepdims, float64.

  With `weights` (already broadcast to ``x.shape``) this is ``tf.nn.weighted_moments`` with
  ``div_no_nan``: a group whose weights sum to 0 gets mean 0 and variance 0.
  """
  x = _f64(x)
  axes = tuple(axes)
  if weights is None:
    mean = np.mean(x, axis=axes, keepdims=True)
    variance = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    return mean, variance
  weights = _f64(weights)
  total = np.sum(weights, axis=axes, keepdims=True)
  safe = np.where(total == 0, 1.0, total)
  mean = np.where(total == 0, 0.0, np.sum(weights * x, axis=axes, keepdims=True) / safe)
  m2 = np.sum(weights * np.square(x - mean), axis=axes, keepdims=True)
  variance = np.where(total == 0, 0.0, m2 / safe)
  return mean, variance


def mask_weights(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Keras's mask weights: ``expand_dims(mask, -1)`` broadcast to the input's shape."""
  return np.broadcast_to(_f64(mask)[..., None], tuple(shape))


def bessel_factor(count: int) -> float:
  """The fused kernel's ``n / max(n - 1, 1)``."""
  return count / max(count - 1, 1)


def ema(old: np.ndarray, value: np.ndarray, momentum: float) -> np.ndarray:
  """``old * momentum + value * (1 - momentum)``, no debiasing (Keras's assign-sub, exactly)."""
  return _f64(old) - (_f64(old) - _f64(value)) * (1.0 - momentum)


def renorm_correction(
  mean: np.ndarray,
  variance: np.ndarray,
  renorm_mean: np.ndarray,
  renorm_stddev: np.ndarray,
  *,
  epsilon: float,
  renorm_clipping: Mapping[str, float | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Batch Renormalization's ``(r, d)`` from pre-update renorm statistics (spec §3.6).

  ``r = clip(sqrt(v + eps) / s, rmin, rmax)``, ``d = clip((mu - m) / s, -dmax, dmax)`` with
  ``s = max(renorm_stddev, sqrt(eps))``; rmin is applied before rmax.
  """
  clipping = dict(renorm_clipping or {})
  floor = np.maximum(_f64(renorm_stddev), math.sqrt(epsilon))
  r = np.sqrt(_f64(variance) + epsilon) / floor
  d = (_f64(mean) - _f64(renorm_mean)) / floor
  if clipping.get("rmin") is not None:
    r = np.maximum(r, clipping["rmin"])
  if clipping.get("rmax") is not None:
    r = np.minimum(r, clipping["rmax"])
  if clipping.get("dmax") is not None:
    d = np.minimum(np.maximum(d, -clipping["dmax"]), clipping["dmax"])
  return r, d


def normalize(
  x: np.ndarray,
  mean: np.ndarray,
  variance: np.ndarray,
  *,
  epsilon: float,
  scale: np.ndarray | None = None,
  offset: np.ndarray | None = None,
) -> np.ndarray:
  """``(x - mean) / sqrt(variance + epsilon) * scale + offset`` in float64."""
  y = (_f64(x) - mean) / np.sqrt(_f64(variance) + epsilon)
  if scale is not None:
    y = y * scale
  if offset is not None:
    y = y + offset
  return y


def v1_fused(
  *,
  axis: int | Sequence[int],
  rank: int,
  renorm: bool = False,
  virtual_batch_size: int | None = None,
  adjustment: Any = None,
  fused: bool | None = None,
  compute_dtype: Any = "float32",
) -> bool:
  """Keras V1's fused resolution at build (spec §§1.5 and 2 step 3-4).

  True iff `fused` is None/True, the rank is 4 with the single axis 1 or 3, or rank 5 with the
  single axis 1 or 4 (after normalization), there is no renorm, ghost batch or adjustment, and
  the compute dtype is float16, bfloat16 or float32.
  """
  if fused is False:
    return False
  axes = feature_axes(axis, rank)
  allowed = {4: (1, 3), 5: (1, 4)}.get(rank, ())
  return (
    len(axes) == 1
    and axes[0] in allowed
    and not renorm
    and virtual_batch_size is None
    and adjustment is None
    and np.dtype(compute_dtype).name in ("float16", "bfloat16", "float32")
  )


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def initial_state(
  features: Sequence[int],
  *,
  center: bool = True,
  scale: bool = True,
  renorm: bool = False,
  gamma: float = 1.0,
  beta: float = 0.0,
  moving_mean: float = 0.0,
  moving_variance: float = 1.0,
) -> dict[str, np.ndarray]:
  """The state after ``init`` with constant initializers (Keras defaults: 1, 0, 0, 1)."""
  full = lambda value: np.full(tuple(features), value, np.float64)  # noqa: E731
  state = {"moving_mean": full(moving_mean), "moving_variance": full(moving_variance)}
  if scale:
    state["gamma"] = full(gamma)
  if center:
    state["beta"] = full(beta)
  if renorm:
    state["moving_stddev"] = full(math.sqrt(moving_variance))
    state["renorm_mean"] = full(moving_mean)
    state["renorm_stddev"] = full(math.sqrt(moving_variance))
  return state


def state_from_keras_weights(
  weights: Mapping[str, np.ndarray], input_shape: Sequence[int], axis: int | Sequence[int]
) -> dict[str, np.ndarray]:
  """Converts Keras-shaped weights (``(C,)``, full rank, or rank+1 with ghost batches) to the
  feature shape. Dropping size-1 dims keeps the feature axes in increasing order."""
  features = feature_shape(input_shape, axis)
  return {name: _f64(value).reshape(features) for name, value in weights.items()}


def state_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flattens a Flax ``{"params": ..., "batch_stats": ...}`` dict into a float64 state dict."""
  state = {}
  for collection in ("params", "batch_stats"):
    for name, value in variables.get(collection, {}).items():
      state[name] = _f64(value)
  return state


def variables_from_state(state: Mapping[str, np.ndarray], dtype: Any = np.float32) -> dict:
  """The inverse of `state_from_variables`, as NumPy arrays of `dtype`."""
  params = {k: np.asarray(v, dtype) for k, v in state.items() if k in ("gamma", "beta")}
  stats = {k: np.asarray(v, dtype) for k, v in state.items() if k not in ("gamma", "beta")}
  variables = {"batch_stats": stats}
  if params:
    variables["params"] = params
  return variables


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


_CONFIG_DEFAULTS = {
  "axis": -1,
  "momentum": 0.99,
  "epsilon": 1e-3,
  "center": True,
  "scale": True,
  "renorm": False,
  "renorm_clipping": None,
  "renorm_momentum": 0.99,
  "fused_resolved": False,
  "virtual_batch_size": None,
  "adjustment": None,
  "mask": None,
  "training": False,
  "trainable": True,
}


class _Forward:
  """Everything one call computes, kept for the gradient."""

  def __init__(self, **kwargs):
    self.__dict__.update(kwargs)


def _forward(
  x,
  state,
  *,
  axis,
  momentum,
  epsilon,
  center,
  scale,
  renorm,
  renorm_clipping,
  renorm_momentum,
  fused_resolved,
  virtual_batch_size,
  adjustment,
  mask,
  training,
  trainable,
) -> _Forward:
  x = _f64(x)
  if x.ndim == 0:
    raise ValueError("scalar input")
  axes = feature_axes(axis, x.ndim)
  features = tuple(x.shape[a] for a in axes)
  gamma = _f64(state["gamma"]) if scale else None
  beta = _f64(state["beta"]) if center else None
  new_state = {k: _f64(v).copy() for k, v in state.items()}

  if not training:
    bc = lambda v: broadcast_feature(_f64(v), axes, x.ndim)  # noqa: E731
    mean, variance = bc(state["moving_mean"]), bc(state["moving_variance"])
    s = bc(gamma) if scale else 1.0
    o = bc(beta) if center else 0.0
    sigma = np.sqrt(variance + epsilon)
    x_hat = (x - mean) / sigma
    return _Forward(
      training=False,
      y=x_hat * s + o,
      x_hat=x_hat,
      sigma=sigma,
      total_scale=np.broadcast_to(s, x.shape) if np.ndim(s) else s,
      pre_gamma=x_hat,
      axes=axes,
      split=False,
      new_state=new_state,
      weights=None,
      red=None,
    )

  split = virtual_batch_size is not None
  xs = split_ghost_batches(x, virtual_batch_size) if split else x
  fax = tuple(a + 1 for a in axes) if split else axes
  red = tuple(a for a in reduction_axes(fax, xs.ndim) if not (split and a == 1))
  if mask is not None and fused_resolved:
    mask = None  # Keras ignores the mask on the fused path (with a warning).
  weights = mask_weights(mask, xs.shape) if mask is not None else None
  mean, variance = moments(xs, red, weights=weights)
  if split:
    batch_mean = np.mean(mean, axis=1, keepdims=True)
    batch_variance = np.mean(variance, axis=1, keepdims=True)
  else:
    batch_mean, batch_variance = mean, variance
  batch_mean = batch_mean.reshape(features)
  batch_variance = batch_variance.reshape(features)

  bc = lambda v: broadcast_feature(_f64(v), fax, xs.ndim)  # noqa: E731
  # y = ((x_hat * r + d) * adj_scale + adj_bias) * gamma + beta  (spec §8, item 9).
  sigma = np.sqrt(variance + epsilon)
  x_hat = (xs - mean) / sigma
  pre = x_hat
  total_scale = np.ones(())
  if renorm:
    r, d = renorm_correction(
      batch_mean,
      batch_variance,
      state["renorm_mean"],
      state["renorm_stddev"],
      epsilon=epsilon,
      renorm_clipping=renorm_clipping,
    )
    pre = pre * bc(r) + bc(d)
    total_scale = total_scale * bc(r)
  if adjustment is not None:
    adj_scale, adj_bias = (_f64(a) for a in adjustment)
    pre = pre * adj_scale + adj_bias
    total_scale = total_scale * adj_scale
  y = pre
  if scale:
    y = y * bc(gamma)
    total_scale = total_scale * bc(gamma)
  if center:
    y = y + bc(beta)

  if trainable:
    count = math.prod(xs.shape[a] for a in red)
    if renorm:
      stddev = np.sqrt(batch_variance + epsilon)
      new_state["renorm_mean"] = ema(state["renorm_mean"], batch_mean, renorm_momentum)
      new_state["renorm_stddev"] = ema(state["renorm_stddev"], stddev, renorm_momentum)
      new_state["moving_mean"] = ema(state["moving_mean"], batch_mean, momentum)
      new_state["moving_stddev"] = ema(state["moving_stddev"], stddev, momentum)
      new_state["moving_variance"] = np.maximum(
        np.square(new_state["moving_stddev"]) - epsilon, 0.0
      )
    else:
      target = batch_variance * bessel_factor(count) if fused_resolved else batch_variance
      new_state["moving_mean"] = ema(state["moving_mean"], batch_mean, momentum)
      new_state["moving_variance"] = ema(state["moving_variance"], target, momentum)

  return _Forward(
    training=True,
    y=merge_ghost_batches(y) if split else y,
    x_hat=x_hat,
    sigma=sigma,
    total_scale=np.broadcast_to(total_scale, xs.shape),
    pre_gamma=pre,
    axes=fax,
    split=split,
    new_state=new_state,
    weights=weights,
    red=red,
  )


def keras_v1_reference(
  x: np.ndarray,
  state: Mapping[str, np.ndarray],
  *,
  axis: int | Sequence[int] = -1,
  momentum: float = 0.99,
  epsilon: float = 1e-3,
  center: bool = True,
  scale: bool = True,
  renorm: bool = False,
  renorm_clipping: Mapping[str, float | None] | None = None,
  renorm_momentum: float = 0.99,
  fused_resolved: bool = False,
  virtual_batch_size: int | None = None,
  adjustment: tuple[np.ndarray, np.ndarray] | None = None,
  mask: np.ndarray | None = None,
  training: bool = False,
  trainable: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """One call of the Keras V1 layer, in float64.

  Args:
    x: the input (its values are taken exactly, then promoted to float64). Pass it already cast
      to the layer's compute dtype if Keras would cast it (e.g. a float16 layer).
    state: feature-shaped weights (see the module docstring); ``gamma``/``beta`` only if
      `scale`/`center`, the renorm statistics only if `renorm`.
    axis, momentum, epsilon, center, scale, renorm, renorm_clipping, renorm_momentum,
      virtual_batch_size, trainable: the layer's arguments (Keras semantics).
    fused_resolved: whether the layer resolved to the fused kernel (see `v1_fused`); only the
      moving-variance update changes (Bessel-corrected) and a mask is ignored.
    adjustment: ``(adj_scale, adj_bias)`` arrays broadcastable to `x`, or None.
    mask: optional ``x.shape[:-1]`` weights (non-fused training only).
    training: batch statistics and updates (True) or moving statistics (False).
    trainable: V1 semantics: False keeps batch statistics in training but skips every update.

  Returns:
    ``(y, new_state)``, both float64; `new_state` equals `state` unless training and trainable.
  """
  forward = _forward(
    x,
    state,
    axis=axis,
    momentum=momentum,
    epsilon=epsilon,
    center=center,
    scale=scale,
    renorm=renorm,
    renorm_clipping=renorm_clipping,
    renorm_momentum=renorm_momentum,
    fused_resolved=fused_resolved,
    virtual_batch_size=virtual_batch_size,
    adjustment=adjustment,
    mask=mask,
    training=training,
    trainable=trainable,
  )
  return forward.y, forward.new_state


def keras_v1_gradients(
  x: np.ndarray, state: Mapping[str, np.ndarray], dy: np.ndarray, **config: Any
) -> dict[str, np.ndarray]:
  """Closed-form float64 gradients of ``sum(y * dy)`` w.r.t. ``x``, ``gamma`` and ``beta``.

  Same keyword arguments as `keras_v1_reference`. In training, the gradient flows through the
  batch mean and (biased, possibly mask-weighted) variance; renorm's ``r, d`` are constants
  (stop_gradient) and the adjustment's ``(scale, bias)`` are treated as constants too. With
  weights ``w``, ``W = sum(w)`` per group, ``g = dy * total_scale`` and ``x_hat = (x - mean) /
  sigma``:

  .. math::
    \\partial x_j = \\frac{1}{\\sigma}\\Big(g_j - \\frac{w_j}{W}\\sum_i g_i
      - \\frac{w_j \\hat x_j}{W}\\sum_i g_i \\hat x_i\\Big)

  (the usual ``g - mean(g) - x_hat * mean(g * x_hat)`` when unweighted; the ``1/W`` terms vanish
  for an all-zero group, as TF's ``div_no_nan`` gradient does).

  Returns:
    dict with ``x`` and, where the weights exist, ``gamma`` and ``beta`` (feature-shaped).
  """
  unknown = set(config) - set(_CONFIG_DEFAULTS)
  if unknown:
    raise TypeError(f"unknown arguments {sorted(unknown)}")
  config = {**_CONFIG_DEFAULTS, **config}
  f = _forward(x, state, **config)
  dy = _f64(dy)
  if f.split:
    dy = split_ghost_batches(dy, config["virtual_batch_size"])
  not_features = reduction_axes(f.axes, dy.ndim)
  features = tuple(dy.shape[a] for a in f.axes)
  grads = {}
  if config["scale"]:
    grads["gamma"] = np.sum(dy * f.pre_gamma, axis=not_features).reshape(features)
  if config["center"]:
    grads["beta"] = np.sum(dy * np.ones_like(f.pre_gamma), axis=not_features).reshape(features)
  g = dy * f.total_scale
  if not f.training:
    grads["x"] = g / f.sigma
    return grads
  w = np.ones_like(g) if f.weights is None else f.weights
  total = np.sum(w, axis=f.red, keepdims=True)
  inv_total = np.where(total == 0, 0.0, 1.0 / np.where(total == 0, 1.0, total))
  # The sums over i are unweighted (every output depends on the mean); w_j multiplies after.
  sum_g = np.sum(g, axis=f.red, keepdims=True)
  sum_gx = np.sum(g * f.x_hat, axis=f.red, keepdims=True)
  dx = (g - w * inv_total * sum_g - w * f.x_hat * inv_total * sum_gx) / f.sigma
  grads["x"] = merge_ghost_batches(dx) if f.split else dx
  return grads


def run_steps(
  xs: Sequence[np.ndarray], state: Mapping[str, np.ndarray], **config: Any
) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]]:
  """Applies `keras_v1_reference` in training to each input in turn (state threaded through).

  Returns:
    the outputs and the state after each step.
  """
  outputs, states = [], []
  for x in xs:
    y, state = keras_v1_reference(x, state, training=True, **config)
    outputs.append(y)
    states.append(state)
  return outputs, states
