"""Training-mode batch normalization with a closed-form backward pass.

`batch_norm_train` computes exactly what ``functional.moments`` followed by
``functional.normalize`` compute (two-pass moments in at least float32, Keras's two arithmetic
forms), but differentiates with a `jax.custom_vjp` instead of autodiff. Autodiff through the
two-pass moments and the affine map saves several activation-sized intermediates and streams
them back; the closed form needs only the input and a few per-channel vectors:

.. math::
  \\hat x = (x - \\mu) \\rho, \\quad \\rho = (\\sigma^2 + \\epsilon)^{-1/2}, \\quad
  \\frac{\\partial L}{\\partial x} = \\gamma \\rho \\Big(g - \\overline{g}
  - \\hat x \\, \\overline{g \\hat x}\\Big)
  + \\frac{\\bar\\mu}{n} + \\frac{2 \\bar v}{n} (x - \\mu),

where ``g`` is the output cotangent, overlines are means over the reduced axes (over the whole
global batch with ``axis_name``), and ``bar mu``, ``bar v`` are the cotangents of the returned
mean and variance. The backward reads the input and the cotangent twice (one reduction, one
elementwise pass) and writes the input cotangent once.

Reverse-over-reverse (``jax.grad`` of ``jax.grad``) and forward-over-reverse (``jax.hessian``)
work, because the backward is itself ordinary differentiable JAX code. Forward mode applied
directly to `batch_norm_train` (``jax.jvp``, ``jax.jacfwd``) is not supported by a
`jax.custom_vjp` and raises a ``TypeError``; use ``functional.moments`` and
``functional.normalize`` there.

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
from jax.custom_derivatives import SymbolicZero

from kbn_jax import functional


def batch_norm_train(
  x: jax.typing.ArrayLike,
  scale: jax.typing.ArrayLike | None = None,
  offset: jax.typing.ArrayLike | None = None,
  *,
  reduction_axes: Sequence[int],
  epsilon: float,
  subtract_mean_first: bool = False,
  dtype: jax.typing.DTypeLike | None = None,
  axis_name: functional.AxisName | None = None,
  axis_index_groups: functional.AxisIndexGroups | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Normalizes `x` with its own batch statistics; differentiable in `x`, `scale`, `offset`.

  Equivalent to::

    xc = x.astype(functional.reduction_dtype(x.dtype))
    mean, variance = functional.moments(xc, reduction_axes, axis_name=axis_name,
                                        axis_index_groups=axis_index_groups, keepdims=True)
    y = functional.normalize(xc, mean, variance, scale=scale, offset=offset, epsilon=epsilon,
                             subtract_mean_first=subtract_mean_first).astype(dtype)

  with the same forward arithmetic, and gradients equal to autodiff of that code up to
  rounding. Only `x` and per-channel vectors are kept for the backward pass; a 16-bit `x` is
  kept in 16 bits.

  Args:
    x: input array, any floating dtype.
    scale: optional gamma (already composed with renorm's ``r`` or an adjustment), broadcastable
      to the statistics' shape: size 1 on every reduction axis.
    offset: optional beta (composed likewise), with the same shape rule as `scale`.
    reduction_axes: axes to reduce over (static, non-negative or negative ints).
    epsilon: added to the variance.
    subtract_mean_first: use the fused kernel's form ``(x - mean) * inv + offset`` instead of
      ``x * inv + (offset - mean * inv)``.
    dtype: dtype of `y`; defaults to the computation dtype ``reduction_dtype(x.dtype)``.
    axis_name: optional mapped axis name(s) over which the moments are global (one
      ``all_gather`` forward, one ``psum`` backward).
    axis_index_groups: optional groups of `axis_name` indices reduced separately.

  Returns:
    ``(y, mean, variance)``; `mean` and the biased `variance` keep the reduced axes as size 1
    and are in the computation dtype.

  Raises:
    ValueError: if `scale` or `offset` is not size 1 on a reduction axis, or an axis is out of
      range.
  """
  x = jnp.asarray(x)
  axes = _canonical_axes(reduction_axes, x.ndim)
  stats_shape = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
  compute_dtype = functional.reduction_dtype(x.dtype)
  out_dtype = jnp.dtype(compute_dtype if dtype is None else dtype)
  groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
  # Adjacent reduced (or kept) axes are merged, a free reshape: XLA then sees a 2-D or 3-D
  # reduction instead of a rank-4 or rank-5 one.
  shape, kernel_axes = _collapse(x.shape, axes)
  kernel_stats = tuple(1 if a in kernel_axes else n for a, n in enumerate(shape))
  scale = _per_channel(scale, "scale", stats_shape, kernel_stats)
  offset = _per_channel(offset, "offset", stats_shape, kernel_stats)
  kernel = _kernel(
    kernel_axes, float(epsilon), bool(subtract_mean_first), out_dtype, axis_name, groups
  )
  y, mean, variance = kernel(x.reshape(shape), scale, offset)
  return y.reshape(x.shape), mean.reshape(stats_shape), variance.reshape(stats_shape)


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


