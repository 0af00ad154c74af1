"""Batch moments: mean and biased variance, in one pass or two, across devices in one collective.

The statistics of a batch-normalization layer, in one place:

* moments accumulate in at least float32 and are two-pass (mean, then the mean of squared
  deviations), so 16-bit inputs and inputs with a large mean stay accurate; the layer's
  training call takes them in one pass (the sums of ``x`` and ``x^2``) when the batch mean is
  within two standard deviations of 0, where that is as accurate, and two otherwise;
* with a mask they are Keras's weighted moments (``tf.nn.weighted_moments``);
* across devices, each device computes its own ``(count, mean, M2)`` and one ``all_gather`` of
  those per-channel partials is merged with Chan et al.'s parallel formula, so the global moments
  are exact two-pass moments with a single collective;
* ghost batches that span several devices take their moments over device groups.

`batch_moments` is the entry the layer uses. Unweighted moments get closed-form derivatives (a
`jax.custom_jvp` that keeps only the input and the mean for the backward pass) and say how they
were reduced, so that `kbn_jax._normalize.normalize_batch` can differentiate the whole layer in
closed form too; weighted moments are differentiated by autodiff.

References:
  Chan, Golub & LeVeque, 1979. Updating Formulae and a Pairwise Algorithm for Computing Sample
  Variances. Technical Report STAN-CS-79-773, Stanford University.

  Chan, Golub & LeVeque, 1983. Algorithms for Computing the Sample Variance: Analysis and
  Recommendations. The American Statistician 37(3), 242-247.

  Hoffer, Hubara & Soudry, 2017. Train longer, generalize better: closing the generalization gap
  in large batch training of neural networks. https://arxiv.org/abs/1705.08741
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AxisName = Hashable | tuple[Hashable, ...]
AxisIndexGroups = Sequence[Sequence[int]]


def promote_dtypes(*dtypes: jax.typing.DTypeLike) -> jnp.dtype:
  """JAX's standard promotion of `dtypes`, also under ``jax_numpy_dtype_promotion="strict"``.

  The library promotes on purpose (float16 input, float32 parameters -> float32 output), so
  the choice must not depend on the user's promotion mode.
  """
  with jax.numpy_dtype_promotion("standard"):
    return jnp.dtype(jnp.result_type(*dtypes))


def reduction_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """Returns the dtype statistics are computed in: at least float32.

  Args:
    dtype: the input's dtype.

  Returns:
    ``promote_types(dtype, float32)`` for floating inputs (float64 stays float64), float32
    otherwise.
  """
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.dtype(jnp.float32)
  return promote_dtypes(dtype, jnp.float32)


def layer_dtypes(
  input_dtype: jnp.dtype, param_dtype: jnp.dtype, dtype: jnp.dtype | None
) -> tuple[jnp.dtype, jnp.dtype]:
  """A layer's dtype policy: ``(compute dtype, output dtype)``.

  Statistics and normalization are computed in at least float32 (`reduction_dtype`); the output
  is `dtype` when given, else the promotion of the input and parameter dtypes.
  """
  out_dtype = jnp.dtype(dtype or promote_dtypes(input_dtype, param_dtype))
  return reduction_dtype(input_dtype), out_dtype


def _div_no_nan(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """``numerator / denominator``, and 0 where the denominator is 0 (TF's `div_no_nan`)."""
  safe = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)
  return jnp.where(denominator == 0, jnp.zeros_like(numerator), numerator / safe)


def _mask_weights(x: jax.Array, mask: jax.typing.ArrayLike) -> jax.Array:
  """Keras's mask weights: ``expand_dims(mask, -1)`` broadcast to the input's shape."""
  weights = jnp.expand_dims(jnp.asarray(mask).astype(x.dtype), -1)
  return jnp.broadcast_to(weights, x.shape)


