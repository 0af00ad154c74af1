"""The whole batch-normalization layer as pure functions of arrays and a `BatchNormConfig`.

`batch_normalization` is the layer: which moments to take (plain, masked, ghost batches per
device or global, across devices), renorm's correction and state, the fused-path Bessel rule,
Keras's update order, the closed-form backward, empty batches, and the semantics of Keras V1,
V2, Keras 3 and PyTorch. The linen and NNX Modules are thin shells around it; raw JAX, Equinox
and Haiku code calls it directly. Nothing here imports Flax or optax.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from kbn_jax import _fast_train, _validation, initializers, regularizers
from kbn_jax import _math as math_ops
from kbn_jax._config import BatchNormConfig

_FUSED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
_FROM_CONFIG: Any = object()  # "use the config's value" for per-call axis_name / groups


@dataclasses.dataclass(frozen=True)
class Api:
  """How error messages name the caller's remedies, in the words of the API it called.

  Attributes:
    training_hint: how to make a traced `training` static.
    missing_hint: how to pass variables that a call lacks.
    mapping_hint: the transformations that bind a mapped axis name.
    feature_hint: how to fix variables built for other feature sizes.
  """

  training_hint: str
  missing_hint: str
  mapping_hint: str
  feature_hint: str = (
    "Re-run `init` with an input of the new shape, or feed inputs of the shape used at `init`."
  )

  def missing_variable(self, collection: str, names: list[str]) -> str:
    return f"`{collection}` lacks {names}, which this layer needs; {self.missing_hint}"


FUNCTIONAL = Api(
  training_hint=(
    "under `jax.jit`, mark it static (`static_argnames=('training',)`, or `static_argnums` for "
    "a positional argument), or write one step function for training and one for inference"
  ),
  missing_hint=(
    "pass the parameters and statistics that `kbn_jax.functional.init_variables` returned (and "
    "the statistics each training call returns)."
  ),
  feature_hint=(
    "Create them with `functional.init_variables` for an input of this shape, or feed inputs "
    "of the shape they were created for."
  ),
  mapping_hint="`jax.shard_map` (or `jax.pmap`/`jax.vmap`)",
)


def stat_names(config: BatchNormConfig) -> tuple[str, ...]:
  """The statistics of a layer, in Keras's ``get_weights()`` order (plus PyTorch's counter)."""
  names = ("moving_mean", "moving_variance")
  if config.renorm:
    names += ("moving_stddev", "renorm_mean", "renorm_stddev")
  if config.semantics == "torch":
    names += ("num_batches_tracked",)
  return names


def param_names(config: BatchNormConfig) -> tuple[str, ...]:
  """The learned parameters of a layer, in Keras's ``get_weights()`` order."""
  return (("gamma",) if config.scale else ()) + (("beta",) if config.center else ())


def feature_axes(config: BatchNormConfig, rank: int) -> tuple[int, ...]:
  """The non-negative feature axes of a rank-`rank` input, in increasing order.

  Raises:
    ValueError: for a scalar input, an axis out of range, a repeated axis, or a ghost-batch
      layer whose axis includes the batch axis.
  """
  axes = _validation.normalize_axes(_validation.canonicalize_axis(config.axis), rank)
  if config.virtual_batch_size is not None:
    _validation.check_ghost_batch_axes(axes)
  return tuple(sorted(axes))


