"""Normalization arithmetic: Keras's two forms, and batch normalization's closed-form derivative.

`normalize` applies ``(x - mean) / sqrt(variance + epsilon) * scale + offset`` in the arithmetic
form Keras uses. `normalize_batch` normalizes with batch moments (from
`kbn_jax._moments.batch_moments`) and, when they are the plain moments of the input, is
differentiated in closed form: autodiff through two-pass moments and the affine map keeps
several activation-sized intermediates alive and streams them back, so a `jax.custom_jvp` with a
linear, closed-form tangent rule replaces it. Forward mode (``jax.jvp``, ``jax.jacfwd``,
``jax.linearize``) uses the rule directly; reverse mode transposes it. The rule's
activation-sized intermediates are rematerialized (``jax.checkpoint``), so the backward pass
needs only the input and per-channel vectors:

.. math::
  \\hat x = (x - \\mu) \\rho, \\quad \\rho = (\\sigma^2 + \\epsilon)^{-1/2}, \\quad
  \\frac{\\partial L}{\\partial x} = \\gamma \\rho \\Big(g - \\overline{g}
  - \\hat x \\, \\overline{g \\hat x}\\Big),

where ``g`` is the output cotangent and overlines are means over the reduced axes (over the
whole global batch with ``axis_name``). The backward reads the input and the cotangent twice
(two reductions, one elementwise pass) and writes the input cotangent once. Derivatives of any
order work, because the tangent rule is ordinary differentiable JAX code.

Corrections derived from the moments (renorm's ``r`` and ``d``, an adjustment) are folded into
one per-channel scale and offset (`compose_affine`) *before* the activations are touched.

References:
  Ioffe & Szegedy, 2015. Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift. https://arxiv.org/abs/1502.03167

  Ioffe, 2017. Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
  Models. https://arxiv.org/abs/1702.03275
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from kbn_jax import _moments
from kbn_jax._moments import AxisIndexGroups, AxisName, Moments


def normalize(
  x: jax.typing.ArrayLike,
  mean: jax.typing.ArrayLike,
  variance: jax.typing.ArrayLike,
  *,
  scale: jax.typing.ArrayLike | None = None,
  offset: jax.typing.ArrayLike | None = None,
  epsilon: float,
  subtract_mean_first: bool = False,
) -> jax.Array:
  """Applies ``(x - mean) / sqrt(variance + epsilon) * scale + offset`` (Ioffe & Szegedy, 2015).

  Keras evaluates it in one of two arithmetic forms, both reproduced here. With
  ``inv = rsqrt(variance + epsilon) * scale``:

  * non-fused layers (``tf.nn.batch_normalization``): ``x * inv + (offset - mean * inv)``;
  * fused layers (``FusedBatchNormV3``), ``subtract_mean_first=True``:
    ``(x - mean) * inv + offset``, which is also the more accurate form for large means.

  Args:
    x: input, already in the computation dtype.
    mean, variance: statistics broadcastable to ``x``.
    scale, offset: optional gamma and beta (already composed with renorm/adjustment).
    epsilon: added to the variance.
    subtract_mean_first: use the fused kernel's form.

  Returns:
    The normalized array, in ``x``'s dtype. On CPU the statistics-shaped factors are computed
    by their own small kernel first (`in_own_kernel`), so the pass over `x` is a bare
    multiply-add.
  """
  return _apply(
    x,
    mean,
    variance,
    scale=scale,
    offset=offset,
    epsilon=epsilon,
    subtract_mean_first=subtract_mean_first,
    own_kernel=True,
  )


def _apply(x, mean, variance, *, scale, offset, epsilon, subtract_mean_first, own_kernel):
  """`normalize`; without `own_kernel` XLA may fuse the factors into the pass over `x`.

  Training passes are dominated by their reductions, and a conditional there would add a
  compiled branch per layer; inference is the bare pass, so only `normalize` asks for it.
  """
  x = jnp.asarray(x)
  dtype = x.dtype
  per_channel = {
    "mean": jnp.asarray(mean).astype(dtype),
    "variance": jnp.asarray(variance).astype(dtype),
    "scale": None if scale is None else jnp.asarray(scale).astype(dtype),
    "offset": None if offset is None else jnp.asarray(offset).astype(dtype),
  }
  factors = functools.partial(
    _affine_factors, epsilon=epsilon, subtract_mean_first=subtract_mean_first
  )
  own_kernel = own_kernel and _moments.compiled_for_cpu(x)
  computed = in_own_kernel(factors, per_channel) if own_kernel else factors(per_channel)
  if subtract_mean_first:
    mean, inv, offset = computed
    y = (x - mean) * inv
    return y if offset is None else y + offset
  inv, shift = computed
  return x * inv + shift


def _affine_factors(per_channel, *, epsilon, subtract_mean_first):
  """The statistics-shaped factors of `normalize`'s two forms."""
  mean, variance = per_channel["mean"], per_channel["variance"]
  scale, offset = per_channel["scale"], per_channel["offset"]
  inv = jnp.reciprocal(jnp.sqrt(variance + jnp.asarray(epsilon, variance.dtype)))
  if scale is not None:
    inv = inv * scale
  if subtract_mean_first:
    return mean, inv, offset
  return inv, (-mean * inv if offset is None else offset - mean * inv)