def partial_moments(
  x: jax.typing.ArrayLike,
  reduction_axes: Sequence[int],
  *,
  mask: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-channel ``(count, mean, M2)`` of the local data, the parts that merge across devices.

  Args:
    x: input array; 16-bit inputs are upcast to float32 first.
    reduction_axes: axes reduced over (static).
    mask: optional weights of shape ``x.shape[:-1]`` (Keras: ``expand_dims(mask, -1)``).

  Returns:
    ``(count, mean, m2)`` with the reduction axes kept as size 1: the (weighted) element count,
    the mean (0 where the count is 0) and the sum of squared deviations from that mean.
  """
  count, mean, m2, _ = _partials(x, reduction_axes, mask, residual=False)
  return count, mean, m2


def _partials(x, reduction_axes, mask, *, residual: bool, barrier: bool = False):
  """`partial_moments`, and with `residual` also ``sum(weights * (x - mean))``.

  The mean is rounded to float32, so ``sum(x - mean)`` is not exactly 0: it holds what the
  rounding lost. Carried into the merge, it keeps the merged variance exact to first order in
  that rounding, as a two-pass variance on one device is (see `merge_partial_moments`). With
  `barrier` the second pass gets its own copy of the mean (see `distinct`), so that XLA fuses
  ``x - mean`` into the reduction.
  """
  x = jnp.asarray(x)
  x = x.astype(reduction_dtype(x.dtype))
  axes = tuple(reduction_axes)
  if mask is None:
    mean = jnp.mean(x, axes, keepdims=True)
    count = jnp.full(mean.shape, math.prod(x.shape[a] for a in axes), x.dtype)
    m2, rest = _centered_sums(x, axes, distinct(mean, count) if barrier else mean, residual)
    return count, mean, m2, rest
  weights = _mask_weights(x, mask)
  count = jnp.sum(weights, axes, keepdims=True)
  mean = _div_no_nan(jnp.sum(weights * x, axes, keepdims=True), count)
  centered = x - mean
  m2 = jnp.sum(weights * jnp.square(centered), axes, keepdims=True)
  rest = jnp.sum(weights * centered, axes, keepdims=True) if residual else None
  return count, mean, m2, rest


# One pass is trusted when every channel's mean lies within this many standard deviations of 0:
# the one-pass variance's relative error then stays below about (1 + 2**2) float32 roundings
# (measured: at most 2.4e-6, against 1.2e-7 to 7.6e-6 for the two-pass form), see
# `_one_pass_partials`.
ONE_PASS_WITHIN_STDS = 2.0


def _one_pass_partials(x, axes):
  """``(count, total, squares, trusted)``: one pass, the sums of ``x`` and ``x^2``.

  The two sums are sibling reductions of the same input, the kernels of Flax's fast variance;
  ``M2 = sum(x^2) - sum(x)^2 / n`` (`_one_pass_m2`). Its relative rounding error grows with
  ``mean^2 / variance`` (Chan, Golub & LeVeque, 1983), so the sums are `trusted` only when
  every channel's mean is within `ONE_PASS_WITHIN_STDS` standard deviations of 0 (a NaN or a
  constant channel away from 0 is not trusted). A shift other than 0 inside the reductions (the
  moving mean, one sample) would widen that window, but the broadcast subtraction makes each
  reduction 1.4-2.1x slower on XLA:CPU, more than the second pass it saves.
  """
  count_value = math.prod(x.shape[a] for a in axes)
  total = jnp.sum(x, axes, keepdims=True)
  squares = jnp.sum(jnp.square(x), axes, keepdims=True)
  count = jnp.full(total.shape, count_value, x.dtype)
  mean = total / count
  trusted = jnp.all(
    jnp.square(mean) * count <= ONE_PASS_WITHIN_STDS**2 * _one_pass_m2(total, squares, count)
  )
  return count, total, squares, trusted


def _one_pass_m2(total, squares, count):
  """``M2 = sum(x^2) - sum(x) * mean`` from the sums of `_one_pass_partials`."""
  return squares - total * (total / count)


def _local_partials(x, axes, *, one_pass: bool, residual: bool):
  """Unweighted ``(count, mean, M2, residual)``: one pass when it can be trusted, else two.

  With `one_pass`, the sums of ``x`` and ``x^2`` come first (`_one_pass_partials`); when the
  batch's mean is not within `ONE_PASS_WITHIN_STDS` standard deviations of 0, a second pass
  takes ``M2`` around that mean (a `lax.cond`, so it runs only when needed; under `jax.vmap`
  with a per-example choice it always runs and each example keeps its own result). The mean is
  the same in both: ``sum(x) / n``. The conditional takes the two sums and each branch derives
  what it returns, so that the per-channel arithmetic runs inside the taken branch.

  This is XLA:CPU's choice in compiled code (`compiled_for_cpu`), where a plain sum costs half
  a centered one; other backends keep two passes, straight-line: a conditional there waits for
  its predicate on the host, and the trade has not been measured on an accelerator. Eager calls
  keep two passes too.
  """
  traced = compiled_for_cpu(x)
  x = jnp.asarray(x)
  x = x.astype(reduction_dtype(x.dtype))
  if not (one_pass and traced) or math.prod(x.shape) == 0:
    return _partials(x, axes, None, residual=residual, barrier=True)
  count, total, squares, trusted = _one_pass_partials(x, axes)

  def keep(total, squares):
    rest = total - count * (total / count)
    return _one_pass_m2(total, squares, count), rest if residual else None

  def second_pass(total, squares):
    del squares  # M2 comes from a centered pass instead.
    return _centered_sums(x, axes, total / count, residual)

  m2, rest = lax.cond(trusted, keep, second_pass, total, squares)
  return count, total / count, m2, rest


def compiled_for_cpu(value: jax.typing.ArrayLike) -> bool:
  """Whether `value` is traced (under `jax.jit`, a transformation) with the CPU as JAX's backend.

  The CPU-specific kernel choices (`_local_partials`, `kbn_jax._normalize.in_own_kernel`) pay
  off only in compiled code on XLA:CPU; eager calls dispatch one operation at a time, where a
  conditional only adds a compilation.
  """
  return isinstance(value, jax.core.Tracer) and jax.default_backend() == "cpu"


def _centered_sums(x, axes, mean, residual: bool):
  """``(sum((x - mean)^2), sum(x - mean) or None)``: the second pass of two-pass moments."""
  centered = x - mean
  m2 = jnp.sum(jnp.square(centered), axes, keepdims=True)
  return m2, jnp.sum(centered, axes, keepdims=True) if residual else None


def merge_partial_moments(
  count: jax.Array,
  mean: jax.Array,
  m2: jax.Array,
  axis_name: AxisName,
  *,
  residual: jax.Array | None = None,
  axis_index_groups: AxisIndexGroups | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Merges per-device ``(count, mean, M2)`` into exact global moments, with one collective.

  The per-channel arrays are stacked and exchanged with a single ``all_gather`` (a few floats
  per channel and device, never activations), then every device merges them the same way
  (Chan et al., 1979, in its K-way form), so all devices hold bit-identical results:

  .. math::
    n = \\sum_i n_i, \\quad \\mu = \\frac{\\sum_i (n_i \\mu_i + r_i)}{n}, \\quad
    M_2 = \\sum_i M_{2,i} + \\sum_i n_i (\\mu_i - \\mu)^2 + 2 \\sum_i (\\mu_i - \\mu) r_i,

  where :math:`r_i = \\sum (x - \\mu_i)` over device :math:`i`'s data is 0 in exact arithmetic.
  Unlike the one-pass ``E[x^2] - E[x]^2`` this has no cancellation when ``|mean| >> std``. With
  the residuals :math:`r_i` it is also as accurate as a two-pass variance on one device: without
  them the rounding of each :math:`\\mu_i` (``ulp(|mean|)``) enters the variance to first order,
  a relative error of about ``ulp(|mean|) / std`` (3e-4 for mean 1e4, std 1 in float32).

  Under `shard_map` the statistics are gathered as invariant (the same on every device, so they
  can leave it with ``out_specs=P()``); without its varying-axis checks (`pmap`,
  ``shard_map(check_vma=False)``, `vmap`) a plain all-gather is used, whose transpose sums the
  cotangents of every device, so gradients are those of the global batch in both.

  Args:
    count, mean, m2: this device's partials, as returned by `partial_moments`.
    axis_name: the mapped axis name (or tuple of names) of `pmap` or `shard_map`.
    residual: optional ``sum(weights * (x - mean))`` of this device's data (sent in the same
      collective); `moments` always passes it.
    axis_index_groups: optional partition of the axis indices; each device then merges only the
      partials of its own group.

  Returns:
    ``(count, mean, m2)`` of the whole batch (or of this device's group).
  """
  partials = (count, mean, m2) if residual is None else (count, mean, m2, residual)
  gathered = _all_gather_partials(partials, axis_name)
  counts, means, m2s = gathered[:3]
  residuals = gathered[3] if residual is not None else None
  if axis_index_groups is not None:
    in_my_group = _same_group_mask(axis_name, axis_index_groups).astype(counts.dtype)
    in_my_group = in_my_group.reshape((-1,) + (1,) * (counts.ndim - 1))
    counts = counts * in_my_group
    m2s = m2s * in_my_group
    residuals = None if residuals is None else residuals * in_my_group
  return _merge(counts, means, m2s, axis=0, residuals=residuals)


