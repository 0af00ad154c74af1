"""Pure, jit-able batch-normalization math, free of Flax.

Every function here takes arrays and static configuration and returns arrays, so it serves raw
JAX, Haiku or Equinox code as well as the linen Module in `kbn_jax.layers`. Configuration that
shapes the computation (`reduction_axes`, `axis_name`, `axis_index_groups`, flags) must be static
(Python values) under `jax.jit`.

Numerics follow the Keras 2.x V1 layer (see `keras_bn_v1_spec.md` in the project docs):

* moments are two-pass (mean, then the mean of squared deviations) and accumulate in at least
  float32, so 16-bit inputs and inputs with a large mean stay accurate;
* across devices, each device computes its own ``(count, mean, M2)`` and one ``all_gather`` of
  those per-channel partials is merged with Chan et al.'s parallel formula, so the global moments
  are exact two-pass moments with a single collective;
* the moving average uses Keras's assign-sub form ``v - (v - x) * (1 - momentum)``.

References:
  Ioffe & Szegedy, 2015. Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift. https://arxiv.org/abs/1502.03167

  Ioffe, 2017. Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
  Models. https://arxiv.org/abs/1702.03275

  Hoffer, Hubara & Soudry, 2017. Train longer, generalize better: closing the generalization gap
  in large batch training of neural networks. https://arxiv.org/abs/1705.08741

  Chan, Golub & LeVeque, 1979. Updating Formulae and a Pairwise Algorithm for Computing Sample
  Variances. Technical Report STAN-CS-79-773, Stanford University.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

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


def _partials(x, reduction_axes, mask, *, residual: bool):
  """`partial_moments`, and with `residual` also ``sum(weights * (x - mean))``.

  The mean is rounded to float32, so ``sum(x - mean)`` is not exactly 0: it holds what the
  rounding lost. Carried into the merge, it keeps the merged variance exact to first order in
  that rounding, as a two-pass variance on one device is (see `merge_partial_moments`).
  """
  x = jnp.asarray(x)
  x = x.astype(reduction_dtype(x.dtype))
  axes = tuple(reduction_axes)
  if mask is None:
    mean = jnp.mean(x, axes, keepdims=True)
    centered = x - mean
    m2 = jnp.sum(jnp.square(centered), axes, keepdims=True)
    count = jnp.full(mean.shape, math.prod(x.shape[a] for a in axes), x.dtype)
    rest = jnp.sum(centered, axes, keepdims=True) if residual else None
    return count, mean, m2, rest
  weights = _mask_weights(x, mask)
  count = jnp.sum(weights, axes, keepdims=True)
  mean = _div_no_nan(jnp.sum(weights * x, axes, keepdims=True), count)
  centered = x - mean
  m2 = jnp.sum(weights * jnp.square(centered), axes, keepdims=True)
  rest = jnp.sum(weights * centered, axes, keepdims=True) if residual else None
  return count, mean, m2, rest


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

  Without a mask this is TF's ``tf.nn.moments``; with one, ``tf.nn.weighted_moments`` with
  weights ``expand_dims(mask, -1)`` and ``div_no_nan`` (a fully masked batch gives 0, not NaN).
  With ``axis_name`` the result is the exact moment of the batch concatenated over devices.

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
  axes = tuple(reduction_axes)
  count, mean, m2, residual = _partials(x, axes, mask, residual=axis_name is not None)
  if axis_name is not None:
    count, mean, m2 = merge_partial_moments(
      count, mean, m2, axis_name, residual=residual, axis_index_groups=axis_index_groups
    )
    variance = _div_no_nan(m2, count)
  elif mask is None:
    variance = m2 / count
  else:
    variance = _div_no_nan(m2, count)
  if not keepdims:
    mean, variance = jnp.squeeze(mean, axes), jnp.squeeze(variance, axes)
  return mean, variance


def bessel_correction(variance: jax.typing.ArrayLike, count: int) -> jax.Array:
  """Unbiased variance from the biased one, as the fused Keras V1 kernel reports it.

  ``variance * n / max(n - 1, 1)``: with ``n = 1`` the variance stays (it is 0).

  Args:
    variance: biased batch variance.
    count: number of elements per channel (static).

  Returns:
    The Bessel-corrected variance.
  """
  variance = jnp.asarray(variance)
  return variance * jnp.asarray(count / max(count - 1, 1), variance.dtype)


def update_moving_average(
  moving: jax.typing.ArrayLike, value: jax.typing.ArrayLike, momentum: float
) -> jax.Array:
  """Keras's moving-average step ``moving - (moving - value) * (1 - momentum)``.

  Algebraically ``moving * momentum + value * (1 - momentum)``; the assign-sub form is the one
  Keras evaluates, so it is reproduced to the last ulp. There is no zero-debiasing.

  Args:
    moving: the current moving statistic.
    value: the new batch statistic.
    momentum: weight of the old value, in [0, 1].

  Returns:
    The updated statistic, in ``moving``'s dtype.
  """
  moving = jnp.asarray(moving)
  decay = jnp.asarray(1.0 - momentum, moving.dtype)
  return moving - (moving - jnp.asarray(value).astype(moving.dtype)) * decay


def update_moving_average_keras3(
  moving: jax.typing.ArrayLike, value: jax.typing.ArrayLike, momentum: float
) -> jax.Array:
  """Keras 3's moving-average step ``moving * momentum + value * (1 - momentum)``.

  The same average as `update_moving_average`, evaluated as Keras 3 writes it (both factors
  rounded from Python floats), so it rounds as Keras 3 does.
  """
  moving = jnp.asarray(moving)
  keep = jnp.asarray(momentum, moving.dtype)
  take = jnp.asarray(1.0 - momentum, moving.dtype)
  return moving * keep + jnp.asarray(value).astype(moving.dtype) * take


def update_moving_average_torch(
  moving: jax.typing.ArrayLike, value: jax.typing.ArrayLike, factor: jax.typing.ArrayLike
) -> jax.Array:
  """PyTorch's running-statistic step ``factor * value + (1 - factor) * moving``.

  Args:
    moving: the running statistic.
    value: the batch statistic (PyTorch's running variance takes the unbiased one).
    factor: PyTorch's ``momentum``, the weight of the *new* value (``1 - momentum`` in the
      Keras convention); traced for the cumulative average ``1 / num_batches_tracked``.

  Returns:
    The updated statistic, in ``moving``'s dtype.
  """
  moving = jnp.asarray(moving)
  factor = jnp.asarray(factor, moving.dtype)
  return factor * jnp.asarray(value).astype(moving.dtype) + (1 - factor) * moving


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
    The normalized array, in ``x``'s dtype.
  """
  x = jnp.asarray(x)
  dtype = x.dtype
  variance = jnp.asarray(variance).astype(dtype)
  mean = jnp.asarray(mean).astype(dtype)
  inv = jnp.reciprocal(jnp.sqrt(variance + jnp.asarray(epsilon, dtype)))
  if scale is not None:
    inv = inv * jnp.asarray(scale).astype(dtype)
  offset = None if offset is None else jnp.asarray(offset).astype(dtype)
  # The barrier computes the (small) statistics-shaped factors once, before the pass over `x`;
  # without it XLA:CPU fuses the square root and division into that pass, once per element.
  if subtract_mean_first:
    mean, inv, offset = lax.optimization_barrier((mean, inv, offset))
    y = (x - mean) * inv
    return y if offset is None else y + offset
  shift = -mean * inv if offset is None else offset - mean * inv
  inv, shift = lax.optimization_barrier((inv, shift))
  return x * inv + shift


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