def in_own_kernel(compute, operands):
  """``compute(operands)``, computed by its own small kernel before the pass that reads it.

  XLA:CPU fuses cheap per-channel arithmetic (``gamma * rsqrt(var + eps)``,
  ``beta - mean * a``) into the activation-sized pass that consumes it, once per element, so
  inference on a cache-resident activation ran at 1.16-1.33x of a bare ``x * a + b``; an
  optimization barrier does not stop that fusion. A conditional's results are materialized,
  so `compute` runs inside a `lax.cond` whose two branches are the same function (the
  predicate is irrelevant to the result). Only for code compiled for the CPU
  (`kbn_jax._moments.compiled_for_cpu`): other backends' passes are memory-bound, a
  conditional would wait for its predicate on the host, and eager calls fuse nothing.

  Args:
    compute: a function of `operands` returning statistics-shaped arrays.
    operands: a pytree of statistics-shaped arrays (None leaves allowed).

  Returns:
    ``compute(operands)``.
  """
  leaves = [leaf for leaf in jax.tree.leaves(operands) if jnp.size(leaf)]
  if not leaves:
    return compute(operands)
  any_value = jnp.ravel(leaves[0])[0]
  return lax.cond(any_value == any_value, compute, compute, operands)


def normalize_batch(
  x: jax.Array,
  moments: Moments,
  scale: jax.Array | None,
  offset: jax.Array | None,
  *,
  epsilon: float,
  subtract_mean_first: bool,
) -> jax.Array:
  """`normalize` with batch moments, differentiated as batch normalization.

  With the plain moments of `x` (``moments.reduction`` set) and per-channel `scale` and
  `offset`, the closed-form kernel (`closed_form_normalize`) computes it; otherwise (weighted or
  device-group moments, a per-element adjustment) autodiff differentiates `normalize`.

  Args:
    x: input, in the computation dtype.
    moments: from `kbn_jax._moments.batch_moments` (reduced axes kept as size 1).
    scale, offset: gamma and beta composed with renorm and the adjustment (or None).
    epsilon: added to the variance.
    subtract_mean_first: use the fused kernel's form.

  Returns:
    The normalized array, in ``x``'s dtype.
  """
  reduction = moments.reduction
  if (
    reduction is not None
    and is_per_channel(scale, reduction.axes, x.ndim)
    and is_per_channel(offset, reduction.axes, x.ndim)
  ):
    return _closed_form(
      x,
      (moments.mean, moments.variance, scale, offset),
      reduction.axes,
      epsilon=epsilon,
      subtract_mean_first=subtract_mean_first,
      dtypes=(x.dtype, x.dtype),
      axis_name=reduction.axis_name,
      axis_index_groups=reduction.axis_index_groups,
    )
  return _apply(
    x,
    moments.mean,
    moments.variance,
    scale=scale,
    offset=offset,
    epsilon=epsilon,
    subtract_mean_first=subtract_mean_first,
    own_kernel=False,
  )