def _all_gather_partials(partials, axis_name):
  """One collective: every device receives every device's stacked per-channel `partials`.

  Inside `shard_map` with its varying-axis checks the gather is typed invariant: its transpose
  is a slice, and the sum of the cotangents over devices happens where the invariant statistics
  meet the varying activations (a psum that `shard_map` inserts). Without those checks nothing
  inserts that psum, so the varying all-gather is used, whose transpose is a reduce-scatter.
  """
  stacked = jnp.stack(partials)
  names = set(axis_name) if isinstance(axis_name, tuple) else {axis_name}
  to = "invarying" if names & _varying_axes(stacked) else "varying"
  gathered = lax.all_gather(stacked, axis_name, to=to)
  return tuple(gathered[:, i] for i in range(len(partials)))


def _varying_axes(value: jax.Array) -> frozenset:
  """The mesh axes along which `value` varies inside a checked `shard_map` (empty elsewhere)."""
  aval = jax.typeof(value)
  axis_type = getattr(aval, "manual_axis_type", None)
  if axis_type is not None:
    return frozenset(axis_type.varying)
  return frozenset(getattr(aval, "vma", ()))


def _merge(counts, means, m2s, axis, residuals=None):
  """Chan et al.'s K-way merge of partial moments along `axis` (see `merge_partial_moments`)."""
  total = jnp.sum(counts, axis=axis)
  weighted = jnp.sum(counts * means, axis=axis)
  if residuals is not None:
    weighted = weighted + jnp.sum(residuals, axis=axis)
  mean = _div_no_nan(weighted, total)
  offset = means - jnp.expand_dims(mean, axis)
  m2 = jnp.sum(m2s, axis=axis) + jnp.sum(counts * jnp.square(offset), axis=axis)
  if residuals is not None:
    m2 = m2 + 2 * jnp.sum(offset * residuals, axis=axis)
  return total, mean, m2


