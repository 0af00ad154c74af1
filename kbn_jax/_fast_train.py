"""Training-mode batch normalization with closed-form derivatives.

Autodiff through two-pass moments and the affine map keeps several activation-sized
intermediates alive and streams them back. This module computes the same forward arithmetic as
``functional.moments`` followed by ``functional.normalize`` (Keras's two forms), but
differentiates with a `jax.custom_jvp` whose tangent rule is linear and closed-form. Forward
mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) uses the rule directly; reverse mode
transposes it. The rule's activation-sized intermediates are rematerialized
(``jax.checkpoint``), so the backward pass needs only the input and per-channel vectors:

.. math::
  \\hat x = (x - \\mu) \\rho, \\quad \\rho = (\\sigma^2 + \\epsilon)^{-1/2}, \\quad
  \\frac{\\partial L}{\\partial x} = \\gamma \\rho \\Big(g - \\overline{g}
  - \\hat x \\, \\overline{g \\hat x}\\Big),

where ``g`` is the output cotangent and overlines are means over the reduced axes (over the
whole global batch with ``axis_name``). The backward reads the input and the cotangent twice
(two reductions, one elementwise pass) and writes the input cotangent once.

`normalize_batch` is the primitive: it takes the batch moments, so that callers can derive
renorm's ``r, d`` or other corrections from them and fold everything into one per-channel
scale and offset *before* the activations are touched, as `kbn_jax.layers` does.

Differentiation: forward and reverse mode of any order work (``jax.jvp``, ``jax.grad`` of
``jax.grad``, ``jax.hessian``), because the tangent rule is ordinary differentiable JAX code.

References:
  Ioffe & Szegedy, 2015. Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift. https://arxiv.org/abs/1502.03167
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from kbn_jax import _math as functional


def batch_moments(
  x: jax.typing.ArrayLike,
  reduction_axes: Sequence[int],
  *,
  axis_name: functional.AxisName | None = None,
  axis_index_groups: functional.AxisIndexGroups | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``functional.moments(x, ..., keepdims=True)`` with closed-form derivatives.

  The forward pass is ``functional.moments`` in the computation dtype (two-pass, one
  ``all_gather`` with `axis_name`). The derivatives keep only `x` and the mean:

  .. math::
    \\frac{\\partial L}{\\partial x} = \\frac{\\bar\\mu + 2 \\bar v (x - \\mu)}{n}.

  Autodiff of the two-pass formula would instead keep ``2 (x - mean)``, a second
  activation-sized array. When nothing downstream differentiates the moments (the usual case:
  `normalize_batch` returns zero cotangents for them), the backward pass is skipped entirely.

  Args:
    x: input array, any floating dtype.
    reduction_axes: axes to reduce over (static).
    axis_name: optional mapped axis name(s) to reduce across devices.
    axis_index_groups: optional groups of `axis_name` indices reduced separately.

  Returns:
    ``(mean, variance)``, biased, with the reduced axes kept as size 1, in
    ``reduction_dtype(x.dtype)``.
  """
  x = jnp.asarray(x)
  axes = _canonical_axes(reduction_axes, x.ndim)
  groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
  return _moments_kernel(axes, axis_name, groups)(x)