def _per_channel(value, name, stats_shape, kernel_stats_shape) -> jax.Array | None:
  """Checks that `value` broadcasts to the statistics' shape; returns it in the kernel's shape.

  Broadcasting happens outside the `custom_vjp`, so autodiff sums the gradient back to the
  shape the caller passed.
  """
  if value is None:
    return None
  value = jnp.asarray(value)
  rank = len(stats_shape)
  if value.ndim > rank:
    raise ValueError(
      f"`{name}` of shape {value.shape} has more dimensions than the input ({rank})."
    )
  full = value.reshape((1,) * (rank - value.ndim) + value.shape)
  for size, stat_size in zip(full.shape, stats_shape, strict=True):
    if size not in (1, stat_size):
      raise ValueError(
        f"`{name}` of shape {value.shape} does not broadcast to the statistics' shape "
        f"{stats_shape}: it must be 1 on every reduction axis (a per-channel vector); "
        "use functional.normalize for per-element scales."
      )
  return jnp.broadcast_to(full, stats_shape).reshape(kernel_stats_shape)


@functools.lru_cache(maxsize=256)
def _kernel(axes, epsilon, subtract_mean_first, out_dtype, axis_name, axis_index_groups):
  """Builds the `custom_vjp` kernel for one static configuration."""

  @jax.custom_vjp
  def kernel(x, scale, offset):
    y, mean, variance, _ = _forward(x, scale, offset)
    return y, mean, variance

  def _forward(x, scale, offset):
    xc = x.astype(functional.reduction_dtype(x.dtype))
    count, mean, m2 = functional.partial_moments(xc, axes)
    if axis_name is not None:
      count, mean, m2 = functional.merge_partial_moments(
        count, mean, m2, axis_name, axis_index_groups=axis_index_groups
      )
      variance = functional._div_no_nan(m2, count)
    else:
      variance = m2 / count
    y = functional.normalize(
      xc,
      mean,
      variance,
      scale=scale,
      offset=offset,
      epsilon=epsilon,
      subtract_mean_first=subtract_mean_first,
    )
    return y.astype(out_dtype), mean, variance, count

  def fwd(x, scale, offset):
    x, scale, offset = (None if p is None else p.value for p in (x, scale, offset))
    y, mean, variance, count = _forward(x, scale, offset)
    rstd = lax.rsqrt(variance + jnp.asarray(epsilon, variance.dtype))
    return (y, mean, variance), (x, scale, offset, mean, rstd, count)

  def bwd(residuals, cotangents):
    x, scale, offset, mean, rstd, count = residuals
    dy, dmean, dvariance = cotangents
    cdtype = mean.dtype
    xc = x.astype(cdtype)
    if isinstance(dy, SymbolicZero):
      dy = jnp.zeros(xc.shape, cdtype)
    dy = dy.astype(cdtype)
    sum_dy = jnp.sum(dy, axes, keepdims=True)
    sum_dy_xmu = jnp.sum(dy * (xc - _distinct(mean, rstd)), axes, keepdims=True)
    global_dy, global_dy_xmu = sum_dy, sum_dy_xmu
    dmean = None if isinstance(dmean, SymbolicZero) else dmean.astype(cdtype)
    dvariance = None if isinstance(dvariance, SymbolicZero) else dvariance.astype(cdtype)
    if axis_name is not None:
      global_dy, global_dy_xmu, dmean, dvariance = _psum_partials(
        sum_dy, sum_dy_xmu, dmean, dvariance
      )
    gamma = jnp.ones_like(rstd) if scale is None else scale.astype(cdtype)
    inv_n = _div_no_nan(jnp.ones_like(count), count)
    # dx = a * dy + b * (x - mean) + c, all three per channel.
    a = gamma * rstd
    b = -a * jnp.square(rstd) * global_dy_xmu * inv_n
    c = -a * global_dy * inv_n
    if dmean is not None:
      c = c + dmean * inv_n
    if dvariance is not None:
      b = b + 2 * dvariance * inv_n
    dx = (a * dy + b * (xc - _distinct(mean, a)) + c).astype(x.dtype)
    dscale = None if scale is None else (sum_dy_xmu * rstd).astype(scale.dtype)
    doffset = None if offset is None else sum_dy.astype(offset.dtype)
    return dx, dscale, doffset

  def _psum_partials(sum_dy, sum_dy_xmu, dmean, dvariance):
    """One ``psum`` of every per-channel partial the input cotangent needs."""
    parts = [sum_dy, sum_dy_xmu]
    parts += [p for p in (dmean, dvariance) if p is not None]
    summed = lax.psum(jnp.stack(parts), axis_name, axis_index_groups=axis_index_groups)
    summed = list(summed)
    global_dy, global_dy_xmu = summed[:2]
    rest = iter(summed[2:])
    dmean = None if dmean is None else next(rest)
    dvariance = None if dvariance is None else next(rest)
    return global_dy, global_dy_xmu, dmean, dvariance

  kernel.defvjp(fwd, bwd, symbolic_zeros=True)
  return kernel


def _div_no_nan(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  safe = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)
  return jnp.where(denominator == 0, jnp.zeros_like(numerator), numerator / safe)


def _distinct(value: jax.Array, tag: jax.Array) -> jax.Array:
  """`value`, hidden from XLA's common-subexpression elimination by a barrier tied to `tag`.

  XLA:CPU fuses ``x - mean`` into each reduction or elementwise pass that reads it, unless one
  broadcast of `mean` is shared by several passes: then it writes the broadcast (or
  ``x - mean``) out as an activation-sized temporary. Giving each pass its own ``mean`` keeps
  every pass a single read of ``x``.
  """
  value, _ = lax.optimization_barrier((value, tag))
  return value