def device_group_moments(
  x: jax.typing.ArrayLike,
  reduction_axes: Sequence[int],
  *,
  axis_name: AxisName,
  group_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Moments of ghost batches that span ``group_size`` consecutive devices.

  Devices ``[0, g)``, ``[g, 2g)``, ... each hold one virtual batch together. One ``all_gather``
  of per-channel partials gives every device the moments of every group.

  Args:
    x: this device's part of its virtual batch.
    reduction_axes: axes reduced over (static).
    axis_name: the mapped axis name(s).
    group_size: devices per virtual batch; must divide the axis size.

  Returns:
    ``(mean, variance, mean_over_groups, variance_over_groups)`` with reduction axes kept: the
    moments of this device's group, and their average over all groups (the target of the
    moving averages, as Keras averages over ghost batches).
  """
  gathered = _all_gather_partials(_partials(x, reduction_axes, None, residual=True), axis_name)
  grouped = (gathered[0].shape[0] // group_size, group_size)
  counts, means, m2s, residuals = (a.reshape(grouped + a.shape[1:]) for a in gathered)
  total, group_means, group_m2s = _merge(counts, means, m2s, axis=1, residuals=residuals)
  group_variances = group_m2s / total
  mine = lax.axis_index(axis_name) // group_size
  return (
    group_means[mine],
    group_variances[mine],
    jnp.mean(group_means, axis=0),
    jnp.mean(group_variances, axis=0),
  )


def _same_group_mask(axis_name: AxisName, axis_index_groups: AxisIndexGroups) -> jax.Array:
  """A boolean vector over axis indices: True for the members of this device's group."""
  size = sum(len(group) for group in axis_index_groups)
  group_of = np.empty(size, np.int32)
  for group_id, group in enumerate(axis_index_groups):
    group_of[np.asarray(group, np.int64)] = group_id
  group_of = jnp.asarray(group_of)
  return group_of == group_of[lax.axis_index(axis_name)]