def closed_form_normalize(
  x: jax.typing.ArrayLike,
  mean: jax.typing.ArrayLike,
  variance: jax.typing.ArrayLike,
  scale: jax.typing.ArrayLike | None = None,
  offset: jax.typing.ArrayLike | None = None,
  *,
  reduction_axes: Sequence[int],
  epsilon: float,
  subtract_mean_first: bool = False,
  dtype: jax.typing.DTypeLike | None = None,
  axis_name: AxisName | None = None,
  axis_index_groups: AxisIndexGroups | None = None,
) -> jax.Array:
  """`normalize` with the batch moments of `x`, differentiated in closed form.

  The forward pass is exactly ``normalize(x.astype(c), mean, variance, ...)`` in the
  computation dtype ``c = reduction_dtype(x.dtype)``, cast to `dtype`. The backward pass treats
  `mean` and `variance` as what they must be, the biased moments of `x` over `reduction_axes`
  (and over `axis_name`): the input cotangent includes their dependence on `x`, and `mean` and
  `variance` themselves receive zero cotangents, so passing them with or without
  ``stop_gradient`` gives the same first-order gradients. Passing them *without*
  ``stop_gradient`` keeps higher-order gradients exact.

  Any correction derived from the moments (renorm's ``r`` and ``d``, an adjustment) should be
  folded into `scale` and `offset`, under ``stop_gradient`` where the method says so.

  Args:
    x: input array, any floating dtype.
    mean: batch mean with the reduced axes kept as size 1.
    variance: biased batch variance, same shape.
    scale: optional per-channel scale, broadcastable to `mean`'s shape (size 1 on every
      reduction axis).
    offset: optional per-channel offset, same shape rule.
    reduction_axes: axes `mean` and `variance` were reduced over (static).
    epsilon: added to the variance.
    subtract_mean_first: use the fused kernel's form.
    dtype: dtype of the result; defaults to the computation dtype.
    axis_name: mapped axis name(s) the moments were reduced over, if any; the backward pass
      then issues one ``psum`` of per-channel partial sums.
    axis_index_groups: optional groups of `axis_name` indices.

  Returns:
    The normalized array.

  Raises:
    ValueError: if an axis is out of range or repeated, or `scale`, `offset`, `mean` or
      `variance` is not a per-channel array.
  """
  x = jnp.asarray(x)
  axes = _moments.canonical_axes(reduction_axes, x.ndim)
  compute_dtype = _moments.reduction_dtype(x.dtype)
  out_dtype = jnp.dtype(compute_dtype if dtype is None else dtype)
  groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
  return _closed_form(
    x,
    (mean, variance, scale, offset),
    axes,
    epsilon=epsilon,
    subtract_mean_first=subtract_mean_first,
    dtypes=(compute_dtype, out_dtype),
    axis_name=axis_name,
    axis_index_groups=groups,
  )


def _closed_form(
  x: jax.Array,
  operands: tuple[jax.typing.ArrayLike | None, ...],
  axes: tuple[int, ...],
  *,
  epsilon: float,
  subtract_mean_first: bool,
  dtypes: tuple[jax.typing.DTypeLike, jax.typing.DTypeLike],
  axis_name: AxisName | None,
  axis_index_groups: tuple[tuple[int, ...], ...] | None,
) -> jax.Array:
  """`closed_form_normalize` on canonical axes and groups and resolved ``(compute, out)`` dtypes."""
  compute_dtype, out_dtype = dtypes
  stats_shape = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
  # Adjacent reduced (or kept) axes are merged, a free row-major reshape, so XLA sees a 2-D or
  # 3-D reduction. Per-channel operands are broadcast to the statistics' shape outside the
  # custom_vjp, so autodiff sums their gradients back to the caller's shapes.
  shape, kernel_axes = _collapse(x.shape, axes)
  kernel_stats = tuple(1 if a in kernel_axes else n for a, n in enumerate(shape))
  per_channel = [
    _per_channel(value, name, stats_shape, kernel_stats, compute_dtype)
    for name, value in zip(("mean", "variance", "scale", "offset"), operands, strict=True)
  ]
  kernel = _kernel(
    shape,
    kernel_axes,
    float(epsilon),
    bool(subtract_mean_first),
    jnp.dtype(out_dtype),
    axis_name,
    axis_index_groups,
  )
  return kernel(x, *per_channel)


