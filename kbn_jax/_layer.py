"""The batch-normalization layer as one pure function: decide the regime once, then compute it.

`batch_normalization` reads top-down:

1. the call's checks (mode, variables, mask) and Keras's fused resolution (`resolve_fused`);
2. inference (`_infer`): normalize with the moving statistics; or
3. training: `_plan` decides, from shapes and device counts alone, how the batch moments are
   taken (the regime, see `Plan`); `_train` then computes straight-line: batch moments
   (`kbn_jax._moments`), normalization (`kbn_jax._normalize`), and the statistic updates of
   Keras V1, V2, Keras 3 or PyTorch (`kbn_jax._moving_averages`).

Front-ends (linen, NNX, Equinox, Haiku) call `run` with `Hints` that word errors in their
API's terms; raw JAX calls `batch_normalization`. Nothing here imports Flax or optax.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kbn_jax import _moments, _moving_averages, _normalize, _variables
from kbn_jax._config import (
  BatchNormConfig,
  check_axis_index_groups,
  check_renorm_clipping_keys,
  v2_fused_allowed,
)

_FUSED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
_FROM_CONFIG: Any = object()  # "use the config's value" for per-call axis_name / groups


@dataclasses.dataclass(frozen=True)
class Hints:
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


FUNCTIONAL = Hints(
  training_hint=(
    "under `jax.jit`, mark the argument that carries it static (`static_argnames` or "
    "`static_argnums`), or write one step function for training and one for inference"
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
  per_example: bool = False,
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
    per_example: `x` is one example of a batch mapped by ``jax.vmap(..., axis_name=...)``
      (Equinox's convention): ``config.axis`` refers to `x` as given, the statistics are
      reduced over the mapped axis through `axis_name`, and Keras's rank-dependent rules (the
      fused path, its Bessel correction) see the batched rank ``x.ndim + 1``, so a per-example
      call gives the batched call's outputs, gradients and statistics.

  Returns:
    ``(y, new_stats)``: the output in ``config.dtype`` (or the promotion of input and
    parameter dtypes) and the statistics after the call (the same arrays in inference, for a
    frozen layer, or for an empty batch).
  """
  return run(
    x,
    params,
    stats,
    config,
    training=training,
    mask=mask,
    renorm_clipping=renorm_clipping,
    adjustment_key=adjustment_key,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    per_example=per_example,
    hints=FUNCTIONAL,
  )