@dataclasses.dataclass(frozen=True)
class Reduction:
  """How unweighted batch moments were reduced: what their closed-form derivative needs.

  Attributes:
    axes: the reduced axes of the input, non-negative and sorted.
    axis_name: the mapped axis name(s) reduced across, or None.
    axis_index_groups: the groups of `axis_name` indices reduced separately, or None.
  """

  axes: tuple[int, ...]
  axis_name: AxisName | None = None
  axis_index_groups: tuple[tuple[int, ...], ...] | None = None


class Moments(NamedTuple):
  """Batch moments with the reduced axes kept as size 1.

  Attributes:
    mean, variance: the mean and the biased variance, in ``reduction_dtype(x.dtype)``.
    reduction: how they were reduced when they are the plain (unweighted) moments of the input,
      whose closed-form derivative `kbn_jax._normalize.normalize_batch` then uses; None for
      weighted (masked) moments and device-group moments, differentiated by autodiff.
  """

  mean: jax.Array
  variance: jax.Array
  reduction: Reduction | None


def batch_moments(
  x: jax.typing.ArrayLike,
  reduction_axes: Sequence[int],
  *,
  mask: jax.typing.ArrayLike | None = None,
  axis_name: AxisName | None = None,
  axis_index_groups: AxisIndexGroups | None = None,
  one_pass: bool = False,
) -> Moments:
  """The batch moments of `x`, with the derivative that fits them.

  Unweighted moments are computed by a `jax.custom_jvp` whose derivative keeps only `x` and the
  mean:

  .. math::
    \\frac{\\partial L}{\\partial x} = \\frac{\\bar\\mu + 2 \\bar v (x - \\mu)}{n}.

  Autodiff of the two-pass formula would instead keep ``2 (x - mean)``, a second
  activation-sized array. When nothing downstream differentiates the moments (the usual case:
  `kbn_jax._normalize.normalize_batch` returns zero cotangents for them), the backward pass is
  skipped entirely. Weighted moments (a mask) are differentiated by autodiff.

  Args:
    x: input array, any floating dtype.
    reduction_axes: axes to reduce over (static).
    mask: optional weights of shape ``x.shape[:-1]`` (Keras: ``expand_dims(mask, -1)``).
    axis_name: optional mapped axis name(s) to reduce across devices.
    axis_index_groups: optional groups of `axis_name` indices reduced separately.
    one_pass: take unweighted moments in one pass (the sums of ``x`` and ``x^2``) when the
      batch mean is within `ONE_PASS_WITHIN_STDS` standard deviations of 0, where that is as
      accurate, and add a second pass otherwise (see `_local_partials`). Ignored with a mask.

  Returns:
    `Moments`, with the reduced axes kept as size 1.
  """
  x = jnp.asarray(x)
  axes = canonical_axes(reduction_axes, x.ndim)
  groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
  groups = groups if axis_name is not None else None
  if mask is not None:
    mean, variance = _weighted_moments(x, axes, mask, axis_name, groups)
    return Moments(mean, variance, None)
  mean, variance = _moments_kernel(axes, axis_name, groups, one_pass)(x)
  return Moments(mean, variance, Reduction(axes, axis_name, groups))


def moments(
  x: jax.typing.ArrayLike,
  reduction_axes: Sequence[int],
  *,
  mask: jax.typing.ArrayLike | None = None,
  axis_name: AxisName | None = None,
  axis_index_groups: AxisIndexGroups | None = None,
  keepdims: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Batch mean and biased variance, two-pass, accumulated in at least float32.

  Without a mask this is TF's ``tf.nn.moments`` (with closed-form derivatives, see
  `batch_moments`); with one, ``tf.nn.weighted_moments`` with weights ``expand_dims(mask, -1)``
  and ``div_no_nan`` (a fully masked batch gives 0, not NaN). With ``axis_name`` the result is the
  exact moment of the batch concatenated over devices.

  Args:
    x: input array.
    reduction_axes: axes to reduce over (static).
    mask: optional weights of shape ``x.shape[:-1]``.
    axis_name: optional mapped axis name(s) to reduce across devices.
    axis_index_groups: optional groups of axis indices reduced separately.
    keepdims: keep the reduced axes as size 1.

  Returns:
    ``(mean, variance)`` in ``reduction_dtype(x.dtype)``.
  """
  mean, variance, _ = batch_moments(
    x, reduction_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
  )
  if not keepdims:
    axes = canonical_axes(reduction_axes, jnp.ndim(x))
    mean, variance = jnp.squeeze(mean, axes), jnp.squeeze(variance, axes)
  return mean, variance


def _weighted_moments(x, axes, mask, axis_name, axis_index_groups):
  """Keras's weighted moments (keepdims), differentiated by autodiff."""
  count, mean, m2, residual = _partials(x, axes, mask, residual=axis_name is not None)
  if axis_name is not None:
    count, mean, m2 = merge_partial_moments(
      count, mean, m2, axis_name, residual=residual, axis_index_groups=axis_index_groups
    )
  return mean, _div_no_nan(m2, count)