def is_per_channel(
  value: jax.typing.ArrayLike | None, reduction_axes: Sequence[int], ndim: int
) -> bool:
  """Whether `value` (``None`` counts) has size 1 on every reduction axis of a rank-`ndim`
  input, i.e. whether `closed_form_normalize` accepts it as a scale or offset."""
  if value is None:
    return True
  shape = jnp.shape(value)
  if len(shape) > ndim:
    return False
  shape = (1,) * (ndim - len(shape)) + tuple(shape)
  return all(shape[a % ndim] == 1 for a in reduction_axes)


def _collapse(shape: tuple[int, ...], axes: tuple[int, ...]):
  """Merges runs of adjacent reduced axes and runs of adjacent kept axes.

  Returns:
    ``(new_shape, new_reduction_axes)``; reshaping to `new_shape` is free (row-major).
  """
  new_shape, new_axes = [], []
  previous = None
  for axis, size in enumerate(shape):
    reduced = axis in axes
    if reduced == previous:
      new_shape[-1] *= size
    else:
      new_shape.append(size)
      if reduced:
        new_axes.append(len(new_shape) - 1)
    previous = reduced
  return tuple(new_shape), tuple(new_axes)


def _per_channel(value, name, stats_shape, kernel_stats_shape, compute_dtype):
  """Checks that `value` broadcasts to the statistics' shape; returns it in the kernel's shape.

  ``mean`` and ``variance`` are cast to the computation dtype; scale and offset keep theirs
  (the kernel casts them, so their gradients come back in their own dtype).
  """
  if value is None:
    return None
  value = jnp.asarray(value)
  rank = len(stats_shape)
  full = value.reshape((1,) * (rank - value.ndim) + value.shape) if value.ndim <= rank else value
  if full.ndim != rank or any(
    n not in (1, s) for n, s in zip(full.shape, stats_shape, strict=True)
  ):
    raise ValueError(
      f"`{name}` of shape {value.shape} does not broadcast to the statistics' shape "
      f"{stats_shape}: it must be 1 on every reduction axis (a per-channel array); use "
      "kbn_jax.functional.normalize for per-element values."
    )
  if name in ("mean", "variance"):
    full = full.astype(compute_dtype)
  return jnp.broadcast_to(full, stats_shape).reshape(kernel_stats_shape)


@functools.lru_cache(maxsize=256)
def _kernel(shape, axes, epsilon, subtract_mean_first, out_dtype, axis_name, axis_index_groups):
  """Builds the `custom_jvp` normalization for one static configuration.

  The kernel takes `x` in its own shape (so the saved residual *is* the input) and works on the
  collapsed `shape`.
  """

  def forward(x, mean, variance, scale, offset):
    y = _apply(
      x.reshape(shape).astype(mean.dtype),
      mean,
      variance,
      scale=scale,
      offset=offset,
      epsilon=epsilon,
      subtract_mean_first=subtract_mean_first,
      own_kernel=False,
    )
    return y.astype(out_dtype).reshape(x.shape)

  @_moments.remat
  def tangent(x, mean, rstd, scale, dx, dscale, doffset):
    # dy = a (dx - mean(dx) - x_hat mean(dx x_hat)) + dscale x_hat + doffset, with
    # x_hat = (x - mean) rstd and a = scale rstd: the derivative of batch normalization with
    # `mean` and `variance` the batch moments of `x` (their own tangents are implied by `dx`).
    # Each pass gets its own copy of `mean` (see `kbn_jax._moments.distinct`), so XLA fuses
    # ``x - mean`` into it instead of writing it out.
    cdtype = mean.dtype
    xc = x.reshape(shape).astype(cdtype)
    dxc = dx.reshape(shape).astype(cdtype)
    sum_dx = jnp.sum(dxc, axes, keepdims=True)
    sum_dx_xhat = jnp.sum(dxc * (xc - _moments.distinct(mean, rstd)), axes, keepdims=True) * rstd
    count = math.prod(shape[a] for a in axes) * _moments.device_count(axis_name, axis_index_groups)
    if axis_name is not None:
      sum_dx, sum_dx_xhat = _moments.sum_over_group(
        jnp.stack([sum_dx, sum_dx_xhat]), axis_name, axis_index_groups
      )
    a = rstd if scale is None else scale.astype(cdtype) * rstd
    # Per-channel coefficients: dy = a dx + b (x - mean) + c (+ the parameters' terms).
    b = -a * rstd * sum_dx_xhat / count
    c = -a * sum_dx / count
    if dscale is not None:  # its term dscale x_hat shares the (x - mean) pass
      b = b + dscale.astype(cdtype) * rstd
    dy = a * dxc + b * (xc - _moments.distinct(mean, a)) + c
    if doffset is not None:
      dy = dy + doffset.astype(cdtype)
    return dy.astype(out_dtype).reshape(x.shape)

  kernel = jax.custom_jvp(forward)

  @kernel.defjvp
  def _jvp(primals, tangents):
    x, mean, variance, scale, offset = primals
    dx, _, _, dscale, doffset = tangents
    rstd = jnp.reciprocal(jnp.sqrt(variance + jnp.asarray(epsilon, variance.dtype)))
    dy = tangent(x, mean, rstd, scale, dx, dscale, doffset)
    return forward(x, mean, variance, scale, offset), dy

  return kernel


