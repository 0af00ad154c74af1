"""The moving-average rules of Keras 2 (V1, V2), Keras 3 and PyTorch, and Keras's update order.

Each library moves its statistics toward the batch's with its own arithmetic (they round
differently), corrects the variance or not (Bessel's ``n / (n - 1)``), and orders renorm's
updates its own way; `update_statistics` applies one library's rules to a layer's statistics.

References:
  tf_keras ``BatchNormalizationBase._assign_moving_average`` and ``_renorm_correction_and_moments``
  (``tf_keras/src/layers/normalization/batch_normalization.py``); Keras 3
  ``keras/src/layers/normalization/batch_normalization.py``; PyTorch
  ``torch.nn.functional.batch_norm`` (``running_mean``, ``running_var``, ``num_batches_tracked``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def update_statistics(
  stats: Mapping[str, jax.Array],
  batch_mean: jax.Array,
  batch_variance: jax.Array,
  *,
  semantics: str,
  momentum: float | None,
  epsilon: float,
  renorm: bool,
  renorm_momentum: float,
  bessel_count: int | None,
) -> dict[str, jax.Array]:
  """One library's statistic updates: mean first, then (renorm's stddev and) the variance.

  Args:
    stats: the layer's statistics before the step (feature shape).
    batch_mean, batch_variance: the batch's (biased) moments the statistics move toward.
    semantics: ``"keras_v1"``, ``"keras_v2"``, ``"keras3"`` or ``"torch"``.
    momentum: weight of the old value (Keras's convention); None is PyTorch's cumulative average.
    epsilon: the layer's epsilon (renorm's standard deviations include it).
    renorm, renorm_momentum: Batch Renormalization and the momentum of its own statistics.
    bessel_count: elements per channel when the variance is Bessel-corrected, else None.

  Returns:
    The updated statistics (only the ones that change).
  """
  batch_mean = jax.lax.stop_gradient(batch_mean)
  batch_variance = jax.lax.stop_gradient(batch_variance)
  new = {}
  update = _RULES[semantics]
  if semantics == "torch":
    new["num_batches_tracked"] = stats["num_batches_tracked"] + 1
    # PyTorch's factor is the weight of the new value; None is the cumulative average.
    if momentum is None:
      momentum = 1 / new["num_batches_tracked"].astype(batch_mean.dtype)
    else:
      momentum = 1.0 - momentum
  new["moving_mean"] = update(stats["moving_mean"], batch_mean, momentum)
  eps = jnp.asarray(epsilon, batch_variance.dtype)
  if renorm:
    # Keras averages the stddev and overwrites the variance from it.
    stddev = jnp.sqrt(batch_variance + eps)
    new["moving_stddev"] = update(stats["moving_stddev"], stddev, momentum)
    new["moving_variance"] = jax.nn.relu(jnp.square(new["moving_stddev"]) - eps)
    new["renorm_mean"] = update(stats["renorm_mean"], batch_mean, renorm_momentum)
    new["renorm_stddev"] = update(stats["renorm_stddev"], stddev, renorm_momentum)
    return new
  if bessel_count is not None:
    batch_variance = bessel_correction(batch_variance, bessel_count)
  new["moving_variance"] = update(stats["moving_variance"], batch_variance, momentum)
  return new


def update_moving_average(
  moving: jax.typing.ArrayLike,
  value: jax.typing.ArrayLike,
  momentum: float,
  *,
  semantics: str = "keras_v1",
) -> jax.Array:
  """One moving-average step ``moving * momentum + value * (1 - momentum)``, as a library rounds it.

  Args:
    moving: the current moving statistic.
    value: the new batch statistic.
    momentum: weight of the old value, in [0, 1] (Keras's convention, in every semantics).
    semantics: whose arithmetic: ``"keras_v1"``/``"keras_v2"`` (Keras 2's assign-sub form),
      ``"keras3"`` or ``"torch"``.

  Returns:
    The updated statistic, in ``moving``'s dtype.
  """
  if semantics not in _RULES:
    raise ValueError(f"`semantics`={semantics!r} is not one of {list(_RULES)}.")
  if semantics == "torch":
    return _torch(moving, value, 1.0 - momentum)
  return _RULES[semantics](moving, value, momentum)


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


def _keras2(
  moving: jax.typing.ArrayLike, value: jax.typing.ArrayLike, momentum: float
) -> jax.Array:
  """Keras's moving-average step ``moving - (moving - value) * (1 - momentum)``.

  Algebraically the same average; the assign-sub form is the one
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


def _keras3(
  moving: jax.typing.ArrayLike, value: jax.typing.ArrayLike, momentum: float
) -> jax.Array:
  """Keras 3's moving-average step ``moving * momentum + value * (1 - momentum)``.

  The same average as `_keras2`, evaluated as Keras 3 writes it (both factors
  rounded from Python floats), so it rounds as Keras 3 does.
  """
  moving = jnp.asarray(moving)
  keep = jnp.asarray(momentum, moving.dtype)
  take = jnp.asarray(1.0 - momentum, moving.dtype)
  return moving * keep + jnp.asarray(value).astype(moving.dtype) * take


def _torch(
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


_RULES = {"keras_v1": _keras2, "keras_v2": _keras2, "keras3": _keras3, "torch": _torch}