def canonical_axes(reduction_axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  """`reduction_axes` as sorted non-negative ints; raises for an axis out of range or repeated."""
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


# The derivative rules are rematerialized in reverse mode, without `jax.checkpoint`'s default
# ``prevent_cse``: its optimization barrier on the rule's inputs splits a reshape chain such as
# a ghost batch's ``(B, ...) -> (vbs, B/vbs, ...)`` followed by the normalize kernel's collapse,
# and XLA:CPU then copies the input and the output cotangent (ghost step: 11 reads + 4 writes
# instead of 9 + 2). No scan or loop surrounds these rules, and `distinct` already keeps the
# rematerialized ``x - mean`` apart from the forward pass's arithmetic.
remat = functools.partial(jax.checkpoint, prevent_cse=False)


@functools.lru_cache(maxsize=256)
def _moments_kernel(axes, axis_name, axis_index_groups, one_pass):
  """Builds the `custom_jvp` moments for one static configuration."""

  def moments_with_count(x):
    count, mean, m2, residual = _local_partials(
      x, axes, one_pass=one_pass, residual=axis_name is not None
    )
    if axis_name is not None:
      count, mean, m2 = merge_partial_moments(
        count, mean, m2, axis_name, residual=residual, axis_index_groups=axis_index_groups
      )
      return mean, _div_no_nan(m2, count), count
    return mean, m2 / count, count

  @remat
  def tangent(x, mean, count, dx):
    # d mean = mean(dx), d variance = 2 mean((x - mean) dx), over the whole (global) batch.
    xc = x.astype(mean.dtype)
    dxc = dx.astype(mean.dtype)
    sums = jnp.stack(
      [jnp.sum(dxc, axes, keepdims=True), jnp.sum((xc - mean) * dxc, axes, keepdims=True)]
    )
    if axis_name is not None:
      sums = sum_over_group(sums, axis_name, axis_index_groups)
    inv_n = _div_no_nan(jnp.ones_like(count), count)
    return sums[0] * inv_n, 2 * sums[1] * inv_n

  kernel = jax.custom_jvp(lambda x: moments_with_count(x)[:2])

  @kernel.defjvp
  def _jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    mean, variance, count = moments_with_count(x)
    return (mean, variance), tangent(x, mean, count, dx)

  return kernel


def sum_over_group(
  partials: jax.typing.ArrayLike, axis_name: AxisName, axis_index_groups: AxisIndexGroups | None
) -> jax.Array:
  """One collective: the sum of `partials` over this device's group of `axis_name`."""
  partials = jnp.asarray(partials)
  if axis_index_groups is None:
    return lax.psum(partials, axis_name)
  # As in `merge_partial_moments`: gather everything, keep the own group's part.
  gathered = lax.all_gather(partials, axis_name, to="invarying")
  in_group = _same_group_mask(axis_name, axis_index_groups).astype(partials.dtype)
  return jnp.sum(gathered * in_group.reshape((-1,) + (1,) * partials.ndim), axis=0)


def device_count(axis_name: AxisName | None, axis_index_groups: AxisIndexGroups | None) -> int:
  """How many devices' data a synchronized reduction covers (1 without `axis_name`)."""
  if axis_name is None:
    return 1
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  return lax.axis_size(axis_name)


def distinct(value: jax.Array, tag: jax.Array) -> jax.Array:
  """`value`, hidden from XLA's common-subexpression elimination by a barrier tied to `tag`.

  XLA:CPU fuses ``x - mean`` into each reduction or elementwise pass that reads it, unless one
  broadcast of `mean` is shared by several passes: then it writes that broadcast (or
  ``x - mean``) out as an activation-sized temporary. Giving each pass its own ``mean`` keeps
  every pass a single read of ``x``.
  """
  value, _ = lax.optimization_barrier((value, tag))
  return value