def run(
  x: jax.typing.ArrayLike,
  params: Mapping[str, jax.typing.ArrayLike] | None,
  stats: Mapping[str, jax.typing.ArrayLike],
  config: BatchNormConfig,
  *,
  training: Any,
  mask: jax.typing.ArrayLike | None = None,
  renorm_clipping: Mapping[str, jax.typing.ArrayLike] | None = None,
  adjustment_key: jax.Array | None = None,
  axis_name: Any = _FROM_CONFIG,
  axis_index_groups: Any = _FROM_CONFIG,
  per_example: bool = False,
  hints: Hints,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`batch_normalization` for a front-end, whose `hints` word the errors (same arguments)."""
  training = check_training(training, hints)
  if axis_name is _FROM_CONFIG:
    axis_name = config.axis_name
  if axis_index_groups is _FROM_CONFIG:
    axis_index_groups = config.axis_index_groups if axis_name is not None else None
  else:  # per-call groups get the config's checks
    check_axis_index_groups(axis_index_groups, config.virtual_batch_size)
  if per_example and axis_name is None:
    raise ValueError(_PER_EXAMPLE_NEEDS_AXIS_NAME)
  x = jnp.asarray(x)
  if config.dtype is not None or not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(config.dtype or config.param_dtype)
  axes, param_names, stat_names = _variables.layout(config, x.ndim)
  feature_shape = tuple(x.shape[a] for a in axes)
  compute_dtype, out_dtype = _moments.layer_dtypes(x.dtype, config.param_dtype, config.dtype)
  fused = resolve_fused(config, axes, x.ndim, out_dtype, per_example=per_example)
  mask = _checked_mask(config, mask, x, fused)
  params = _checked(params or {}, param_names, feature_shape, "params", hints)
  stats = _checked(stats, stat_names, feature_shape, "batch_stats", hints)
  x = x.astype(compute_dtype)
  gamma, beta = params.get("gamma"), params.get("beta")
  if not uses_batch_statistics(config, training):
    return _infer(x, gamma, beta, stats, config, axes, fused).astype(out_dtype), dict(stats)
  if math.prod(size for a, size in enumerate(x.shape) if a not in axes) == 0:
    # Keras turns the statistics into NaN here (tf.nn.moments of nothing); the step is skipped
    # instead, and the empty output depends on no parameter, so its gradients are 0, not NaN.
    return jnp.zeros(x.shape, out_dtype), dict(stats)
  devices = 1
  if axis_name is not None:
    _check_axis_name_bound(axis_name, hints)
    devices = jax.lax.axis_size(axis_name)
  plan = _plan(config, x.shape, axes, fused, axis_name, axis_index_groups, devices, per_example)
  y, batch_mean, batch_variance = _train(
    x, gamma, beta, stats, config, plan, mask, renorm_clipping, adjustment_key
  )
  new_stats = dict(stats)
  if updates_statistics(config, training):
    new_stats.update(
      _moving_averages.update_statistics(
        stats,
        batch_mean,
        batch_variance,
        semantics=config.semantics,
        momentum=config.momentum,
        epsilon=config.epsilon,
        renorm=config.renorm,
        renorm_momentum=config.renorm_momentum,
        bessel_count=plan.bessel_count,
      )
    )
  return y.astype(out_dtype), new_stats


def uses_batch_statistics(config: BatchNormConfig, training: bool) -> bool:
  """Whether a call normalizes with batch statistics (V2 and Keras 3 freeze to inference)."""
  return training and not config.frozen_layer_is_inference


def updates_statistics(config: BatchNormConfig, training: bool) -> bool:
  """Whether a call moves the statistics (a training call of a trainable layer)."""
  return training and config.trainable


def _infer(x, gamma, beta, stats, config, axes, fused):
  """Normalizes with the moving statistics, in Keras's arithmetic form of the layer."""
  return _normalize.normalize(
    x,
    _broadcast(stats["moving_mean"], axes, x.ndim),
    _broadcast(stats["moving_variance"], axes, x.ndim),
    scale=_broadcast(gamma, axes, x.ndim),
    offset=_broadcast(beta, axes, x.ndim),
    epsilon=config.epsilon,
    subtract_mean_first=fused or config.semantics == "torch",
  )


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one training call takes its batch moments, decided from shapes and device counts.

  ==========================  =============================================================
  ``regime``                  moments
  ==========================  =============================================================
  ``"local"``                 over every non-feature axis of this device's batch
  ``"synced"``                of the global batch over `axis_name` (per group with
                              `axis_index_groups`), one ``all_gather``
  ``"ghost"``                 per ghost batch (Keras's strided split), one device
  ``"ghost_per_device"``      per ghost batch of each device's own batch; the moving-average
                              target is averaged over devices (one ``pmean``)
  ``"ghost_spanning_devices"``  per group of consecutive devices that together hold one ghost
                              batch (the per-device batch is smaller than the ghost batch)
  ``"ghost_global"``          per ghost batch of the one-device strided layout of the global
                              batch; each device holds `ghost_size` rows of each
  ==========================  =============================================================

  A mask (local or synced regimes only) makes the moments weighted.

  Attributes:
    regime: one of the names above.
    feature_shape: the input's sizes on the feature axes (the variables' shape).
    ghost_size: rows per ghost batch on this device when the input is split, else None.
    feature_axes: the feature axes of the (split) input.
    reduction_axes: the axes the moments reduce over, in the (split) input.
    axis_name: the call's mapped axis name(s), or None.
    moments_axis_name, moments_groups: the collective of the moments, if any.
    target_pmean: whether the moving-average target is averaged over `axis_name`.
    group_size: devices per ghost batch that spans devices, else None.
    subtract_mean_first: Keras's fused arithmetic form (also PyTorch's).
    bessel_count: elements per channel when the moving variance is Bessel-corrected, else None.
    one_pass: unweighted moments may take one pass (see `kbn_jax._moments.batch_moments`); not
      per example, where `jax.vmap` would run both of its branches for every example.
  """

  regime: str
  feature_shape: tuple[int, ...]
  ghost_size: int | None
  feature_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  axis_name: Any
  moments_axis_name: Any
  moments_groups: Any
  target_pmean: bool
  group_size: int | None
  subtract_mean_first: bool
  bessel_count: int | None
  one_pass: bool


def _plan(
  config: BatchNormConfig,
  shape: tuple[int, ...],
  axes: tuple[int, ...],
  fused: bool,
  axis_name: Any,
  axis_index_groups: Any,
  devices: int,
  per_example: bool = False,
) -> Plan:
  """Decides the regime of a training call (see `Plan`); raises the shape and device errors.

  Args:
    config: the layer.
    shape: the input's shape (per example with `per_example`).
    axes: its feature axes.
    fused: Keras's fused resolution for this input.
    axis_name, axis_index_groups: the call's collectives (None on one device).
    devices: the size of `axis_name` (1 without it).
    per_example: the input is one example of a batch mapped over `axis_name`.
  """
  ndim = len(shape)
  feature_shape = tuple(shape[a] for a in axes)
  synced = 1 if axis_name is None else (len(axis_index_groups[0]) if axis_index_groups else devices)
  count = math.prod(size for a, size in enumerate(shape) if a not in axes) * synced
  corrected = config.semantics == "torch" or (fused and config.semantics != "keras3")
  common = dict(
    feature_shape=feature_shape,
    axis_name=axis_name,
    subtract_mean_first=fused or config.semantics == "torch",
    bessel_count=count if corrected else None,
    one_pass=not per_example,
  )
  not_feature = tuple(a for a in range(ndim) if a not in axes)
  vbs = config.virtual_batch_size
  if vbs is None:
    return Plan(
      regime="local" if axis_name is None else "synced",
      ghost_size=None,
      feature_axes=axes,
      reduction_axes=not_feature,
      moments_axis_name=axis_name,
      moments_groups=axis_index_groups if axis_name is not None else None,
      target_pmean=False,
      group_size=None,
      **common,
    )
  if per_example:
    raise ValueError(_PER_EXAMPLE_GHOSTS.format(vbs=vbs))
  batch_size = shape[0]
  if axis_name is not None and config.ghost_batch_scope == "global":
    regime, ghost_size = "ghost_global", _local_ghost_size(vbs, devices, axis_name)
  elif axis_name is not None and batch_size < vbs:
    return Plan(
      regime="ghost_spanning_devices",
      ghost_size=None,
      feature_axes=axes,
      reduction_axes=not_feature,
      moments_axis_name=None,
      moments_groups=None,
      target_pmean=False,
      group_size=_ghost_group_size(vbs, batch_size, devices, axis_name),
      **common,
    )
  else:
    regime = "ghost" if axis_name is None else "ghost_per_device"
    ghost_size = vbs
  check_ghost_batch_size(vbs, batch_size, ghost_size if regime == "ghost_global" else None)
  split_axes = tuple(a + 1 for a in axes)
  return Plan(
    regime=regime,
    ghost_size=ghost_size,
    feature_axes=split_axes,
    reduction_axes=tuple(a for a in range(ndim + 1) if a not in split_axes and a != 1),
    moments_axis_name=axis_name if regime == "ghost_global" else None,
    moments_groups=None,
    target_pmean=regime == "ghost_per_device",
    group_size=None,
    **common,
  )


def _train(x, gamma, beta, stats, config, plan, mask, renorm_clipping, adjustment_key):
  """One training call: ``(y, batch_mean, batch_variance)``, the last two in the feature shape.

  The moments that normalize and the ones the moving averages move toward differ with ghost
  batches: each ghost batch is normalized by its own moments, and the statistics move toward
  their mean over every ghost batch (of every device).
  """
  if plan.ghost_size is not None:
    _check_explicit_batch_sharding(x, plan.ghost_size)
    x = split_ghost_batches(x, plan.ghost_size)
  scale = _broadcast(gamma, plan.feature_axes, x.ndim)
  offset = _broadcast(beta, plan.feature_axes, x.ndim)
  if config.adjustment is not None:
    adjust_scale, adjust_bias = _call_adjustment(config.adjustment, x.shape, adjustment_key)
    scale, offset = _normalize.compose_affine(adjust_scale, adjust_bias, scale, offset)
  if plan.regime == "ghost_spanning_devices":
    mean, variance, target_mean, target_variance = _moments.device_group_moments(
      x, plan.reduction_axes, axis_name=plan.axis_name, group_size=plan.group_size
    )
    moments = _moments.Moments(mean, variance, None)
  else:
    moments = _moments.batch_moments(
      x,
      plan.reduction_axes,
      mask=mask,
      axis_name=plan.moments_axis_name,
      axis_index_groups=plan.moments_groups,
      one_pass=plan.one_pass,
    )
    target_mean, target_variance = moments.mean, moments.variance
  if plan.ghost_size is not None:
    target_mean = jnp.mean(moments.mean, axis=1, keepdims=True)
    target_variance = jnp.mean(moments.variance, axis=1, keepdims=True)
  if plan.target_pmean:  # ghost batches per device: one collective, for the target only
    target_mean, target_variance = jax.lax.pmean(
      jnp.stack([target_mean, target_variance]), plan.axis_name
    )
  target_mean = target_mean.reshape(plan.feature_shape)
  target_variance = target_variance.reshape(plan.feature_shape)
  if config.renorm:
    r, d = _renorm_correction(config, target_mean, target_variance, stats, renorm_clipping)
    scale, offset = _normalize.compose_affine(
      _broadcast(r, plan.feature_axes, x.ndim),
      _broadcast(d, plan.feature_axes, x.ndim),
      scale,
      offset,
    )
  y = _normalize.normalize_batch(
    x,
    moments,
    scale,
    offset,
    epsilon=config.epsilon,
    subtract_mean_first=plan.subtract_mean_first,
  )
  y = merge_ghost_batches(y) if plan.ghost_size is not None else y
  return y, target_mean, target_variance


def _renorm_correction(config, batch_mean, batch_variance, stats, renorm_clipping):
  """``(r, d)`` from the pre-update renorm statistics (Ioffe, 2017)."""
  clipping = dict(config.renorm_clipping or {})
  if renorm_clipping is not None:
    check_renorm_clipping_keys(renorm_clipping)
    clipping.update(renorm_clipping)
  return _normalize.renorm_correction(
    batch_mean,
    batch_variance,
    stats["renorm_mean"],
    stats["renorm_stddev"],
    epsilon=config.epsilon,
    rmin=clipping.get("rmin"),
    rmax=clipping.get("rmax"),
    dmax=clipping.get("dmax"),
  )


def _broadcast(value, feature_axes, ndim):
  """Reshapes a feature-shaped array so it broadcasts against a rank-`ndim` input."""
  if value is None:
    return None
  shape = [1] * ndim
  for axis, size in zip(feature_axes, value.shape, strict=True):
    shape[axis] = size
  return jnp.reshape(value, shape)


def split_ghost_batches(x: jax.typing.ArrayLike, virtual_batch_size: int) -> jax.Array:
  """Reshapes ``(B, ...)`` to ``(virtual_batch_size, B // virtual_batch_size, ...)``.

  This is Keras's row-major reshape, so ghost batch ``j`` holds the *strided* samples
  ``{j, j + B/vbs, j + 2 B/vbs, ...}`` (Hoffer et al., 2017, with Keras's layout). Statistics
  are then reduced over axis 0 and kept per index of axis 1.

  Args:
    x: input with the batch on axis 0; ``virtual_batch_size`` must divide the batch size.
    virtual_batch_size: the number of samples per ghost batch.

  Returns:
    The reshaped array.
  """
  x = jnp.asarray(x)
  return x.reshape((virtual_batch_size, x.shape[0] // virtual_batch_size) + x.shape[1:])


def merge_ghost_batches(x: jax.typing.ArrayLike) -> jax.Array:
  """Inverse of `split_ghost_batches`: ``(vbs, B // vbs, ...)`` back to ``(B, ...)``."""
  x = jnp.asarray(x)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


_GLOBAL_GHOSTS_NEED_MULTIPLE = (
  "`ghost_batch_scope`='global' lays out the whole global batch as one device would, which "
  "needs `virtual_batch_size`={vbs} to be a multiple of the {devices} devices of "
  "`axis_name`={axis_name!r}. Choose a multiple of {devices}, or ghost_batch_scope='device'."
)
_SPANNING_GHOSTS_MUST_DIVIDE = (
  "`virtual_batch_size`={vbs} spans several devices because the per-device batch is {batch}: "
  "the per-device batch must divide it, and the devices per virtual batch ({vbs}/{batch}) must "
  "divide the {devices} devices of `axis_name`={axis_name!r}. Use a batch that divides {vbs}."
)
_PER_EXAMPLE_NEEDS_AXIS_NAME = (
  "`per_example=True` computes batch statistics over the examples that `jax.vmap` maps: pass "
  "the vmap's `axis_name` (e.g. jax.vmap(f, axis_name='batch') and axis_name='batch')."
)
_PER_EXAMPLE_GHOSTS = (
  "`virtual_batch_size`={vbs} splits the batch into Keras's strided ghost batches, which a "
  "per-example call under `jax.vmap` cannot see; call the layer on the whole batch instead."
)


def _local_ghost_size(vbs: int, devices: int, axis_name: Any) -> int:
  """Per-device rows of the global strided layout (``ghost_batch_scope="global"``)."""
  if vbs % devices:
    raise ValueError(
      _GLOBAL_GHOSTS_NEED_MULTIPLE.format(vbs=vbs, devices=devices, axis_name=axis_name)
    )
  return vbs // devices


def _ghost_group_size(vbs: int, batch_size: int, devices: int, axis_name: Any) -> int:
  """Devices per virtual batch when the per-device batch is smaller than the ghost batch."""
  group_size = vbs // batch_size if batch_size else 0
  if batch_size == 0 or vbs % batch_size or devices % group_size:
    message = _SPANNING_GHOSTS_MUST_DIVIDE
    raise ValueError(
      message.format(vbs=vbs, batch=batch_size, devices=devices, axis_name=axis_name)
    )
  return group_size


def resolve_fused(
  config: BatchNormConfig,
  axes: tuple[int, ...],
  ndim: int,
  compute_dtype: Any,
  *,
  per_example: bool = False,
) -> bool:
  """Keras 2's fused resolution for this input (tf_keras ``BatchNormalizationBase``:
  ``_fused_can_be_used`` at construction, ``build`` for the input's rank and axis).

  V1 falls back silently wherever it cannot fuse. V2 raises for an explicit ``fused=True`` that
  cannot fuse (the input-independent cases already at construction, see `BatchNormConfig`), and
  for rank 4 with an axis other than 1 or 3 even with ``fused=None``; it falls back silently on
  rank 5 with an axis other than 1 or 4. Keras 3 and PyTorch have no fused kernel (False).

  Args:
    config: the layer.
    axes: the normalized feature axes.
    ndim: the input rank.
    compute_dtype: the dtype the layer computes in.
    per_example: `axes` and `ndim` describe one example of a vmapped batch; the rules see the
      batched input (one more leading axis).
  """
  if per_example:
    axes, ndim = tuple(a + 1 for a in axes), ndim + 1
  if config.semantics in ("keras3", "torch") or config.fused is False:
    return False
  fusable_axes = {4: (1, 3), 5: (1, 4)}.get(ndim, ())
  one_fusable_axis = len(axes) == 1 and axes[0] in fusable_axes
  if config.semantics == "keras_v2" and v2_fused_allowed(config):
    if config.fused is True and ndim not in (4, 5):
      raise_v2_fused_rank_error(ndim)
    if ndim == 4 and not one_fusable_axis:
      raise_v2_fused_axis_error(axes)
    return one_fusable_axis and jnp.dtype(compute_dtype) in _FUSED_DTYPES
  return (
    one_fusable_axis
    and not config.renorm
    and config.virtual_batch_size is None
    and config.adjustment is None
    and jnp.dtype(compute_dtype) in _FUSED_DTYPES
  )


_V2_FIX = " Pass fused=None (or False) to let the layer choose, as Keras V1 does silently."


def raise_v2_fused_rank_error(rank: int) -> None:
  """Keras V2's build-time error for an explicit ``fused=True`` on a rank other than 4 or 5."""
  raise ValueError(
    "Batch normalization layers with `fused=True` only support 4D or 5D input tensors. "
    f"Received tensor with rank {rank}." + _V2_FIX
  )


def raise_v2_fused_axis_error(axes: Sequence[int]) -> None:
  """Keras V2's build-time error for a rank-4 fused layer whose axis is not 1 or 3."""
  raise ValueError(
    "Unsupported axis. The use of `fused=True` is only possible with `axis=1` or `axis=3` for "
    f"4D input tensors. Received: axis={tuple(axes)}. Keras V2 raises this even for fused=None "
    "(a negative axis such as -4 that resolves to 0); pass fused=False, or an axis of 1 or 3."
  )


def check_ghost_batch_size(
  virtual_batch_size: int, batch_size: Any, local_ghost_size: int | None = None
) -> None:
  """Raises if `virtual_batch_size` does not divide the batch size (a training-time check).

  Args:
    virtual_batch_size: the ghost batch size.
    batch_size: this call's (per-device) batch size; symbolic under a shape-polymorphic export.
    local_ghost_size: with ``ghost_batch_scope="global"``, the rows of the global layout that
      each device holds (``virtual_batch_size`` divided by the device count).
  """
  divisor = virtual_batch_size if local_ghost_size is None else local_ghost_size
  if batch_size % divisor == 0:  # also true of a symbolic batch declared as a multiple
    return
  if not isinstance(batch_size, int):
    raise ValueError(
      f"`virtual_batch_size`={virtual_batch_size} must divide the batch size, but the batch "
      f"size is symbolic ({batch_size}), as in a shape-polymorphic `jax.export`. Export with "
      f"a concrete batch size, or declare the batch a multiple of {divisor}, e.g. "
      f'`jax.export.symbolic_shape("{divisor}*k, ...")`.'
    )
  if local_ghost_size is None:
    raise ValueError(
      f"`virtual_batch_size`={virtual_batch_size} must divide the batch size {batch_size}; "
      f"choose a batch size that is a multiple of {virtual_batch_size}."
    )
  devices = virtual_batch_size // local_ghost_size
  raise ValueError(
    f"`virtual_batch_size`={virtual_batch_size} must divide the global batch size "
    f"{batch_size * devices} ({devices} devices x {batch_size}); with "
    f"`ghost_batch_scope`='global' each device's batch must be a multiple of {divisor}."
  )


def check_training(training: Any, hints: Hints) -> bool:
  """Returns `training` as a Python bool; traced values and strings are rejected.

  Keras's other spellings are accepted: 0/1, NumPy bools, and ``None``, which Keras resolves to
  the learning phase, 0 (inference) in TF2.

  Args:
    training: the value given.
    hints: the caller's API, for the words of the messages.
  """
  if training is None:
    return False
  if isinstance(training, (bool, np.bool_)):
    return bool(training)
  if isinstance(training, numbers.Integral) and training in (0, 1):
    return bool(training)
  if isinstance(training, str):
    raise TypeError(
      f"`training`={training!r} must be a Python bool, not a string: pass True or False (a "
      "non-empty string such as 'False' would read as true)."
    )
  if isinstance(training, jax.core.Tracer):
    raise TypeError(
      f"`training`={training!r} is traced, but it must be a Python bool: it selects the "
      f"computation, so it is static: {hints.training_hint}."
    )
  raise TypeError(
    f"`training`={training!r} must be a Python bool (True or False), 0/1, or None (inference)."
  )


def check_mask_shape(mask_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> None:
  """Raises unless ``expand_dims(mask, -1)`` broadcasts to the input (Keras's rule)."""
  expanded = tuple(mask_shape) + (1,)
  compatible = len(expanded) == len(input_shape) and all(
    m in (1, i) for m, i in zip(expanded, input_shape, strict=True)
  )
  if not compatible:
    raise ValueError(
      f"`mask` of shape {tuple(mask_shape)} does not match inputs of shape "
      f"{tuple(input_shape)}: it must have shape inputs.shape[:-1] = "
      f"{tuple(input_shape[:-1])} (one weight per position, shared by the last axis)."
    )


def check_adjustment_shape(part: str, shape: tuple[int, ...], input_shape: tuple[int, ...]) -> None:
  """Raises unless the adjustment's `part` ("scale" or "bias") broadcasts to the input."""
  fits = len(shape) <= len(input_shape) and all(
    s in (1, i) for s, i in zip(reversed(shape), reversed(input_shape), strict=False)
  )
  if not fits:
    raise ValueError(
      f"`adjustment` returned a {part} of shape {tuple(shape)}, which does not broadcast to "
      f"the input shape {tuple(input_shape)}; return arrays that broadcast to it, e.g. with "
      "the input's sizes on the feature axes and 1 on every other axis."
    )


def check_feature_shape(
  name: str, actual: tuple[int, ...], expected: tuple[int, ...], hint: str
) -> None:
  """Raises if a stored variable was built for other feature sizes than this input has."""
  if tuple(actual) != tuple(expected):
    raise ValueError(
      f"`{name}` has shape {tuple(actual)} but this input's feature axes have size "
      f"{tuple(expected)}; the variables were built for another feature dimension. {hint}"
    )


def check_optional_bool(name: str, value: Any) -> None:
  """Raises unless `value` is None or a Python bool."""
  if value is not None and not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}`={value!r} must be None, True or False.")


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
  check_mask_shape(mask.shape, x.shape)
  return mask


def _checked(values, names, feature_shape, collection, hints):
  """Checks that every variable of `names` is present with the feature shape."""
  missing = [name for name in names if name not in values]
  if missing:
    raise ValueError(hints.missing_variable(collection, missing))
  for name in names:
    expected = () if name == "num_batches_tracked" else feature_shape
    check_feature_shape(name, jnp.shape(values[name]), expected, hints.feature_hint)
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
    check_adjustment_shape(part, value.shape, tuple(shape))
    value = value.astype(_moments.reduction_dtype(value.dtype))
    results.append(value.reshape((1,) * (len(shape) - value.ndim) + value.shape))
  return tuple(results)


_GHOSTS_MIX_SHARDS = (
  "`virtual_batch_size`={vbs} is not a multiple of the {shards} shards of the batch (axis 0 "
  "sharded over {names} of an Explicit mesh): Keras's strided ghost batches would mix shards. "
  "Use a multiple of {shards}, a mesh with `AxisType.Auto` axes, or `jax.shard_map`."
)


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
    raise ValueError(_GHOSTS_MIX_SHARDS.format(vbs=ghost_size, shards=shards, names=names))


_AXIS_NAME_NOT_BOUND = (
  "`axis_name`={axis_name!r} is not bound: cross-device statistics need the training call to "
  "run inside {mapping} over an axis named {axis_name!r}; or pass `axis_name=None`."
)


def _check_axis_name_bound(axis_name, hints) -> None:
  """Raises a clear error when no enclosing `shard_map`/`pmap`/`vmap` binds `axis_name`."""
  try:
    jax.lax.axis_size(axis_name)
  except NameError as error:
    message = _AXIS_NAME_NOT_BOUND.format(axis_name=axis_name, mapping=hints.mapping_hint)
    raise ValueError(message) from error