def feature_shape(config: BatchNormConfig, input_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of every variable: the input's sizes on the feature axes."""
  return tuple(input_shape[a] for a in feature_axes(config, len(input_shape)))


def keras_param_shape(config: BatchNormConfig, input_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Keras's weight shape (spec section 2, step 6).

  Args:
    config: the layer.
    input_shape: the input shape (only the rank and the feature sizes are read).

  Returns:
    ``(C,)`` for one feature axis without ghost batches; otherwise the input rank with 1 on the
    other axes, and one more 1 inserted at index 1 with ghost batches.
  """
  axes = feature_axes(config, len(input_shape))
  if len(axes) == 1 and config.virtual_batch_size is None:
    return (input_shape[axes[0]],)
  full = tuple(input_shape[a] if a in axes else 1 for a in range(len(input_shape)))
  return full[:1] + (1,) + full[1:] if config.virtual_batch_size is not None else full


_STAT_INITIALIZERS = {
  "moving_mean": "moving_mean_initializer",
  "moving_variance": "moving_variance_initializer",
  "moving_stddev": "moving_variance_initializer",
  "renorm_mean": "moving_mean_initializer",
  "renorm_stddev": "moving_variance_initializer",
}
_INITIALIZERS = {
  "gamma": "gamma_initializer",
  "beta": "beta_initializer",
  **_STAT_INITIALIZERS,
}
_KEYLESS_INITIALIZERS = {"zeros", "ones", "constant"}


def initializer_needs_key(config: BatchNormConfig, name: str) -> bool:
  """Whether the initializer of variable `name` may draw random numbers."""
  if name == "num_batches_tracked":
    return False
  identifier = getattr(config, _INITIALIZERS[name])
  if isinstance(identifier, Mapping):
    identifier = identifier.get("class_name", "")
  return not (
    isinstance(identifier, str) and identifier.lower().replace("_", "") in _KEYLESS_INITIALIZERS
  )


def initial_value(
  config: BatchNormConfig, name: str, key: jax.Array | None, input_shape: tuple[int, ...]
) -> jax.Array:
  """The initial value of one variable, in the feature shape.

  Initializers are called with Keras's parameter shape (so fan-based ones see Keras's fans) and
  the result is reshaped to the feature shape. The standard deviations of renorm
  (``moving_stddev``, ``renorm_stddev``) start at the square root of the variance initializer.

  Args:
    config: the layer.
    name: a name from `param_names` or `stat_names`.
    key: a PRNG key; may be None when `initializer_needs_key` is False.
    input_shape: the input shape, with the batch dimension.
  """
  input_shape = tuple(input_shape)
  if name == "num_batches_tracked":
    return jnp.zeros((), jnp.int32)
  shape = feature_shape(config, input_shape)
  dtype = config.param_dtype
  if name in _STAT_INITIALIZERS:
    dtype = math_ops.promote_dtypes(config.param_dtype, jnp.float32)
  argument = _INITIALIZERS[name]
  init = initializers.get(getattr(config, argument), argument=argument)
  key = jax.random.key(0) if key is None else key  # a keyless initializer ignores it
  value = init(key, keras_param_shape(config, input_shape), dtype).reshape(shape)
  return jnp.sqrt(value) if name in ("moving_stddev", "renorm_stddev") else value


def init_variables(
  config: BatchNormConfig, key: jax.Array, input_shape: tuple[int, ...]
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Creates a layer's parameters and statistics for inputs of `input_shape`.

  Args:
    config: the layer.
    key: a PRNG key (only random initializers use it); each variable gets its own.
    input_shape: the input shape, with the batch dimension.

  Returns:
    ``(params, stats)``: ``{"gamma"?, "beta"?}`` in `param_dtype`, and the statistics (see
    `stat_names`) in at least float32, all in the feature shape.
  """
  names = param_names(config) + stat_names(config)
  keys = dict(zip(names, jax.random.split(key, len(names)), strict=True))
  values = {name: initial_value(config, name, keys[name], input_shape) for name in names}
  params = {name: values[name] for name in param_names(config)}
  return params, {name: values[name] for name in stat_names(config)}


def adjustment_takes_key(config: BatchNormConfig) -> bool:
  """Whether the layer's `adjustment` asks for a PRNG key (a ``key`` parameter)."""
  return config.adjustment is not None and (
    "key" in inspect.signature(config.adjustment).parameters
  )


def regularization_penalties(
  config: BatchNormConfig, params: Mapping[str, jax.Array], input_shape: tuple[int, ...]
) -> dict[str, jax.Array]:
  """Keras's weight penalties, on the weights in Keras's parameter shape.

  Returns:
    ``{"gamma_regularizer": ..., "beta_regularizer": ...}`` for the regularized weights that
    exist, float32 scalars.
  """
  keras_shape = keras_param_shape(config, tuple(input_shape))
  penalties = {}
  for name, weight in (("gamma_regularizer", "gamma"), ("beta_regularizer", "beta")):
    penalty = regularizers.get(getattr(config, name), argument=name)
    if penalty is not None and weight in params:
      value = penalty(jnp.reshape(params[weight], keras_shape))
      penalties[name] = jnp.asarray(value, jnp.float32)
  return penalties


def uses_batch_statistics(config: BatchNormConfig, training: bool) -> bool:
  """Whether a call normalizes with batch statistics (V2 and Keras 3 freeze to inference)."""
  return training and not config.frozen_layer_is_inference


def updates_statistics(config: BatchNormConfig, training: bool) -> bool:
  """Whether a call moves the statistics (a training call of a trainable layer)."""
  return training and config.trainable


def batch_normalization(
  x: jax.typing.ArrayLike,
  params: Mapping[str, jax.typing.ArrayLike] | None,
  stats: Mapping[str, jax.typing.ArrayLike],
  config: BatchNormConfig,
  *,
  training: bool,
  mask: jax.typing.ArrayLike | None = None,
  renorm_clipping: Mapping[str, jax.typing.ArrayLike] | None = None,
  adjustment_key: jax.Array | None = None,
  axis_name: Any = _FROM_CONFIG,
  axis_index_groups: Any = _FROM_CONFIG,
  api: Api = FUNCTIONAL,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The whole batch-normalization layer as one pure, jit-able, state-passing function.

  Args:
    x: the input, batch on axis 0 (ghost batches), features on ``config.axis``. It is cast to
      ``config.dtype`` when that is set, and integer or boolean inputs to float, as Keras does.
    params: ``{"gamma": ..., "beta": ...}`` in the feature shape (as ``config.scale`` and
      ``config.center`` ask), or None when the layer has neither.
    stats: the statistics in the feature shape (``moving_mean``, ``moving_variance``, with
      renorm ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``, and with
      ``semantics="torch"`` ``num_batches_tracked``).
    config: the layer's `BatchNormConfig` (static: hashable).
    training: Python bool (static): batch statistics and statistic updates, or inference.
    mask: optional ``x.shape[:-1]`` weights for padding-aware moments; masked-out positions
      must hold finite values (the weights are multiplied in, as in Keras).
    renorm_clipping: optional per-call clipping bounds (may be traced).
    adjustment_key: PRNG key passed to ``config.adjustment`` when it takes a ``key``.
    axis_name, axis_index_groups: override the config's cross-device settings for this call
      (e.g. ``None`` outside ``shard_map``).
    api: how error messages name remedies (front-ends pass their own).

  Returns:
    ``(y, new_stats)``: the output in ``config.dtype`` (or the promotion of input and
    parameter dtypes) and the statistics after the call (the same arrays in inference, for a
    frozen layer, or for an empty batch).
  """
  training = _validation.check_training(training, api.training_hint)
  if axis_name is _FROM_CONFIG:
    axis_name = config.axis_name
  if axis_index_groups is _FROM_CONFIG:
    axis_index_groups = config.axis_index_groups if axis_name is not None else None
  else:  # per-call groups get the config's checks
    _validation.check_axis_index_groups(axis_index_groups, config.virtual_batch_size)
  x = jnp.asarray(x)
  if config.dtype is not None or not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(config.dtype or config.param_dtype)
  axes = feature_axes(config, x.ndim)
  layout = _Layout(x.shape, axes)
  out_dtype = jnp.dtype(config.dtype or math_ops.promote_dtypes(x.dtype, config.param_dtype))
  fused = resolve_fused(config, axes, x.ndim, out_dtype)
  mask = _checked_mask(config, mask, x, fused)
  params = _checked(params or {}, param_names(config), layout.feature_shape, "params", api)
  stats = _checked(stats, stat_names(config), layout.feature_shape, "batch_stats", api)
  x = x.astype(math_ops.reduction_dtype(x.dtype))
  gamma, beta = params.get("gamma"), params.get("beta")
  if not uses_batch_statistics(config, training):
    y = math_ops.normalize(
      x,
      layout.broadcast(stats["moving_mean"]),
      layout.broadcast(stats["moving_variance"]),
      scale=layout.broadcast(gamma),
      offset=layout.broadcast(beta),
      epsilon=config.epsilon,
      subtract_mean_first=fused or config.semantics == "torch",
    )
    return y.astype(out_dtype), dict(stats)
  if layout.count == 0:
    # Keras turns the statistics into NaN here (spec section 4.4); the step is skipped instead,
    # and the empty output depends on no parameter, so its gradients are 0, not NaN.
    return jnp.zeros(x.shape, out_dtype), dict(stats)
  if axis_name is not None:
    _check_axis_name_bound(axis_name, api)
  step = _TrainingStep(config, layout, fused, axis_name, axis_index_groups)
  y, batch_mean, batch_variance = step.normalize(
    x, mask, gamma, beta, stats, renorm_clipping, adjustment_key
  )
  new_stats = dict(stats)
  if updates_statistics(config, training):
    new_stats.update(step.updated_statistics(stats, batch_mean, batch_variance))
  return y.astype(out_dtype), new_stats


class _Layout:
  """Shapes of one call: feature axes and sizes, and how per-channel arrays broadcast."""

  def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...]):
    self.shape = shape
    self.feature_axes = axes
    self.feature_shape = tuple(shape[a] for a in axes)
    # Elements per channel; 0 for an empty batch or an empty reduced axis.
    self.count = math.prod(size for a, size in enumerate(shape) if a not in axes)

  def broadcast(self, value, feature_axes=None, ndim=None):
    """Reshapes a feature-shaped array so it broadcasts against the (split) input."""
    if value is None:
      return None
    feature_axes = self.feature_axes if feature_axes is None else feature_axes
    shape = [1] * (len(self.shape) if ndim is None else ndim)
    for axis, size in zip(feature_axes, value.shape, strict=True):
      shape[axis] = size
    return jnp.reshape(value, shape)


class _TrainingStep:
  """One training call: batch moments, normalization, then the statistic updates."""

  def __init__(self, config, layout, fused, axis_name, axis_index_groups):
    self.config = config
    self.layout = layout
    self.fused = fused
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups

  def normalize(self, x, mask, gamma, beta, stats, renorm_clipping, adjustment_key):
    """Returns ``(y, batch_mean, batch_variance)``; the last two in the feature shape."""
    config, layout = self.config, self.layout
    batch_size = x.shape[0]
    ghost = config.virtual_batch_size is not None
    syncing = self.axis_name is not None
    global_ghosts = ghost and syncing and config.ghost_batch_scope == "global"
    spans_devices = (
      ghost and syncing and not global_ghosts and batch_size < config.virtual_batch_size
    )
    split = ghost and not spans_devices
    feature_axes = layout.feature_axes
    if split:
      local_size = self._local_ghost_size(batch_size) if global_ghosts else None
      ghost_size = config.virtual_batch_size if local_size is None else local_size
      _validation.check_ghost_batch_size(config.virtual_batch_size, batch_size, local_size)
      _check_explicit_batch_sharding(x, ghost_size)
      x = math_ops.split_ghost_batches(x, ghost_size)
      feature_axes = tuple(a + 1 for a in feature_axes)
    ndim = x.ndim
    reduction_axes = tuple(
      a for a in range(ndim) if a not in feature_axes and not (split and a == 1)
    )
    scale = layout.broadcast(gamma, feature_axes, ndim)
    offset = layout.broadcast(beta, feature_axes, ndim)
    if config.adjustment is not None:
      adjust_scale, adjust_bias = _call_adjustment(config.adjustment, x.shape, adjustment_key)
      scale, offset = math_ops.compose_affine(adjust_scale, adjust_bias, scale, offset)

    # Ghost batches local to a device need no collective to normalize; global ones (and plain
    # synchronized batches) are reduced across devices.
    kernel_axis_name = self.axis_name if syncing and (not split or global_ghosts) else None
    mean, variance, batch_mean, batch_variance = self._batch_moments(
      x, mask, reduction_axes, split=split, spans_devices=spans_devices, axis=kernel_axis_name
    )
    batch_mean = batch_mean.reshape(layout.feature_shape)
    batch_variance = batch_variance.reshape(layout.feature_shape)
    if config.renorm:
      r, d = self._renorm_correction(batch_mean, batch_variance, stats, renorm_clipping)
      scale, offset = math_ops.compose_affine(
        layout.broadcast(r, feature_axes, ndim),
        layout.broadcast(d, feature_axes, ndim),
        scale,
        offset,
      )
    subtract_mean_first = self.fused or config.semantics == "torch"
    fast = (
      mask is None
      and not spans_devices
      and _fast_train.is_per_channel(scale, reduction_axes, ndim)
      and _fast_train.is_per_channel(offset, reduction_axes, ndim)
    )
    if fast:  # closed-form derivatives; r, d and the adjustment are folded into scale/offset
      groups = self.axis_index_groups if kernel_axis_name is not None else None
      y = _fast_train.normalize_batch(
        x,
        mean,
        variance,
        scale,
        offset,
        reduction_axes=reduction_axes,
        epsilon=config.epsilon,
        subtract_mean_first=subtract_mean_first,
        axis_name=kernel_axis_name,
        axis_index_groups=groups,
      )
    else:
      y = math_ops.normalize(
        x,
        mean,
        variance,
        scale=scale,
        offset=offset,
        epsilon=config.epsilon,
        subtract_mean_first=subtract_mean_first,
      )
    y = math_ops.merge_ghost_batches(y) if split else y
    return y, batch_mean, batch_variance

  def _batch_moments(self, x, mask, reduction_axes, *, split, spans_devices, axis):
    """Returns the moments that normalize ``x`` and the ones the moving averages move toward.

    They differ with ghost batches: each ghost batch is normalized by its own moments, and the
    moving statistics move toward their mean over every ghost batch (of every device).
    """
    if spans_devices:
      return math_ops.device_group_moments(
        x,
        reduction_axes,
        axis_name=self.axis_name,
        group_size=self._ghost_group_size(x.shape[0]),
      )
    groups = self.axis_index_groups if axis is not None else None
    if split:
      mean, variance = _fast_train.batch_moments(x, reduction_axes, axis_name=axis)
      batch_mean = jnp.mean(mean, axis=1, keepdims=True)
      batch_variance = jnp.mean(variance, axis=1, keepdims=True)
      if self.axis_name is not None and axis is None:
        # Ghost batches per device: one collective for the moving-average target only.
        batch_mean, batch_variance = jax.lax.pmean(
          jnp.stack([batch_mean, batch_variance]), self.axis_name
        )
      return mean, variance, batch_mean, batch_variance
    if mask is None:
      mean, variance = _fast_train.batch_moments(
        x, reduction_axes, axis_name=axis, axis_index_groups=groups
      )
    else:
      mean, variance = math_ops.moments(
        x, reduction_axes, mask=mask, axis_name=axis, axis_index_groups=groups, keepdims=True
      )
    return mean, variance, mean, variance

  def _local_ghost_size(self, batch_size: int) -> int:
    """Per-device rows of the global strided layout (``ghost_batch_scope="global"``)."""
    vbs = self.config.virtual_batch_size
    devices = jax.lax.axis_size(self.axis_name)
    if vbs % devices:
      raise ValueError(
        f"`ghost_batch_scope`='global' lays out the whole global batch as one device would, "
        f"which needs `virtual_batch_size`={vbs} to be a multiple of the {devices} devices of "
        f"`axis_name`={self.axis_name!r}. Choose a multiple of {devices}, or "
        "ghost_batch_scope='device' (each device splits its own batch)."
      )
    return vbs // devices

  def _ghost_group_size(self, batch_size: int) -> int:
    """Devices per virtual batch when the per-device batch is smaller than the ghost batch."""
    vbs = self.config.virtual_batch_size
    devices = jax.lax.axis_size(self.axis_name)
    group_size = vbs // batch_size if batch_size else 0
    if batch_size == 0 or vbs % batch_size or devices % group_size:
      raise ValueError(
        f"`virtual_batch_size`={vbs} spans several devices because the per-device batch is "
        f"{batch_size}: the per-device batch must divide it and the number of devices "
        f"per virtual batch ({vbs}/{batch_size}) must divide the {devices} devices of "
        f"`axis_name`={self.axis_name!r}. Choose a per-device batch that divides {vbs}."
      )
    return group_size

  def _renorm_correction(self, batch_mean, batch_variance, stats, renorm_clipping):
    """``(r, d)`` from the pre-update renorm statistics (Ioffe, 2017)."""
    clipping = dict(self.config.renorm_clipping or {})
    if renorm_clipping is not None:
      _validation.check_renorm_clipping_keys(renorm_clipping)
      clipping.update(renorm_clipping)
    return math_ops.renorm_correction(
      batch_mean,
      batch_variance,
      stats["renorm_mean"],
      stats["renorm_stddev"],
      epsilon=self.config.epsilon,
      rmin=clipping.get("rmin"),
      rmax=clipping.get("rmax"),
      dmax=clipping.get("dmax"),
    )

  def updated_statistics(self, stats, batch_mean, batch_variance) -> dict[str, jax.Array]:
    """Keras's updates: mean first, then (renorm's stddev and) variance; renorm's own last."""
    config = self.config
    batch_mean = jax.lax.stop_gradient(batch_mean)
    batch_variance = jax.lax.stop_gradient(batch_variance)
    new = {}
    update = _updater(config.semantics)
    momentum = config.momentum
    if config.semantics == "torch":
      new["num_batches_tracked"] = stats["num_batches_tracked"] + 1
      # PyTorch's factor is the weight of the new value; None is the cumulative average.
      if momentum is None:
        momentum = 1 / new["num_batches_tracked"].astype(batch_mean.dtype)
      else:
        momentum = 1.0 - momentum
    new["moving_mean"] = update(stats["moving_mean"], batch_mean, momentum)
    eps = jnp.asarray(config.epsilon, batch_variance.dtype)
    if config.renorm:
      # Keras averages the stddev and overwrites the variance from it (spec section 3.6).
      stddev = jnp.sqrt(batch_variance + eps)
      new["moving_stddev"] = update(stats["moving_stddev"], stddev, momentum)
      new["moving_variance"] = jax.nn.relu(jnp.square(new["moving_stddev"]) - eps)
      new["renorm_mean"] = update(stats["renorm_mean"], batch_mean, config.renorm_momentum)
      new["renorm_stddev"] = update(stats["renorm_stddev"], stddev, config.renorm_momentum)
      return new
    if self._bessel_corrected():
      count = self.layout.count * self._device_count()
      batch_variance = math_ops.bessel_correction(batch_variance, count)
    new["moving_variance"] = update(stats["moving_variance"], batch_variance, momentum)
    return new

  def _bessel_corrected(self) -> bool:
    """Keras 2 (V1, V2) corrects on the fused path, PyTorch always, Keras 3 never."""
    if self.config.semantics == "torch":
      return True
    return self.fused and self.config.semantics != "keras3"

  def _device_count(self) -> int:
    """How many devices' batches the synchronized statistics cover (1 without `axis_name`)."""
    if self.axis_name is None:
      return 1
    if self.axis_index_groups is not None:
      return len(self.axis_index_groups[0])
    return jax.lax.axis_size(self.axis_name)


def _updater(semantics: str):
  """The moving-average arithmetic of each library (they round differently)."""
  if semantics == "keras3":
    return math_ops.update_moving_average_keras3
  if semantics == "torch":
    return math_ops.update_moving_average_torch
  return math_ops.update_moving_average


def resolve_fused(
  config: BatchNormConfig, axes: tuple[int, ...], ndim: int, compute_dtype: Any
) -> bool:
  """Keras 2's fused resolution (spec section 2, step 3) for this input.

  V1 falls back silently wherever it cannot fuse. V2 raises for an explicit ``fused=True`` that
  cannot fuse (the input-independent cases already at construction, see `BatchNormConfig`), and
  for rank 4 with an axis other than 1 or 3 even with ``fused=None``; it falls back silently on
  rank 5 with an axis other than 1 or 4. Keras 3 and PyTorch have no fused kernel (False).

  Args:
    config: the layer.
    axes: the normalized feature axes.
    ndim: the input rank.
    compute_dtype: the dtype the layer computes in.
  """
  if config.semantics in ("keras3", "torch") or config.fused is False:
    return False
  fusable_axes = {4: (1, 3), 5: (1, 4)}.get(ndim, ())
  one_fusable_axis = len(axes) == 1 and axes[0] in fusable_axes
  if config.semantics == "keras_v2" and _validation.v2_fused_allowed(config):
    if config.fused is True and ndim not in (4, 5):
      _validation.raise_v2_fused_rank_error(ndim)
    if ndim == 4 and not one_fusable_axis:
      _validation.raise_v2_fused_axis_error(axes)
    return one_fusable_axis and jnp.dtype(compute_dtype) in _FUSED_DTYPES
  return (
    one_fusable_axis
    and not config.renorm
    and config.virtual_batch_size is None
    and config.adjustment is None
    and jnp.dtype(compute_dtype) in _FUSED_DTYPES
  )


def _user_stacklevel() -> int:
  """The `warnings.warn` stacklevel of the first caller outside kbn_jax, Flax and JAX."""
  level, frame = 2, sys._getframe(2)
  while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _INTERNAL:
    frame, level = frame.f_back, level + 1
  return level


_INTERNAL = ("kbn_jax", "flax", "jax")


def _checked_mask(config, mask, x, fused):
  if mask is None:
    return None
  if fused:
    warnings.warn(
      "Masking is not supported with `fused=True`; the mask is ignored (as in Keras). "
      "Pass fused=False to use padding-aware moments.",
      stacklevel=_user_stacklevel(),
    )
    return None
  if config.virtual_batch_size is not None:
    raise ValueError("`mask` cannot be combined with `virtual_batch_size`; drop one of them.")
  mask = jnp.asarray(mask)
  _validation.check_mask_shape(mask.shape, x.shape)
  return mask


def _checked(values, names, feature_shape, collection, api):
  """Checks that every variable of `names` is present with the feature shape."""
  missing = [name for name in names if name not in values]
  if missing:
    raise ValueError(api.missing_variable(collection, missing))
  for name in names:
    expected = () if name == "num_batches_tracked" else feature_shape
    _validation.check_feature_shape(name, jnp.shape(values[name]), expected, api.feature_hint)
  return {name: jnp.asarray(values[name]) for name in names}


def _call_adjustment(adjustment, shape, key):
  """Calls the user's adjustment with the shape (and a key if it asks for one)."""
  kwargs = {}
  if "key" in inspect.signature(adjustment).parameters:
    if key is None:
      raise ValueError(
        "`adjustment` takes a `key` but none was given: pass `adjustment_key=` to "
        "kbn_jax.functional.batch_normalization (or rngs={'adjustment': key} to a Flax module)."
      )
    kwargs["key"] = key
  adjust_scale, adjust_bias = adjustment(tuple(shape), **kwargs)
  # NumPy broadcasting, made explicit so that strict rank promotion accepts a ``(C,)`` result.
  results = []
  for part, value in (("scale", adjust_scale), ("bias", adjust_bias)):
    value = jnp.asarray(value)
    _validation.check_adjustment_shape(part, value.shape, tuple(shape))
    value = value.astype(math_ops.reduction_dtype(value.dtype))
    results.append(value.reshape((1,) * (len(shape) - value.ndim) + value.shape))
  return tuple(results)


def _check_explicit_batch_sharding(x: jax.Array, ghost_size: int) -> None:
  """Raises where sharded `jit` on an Explicit mesh cannot lay out Keras's ghost batches.

  Keras's ghost batch ``j`` takes every ``B / vbs``-th sample; that reshape keeps a batch split
  into ``n`` contiguous shards only when ``n`` divides `ghost_size`. JAX then refuses it on a mesh
  with Explicit axes (an Auto mesh gathers the activations instead).
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if not spec or spec[0] is None:
    return
  names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  shards = math.prod(sharding.mesh.shape[name] for name in names)
  if shards > 1 and ghost_size % shards:
    raise ValueError(
      f"`virtual_batch_size`={ghost_size} is not a multiple of the {shards} shards of the batch "
      f"(axis 0 is sharded over {names} of an Explicit mesh), so Keras's strided ghost batches "
      f"would mix shards and JAX cannot lay them out. Use a `virtual_batch_size` that is a "
      f"multiple of {shards} (then `jax.shard_map` with `axis_name` and "
      "`ghost_batch_scope='global'` gives the same numbers too); or a mesh with `AxisType.Auto` "
      "axes, which gathers the activations to lay them out; or `jax.shard_map` with the default "
      "`ghost_batch_scope='device'`, which splits each device's batch instead."
    )


def _check_axis_name_bound(axis_name, api) -> None:
  """Raises a clear error when no enclosing `shard_map`/`pmap`/`vmap` binds `axis_name`."""
  try:
    jax.lax.axis_size(axis_name)
  except NameError as error:
    raise ValueError(
      f"`axis_name`={axis_name!r} is not bound: cross-device statistics need the training call "
      f"to run inside {api.mapping_hint} over an axis named {axis_name!r}. Call the step under "
      "that transformation, "
      "or construct the layer with `axis_name=None` for single-device statistics."
    ) from error