def compose_affine(
  scale: jax.Array | None,
  offset: jax.Array | None,
  then_scale: jax.Array | None,
  then_offset: jax.Array | None,
) -> tuple[jax.Array | None, jax.Array | None]:
  """The affine map "first ``(scale, offset)``, then ``(then_scale, then_offset)``".

  ``None`` means identity (scale 1, offset 0), as in Keras's ``_compose_transforms``.

  Returns:
    ``(scale * then_scale, offset * then_scale + then_offset)`` with ``None`` parts dropped.
  """
  if then_scale is not None:
    scale = then_scale if scale is None else scale * then_scale
    offset = None if offset is None else offset * then_scale
  if then_offset is not None:
    offset = then_offset if offset is None else offset + then_offset
  return scale, offset


def renorm_correction(
  mean: jax.typing.ArrayLike,
  variance: jax.typing.ArrayLike,
  renorm_mean: jax.typing.ArrayLike,
  renorm_stddev: jax.typing.ArrayLike,
  *,
  epsilon: float,
  rmin: jax.typing.ArrayLike | None = None,
  rmax: jax.typing.ArrayLike | None = None,
  dmax: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Batch Renormalization's correction ``(r, d)`` (Ioffe, 2017, Algorithm 1).

  .. math::
    \\sigma = \\sqrt{v + \\epsilon}, \\quad \\hat s = \\max(s_{renorm}, \\sqrt{\\epsilon}),
    \\quad r = \\mathrm{clip}(\\sigma / \\hat s, r_{min}, r_{max}), \\quad
    d = \\mathrm{clip}((\\mu - \\mu_{renorm}) / \\hat s, -d_{max}, d_{max}).

  As in Keras, ``rmin`` is applied before ``rmax`` and the floor ``sqrt(epsilon)`` guards the
  division only. Both outputs are under ``stop_gradient``.

  Args:
    mean, variance: batch moments (averaged over ghost batches when those are used).
    renorm_mean, renorm_stddev: the renorm statistics *before* this step's update.
    epsilon: the layer's epsilon.
    rmin, rmax, dmax: optional clipping bounds (may be traced scalars).

  Returns:
    ``(r, d)``.
  """
  variance = jnp.asarray(variance)
  dtype = variance.dtype
  eps = jnp.asarray(epsilon, dtype)
  stddev = jnp.sqrt(variance + eps)
  floor = jnp.maximum(jnp.asarray(renorm_stddev, dtype), jnp.sqrt(eps))
  r = stddev / floor
  d = (jnp.asarray(mean, dtype) - jnp.asarray(renorm_mean, dtype)) / floor
  if rmin is not None:
    r = jnp.maximum(r, jnp.asarray(rmin, dtype))
  if rmax is not None:
    r = jnp.minimum(r, jnp.asarray(rmax, dtype))
  if dmax is not None:
    dmax = jnp.asarray(dmax, dtype)
    d = jnp.minimum(jnp.maximum(d, -dmax), dmax)
  return lax.stop_gradient(r), lax.stop_gradient(d)