def normalize_batch(
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
  axis_name: functional.AxisName | None = None,
  axis_index_groups: functional.AxisIndexGroups | None = None,
) -> jax.Array:
  """``functional.normalize`` with batch moments, differentiated as batch normalization.

  The forward pass is exactly ``functional.normalize(x.astype(c), mean, variance, ...)`` in the
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
  axes = _canonical_axes(reduction_axes, x.ndim)
  stats_shape = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
  compute_dtype = functional.reduction_dtype(x.dtype)
  out_dtype = jnp.dtype(compute_dtype if dtype is None else dtype)
  groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
  # Adjacent reduced (or kept) axes are merged, a free row-major reshape, so XLA sees a 2-D or
  # 3-D reduction. Per-channel operands are broadcast to the statistics' shape outside the
  # custom_vjp, so autodiff sums their gradients back to the caller's shapes.
  shape, kernel_axes = _collapse(x.shape, axes)
  kernel_stats = tuple(1 if a in kernel_axes else n for a, n in enumerate(shape))
  operands = [
    _per_channel(value, name, stats_shape, kernel_stats, compute_dtype)
    for name, value in (
      ("mean", mean),
      ("variance", variance),
      ("scale", scale),
      ("offset", offset),
    )
  ]
  kernel = _kernel(
    shape, kernel_axes, float(epsilon), bool(subtract_mean_first), out_dtype, axis_name, groups
  )
  return kernel(x, *operands)


def is_per_channel(
  value: jax.typing.ArrayLike | None, reduction_axes: Sequence[int], ndim: int
) -> bool:
  """Whether `value` (``None`` counts) has size 1 on every reduction axis of a rank-`ndim`
  input, i.e. whether `normalize_batch` accepts it as a scale or offset."""
  if value is None:
    return True
  shape = jnp.shape(value)
  if len(shape) > ndim:
    return False
  shape = (1,) * (ndim - len(shape)) + tuple(shape)
  return all(shape[a % ndim] == 1 for a in reduction_axes)


def _canonical_axes(reduction_axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  axes = []
  for axis in reduction_axes:
    if not -ndim <= axis < ndim:
      raise ValueError(
        f"`reduction_axes` entry {axis} is out of range for an input of rank {ndim}; use "
        f"axes in [{-ndim}, {ndim})."
      )
    axes.append(axis % ndim)
  if len(set(axes)) != len(axes):
    raise ValueError(f"`reduction_axes`={tuple(reduction_axes)} repeats an axis; list each once.")
  return tuple(sorted(axes))


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
      "functional.normalize for per-element values."
    )
  if name in ("mean", "variance"):
    full = full.astype(compute_dtype)
  return jnp.broadcast_to(full, stats_shape).reshape(kernel_stats_shape)


# The tangent rules are rematerialized in reverse mode, without `jax.checkpoint`'s default
# ``prevent_cse``: its optimization barrier on the rule's inputs splits a reshape chain such as
# a ghost batch's ``(B, ...) -> (vbs, B/vbs, ...)`` followed by the kernel's `_collapse`, and
# XLA:CPU then copies the input and the output cotangent (ghost step: 11 reads + 4 writes
# instead of 9 + 2). No scan or loop surrounds these rules, and `_distinct` already keeps the
# rematerialized ``x - mean`` apart from the forward pass's arithmetic.
_remat = functools.partial(jax.checkpoint, prevent_cse=False)


@functools.lru_cache(maxsize=256)
def _kernel(shape, axes, epsilon, subtract_mean_first, out_dtype, axis_name, axis_index_groups):
  """Builds the `custom_jvp` normalization for one static configuration.

  The kernel takes `x` in its own shape (so the saved residual *is* the input) and works on the
  collapsed `shape`.
  """

  def forward(x, mean, variance, scale, offset):
    y = functional.normalize(
      x.reshape(shape).astype(mean.dtype),
      mean,
      variance,
      scale=scale,
      offset=offset,
      epsilon=epsilon,
      subtract_mean_first=subtract_mean_first,
    )
    return y.astype(out_dtype).reshape(x.shape)

  @_remat
  def tangent(x, mean, rstd, scale, dx, dscale, doffset):
    # dy = a (dx - mean(dx) - x_hat mean(dx x_hat)) + dscale x_hat + doffset, with
    # x_hat = (x - mean) rstd and a = scale rstd: the derivative of batch normalization with
    # `mean` and `variance` the batch moments of `x` (their own tangents are implied by `dx`).
    # Each pass gets its own copy of `mean` (see `_distinct`), so XLA fuses ``x - mean`` into
    # it instead of writing it out.
    cdtype = mean.dtype
    xc = x.reshape(shape).astype(cdtype)
    dxc = dx.reshape(shape).astype(cdtype)
    sum_dx = jnp.sum(dxc, axes, keepdims=True)
    sum_dx_xhat = jnp.sum(dxc * (xc - _distinct(mean, rstd)), axes, keepdims=True) * rstd
    count = _count(shape, axes) * _group_size(axis_name, axis_index_groups)
    if axis_name is not None:
      sum_dx, sum_dx_xhat = _sum_over_group(
        jnp.stack([sum_dx, sum_dx_xhat]), axis_name, axis_index_groups
      )
    a = rstd if scale is None else scale.astype(cdtype) * rstd
    # Per-channel coefficients: dy = a dx + b (x - mean) + c (+ the parameters' terms).
    b = -a * rstd * sum_dx_xhat / count
    c = -a * sum_dx / count
    if dscale is not None:  # its term dscale x_hat shares the (x - mean) pass
      b = b + dscale.astype(cdtype) * rstd
    dy = a * dxc + b * (xc - _distinct(mean, a)) + c
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


@functools.lru_cache(maxsize=256)
def _moments_kernel(axes, axis_name, axis_index_groups):
  """Builds the `custom_jvp` moments for one static configuration."""

  def moments_with_count(x):
    # functional.partial_moments' arithmetic; the second pass gets its own copy of the mean
    # (see `_distinct`) so that XLA fuses ``x - mean`` into the reduction.
    xc = x.astype(functional.reduction_dtype(x.dtype))
    mean = jnp.mean(xc, axes, keepdims=True)
    count = jnp.full(mean.shape, _count(x.shape, axes), xc.dtype)
    centered = xc - _distinct(mean, count)
    m2 = jnp.sum(jnp.square(centered), axes, keepdims=True)
    if axis_name is not None:
      # What the rounded mean lost (same pass as m2): keeps the merged variance two-pass exact.
      residual = jnp.sum(centered, axes, keepdims=True)
      count, mean, m2 = functional.merge_partial_moments(
        count, mean, m2, axis_name, residual=residual, axis_index_groups=axis_index_groups
      )
      return mean, functional._div_no_nan(m2, count), count
    return mean, m2 / count, count

  @_remat
  def tangent(x, mean, count, dx):
    # d mean = mean(dx), d variance = 2 mean((x - mean) dx), over the whole (global) batch.
    xc = x.astype(mean.dtype)
    dxc = dx.astype(mean.dtype)
    sums = jnp.stack(
      [jnp.sum(dxc, axes, keepdims=True), jnp.sum((xc - mean) * dxc, axes, keepdims=True)]
    )
    if axis_name is not None:
      sums = _sum_over_group(sums, axis_name, axis_index_groups)
    inv_n = functional._div_no_nan(jnp.ones_like(count), count)
    return sums[0] * inv_n, 2 * sums[1] * inv_n

  kernel = jax.custom_jvp(lambda x: moments_with_count(x)[:2])

  @kernel.defjvp
  def _jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    mean, variance, count = moments_with_count(x)
    return (mean, variance), tangent(x, mean, count, dx)

  return kernel


def _sum_over_group(partials, axis_name, axis_index_groups):
  """One collective: the sum of `partials` over this device's group of `axis_name`."""
  partials = jnp.asarray(partials)
  if axis_index_groups is None:
    return lax.psum(partials, axis_name)
  # As in `functional.merge_partial_moments`: gather everything, keep the own group's part.
  gathered = lax.all_gather(partials, axis_name, to="invarying")
  in_group = functional._same_group_mask(axis_name, axis_index_groups).astype(partials.dtype)
  return jnp.sum(gathered * in_group.reshape((-1,) + (1,) * partials.ndim), axis=0)


def _group_size(axis_name, axis_index_groups) -> int:
  """How many devices' data a synchronized reduction covers (1 without `axis_name`)."""
  if axis_name is None:
    return 1
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  return lax.axis_size(axis_name)


def _count(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
  count = 1
  for axis in axes:
    count *= shape[axis]
  return count


def _distinct(value: jax.Array, tag: jax.Array) -> jax.Array:
  """`value`, hidden from XLA's common-subexpression elimination by a barrier tied to `tag`.

  XLA:CPU fuses ``x - mean`` into each reduction or elementwise pass that reads it, unless one
  broadcast of `mean` is shared by several passes: then it writes that broadcast (or
  ``x - mean``) out as an activation-sized temporary. Giving each pass its own ``mean`` keeps
  every pass a single read of ``x``.
  """
  value, _ = lax.optimization_barrier((value, tag))
  return value
