"""The regime of a training call (`kbn_jax._layer._plan`), decided from shapes alone, and the
per-example call under `jax.vmap` that must give the batched call's numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kbn_jax import _layer, _variables, functional


def _plan(shape, *, devices=1, axis_name=None, groups=None, fused=False, **config):
  config = functional.BatchNormConfig(**config)
  axes = _variables.feature_axes(config, len(shape))
  return _layer._plan(config, shape, axes, fused, axis_name, groups, devices)


def test_a_ghost_batch_spanning_devices_reduces_over_device_groups():
  # Rank 4, ghost batch 16, 8 devices with 4 examples each: groups of 4 devices share one
  # ghost batch, and the moving averages move toward the mean over the 2 groups.
  plan = _plan((4, 5, 5, 3), devices=8, axis_name="d", virtual_batch_size=16)
  assert plan.regime == "ghost_spanning_devices"
  assert plan.group_size == 4
  assert plan.ghost_size is None and plan.reduction_axes == (0, 1, 2)


@pytest.mark.parametrize(
  "shape, kwargs, regime, ghost_size, reduction_axes, collective",
  [
    ((8, 3), {}, "local", None, (0,), None),
    ((8, 3), {"axis_name": "d", "devices": 4}, "synced", None, (0,), "d"),
    ((8, 3), {"virtual_batch_size": 4}, "ghost", 4, (0,), None),
    (
      (8, 3),
      {"virtual_batch_size": 4, "axis_name": "d", "devices": 2},
      "ghost_per_device",
      4,
      (0,),
      None,
    ),
    (
      (8, 3),
      {"virtual_batch_size": 4, "axis_name": "d", "devices": 2, "ghost_batch_scope": "global"},
      "ghost_global",
      2,
      (0,),
      "d",
    ),
    ((8, 6, 6, 3), {"virtual_batch_size": 2}, "ghost", 2, (0, 2, 3), None),
  ],
)
def test_each_regime_is_named_with_its_reduction(
  shape, kwargs, regime, ghost_size, reduction_axes, collective
):
  config_kwargs = {k: v for k, v in kwargs.items() if k not in ("axis_name", "devices")}
  plan = _plan(
    shape, devices=kwargs.get("devices", 1), axis_name=kwargs.get("axis_name"), **config_kwargs
  )
  assert (plan.regime, plan.ghost_size, plan.reduction_axes) == (regime, ghost_size, reduction_axes)
  assert plan.moments_axis_name == collective
  assert plan.target_pmean == (regime == "ghost_per_device")


@pytest.mark.parametrize(
  "semantics, fused, expected",
  [
    ("keras_v1", True, 8 * 4 * 4 * 3),
    ("keras_v1", False, None),
    ("keras3", True, None),
    ("torch", False, 8 * 4 * 4 * 3),
  ],
)
def test_bessel_count_covers_every_device(semantics, fused, expected):
  plan = _plan((8, 4, 4, 2), devices=3, axis_name="d", fused=fused, semantics=semantics)
  assert plan.bessel_count == expected


def test_plan_errors_name_the_layout():
  with pytest.raises(ValueError, match="must divide the batch size 10"):
    _plan((10, 3), virtual_batch_size=4)
  with pytest.raises(ValueError, match="multiple of the 3 devices"):
    _plan((8, 3), devices=3, axis_name="d", virtual_batch_size=4, ghost_batch_scope="global")


def _reference_moving_variance(x, axes, momentum, bessel):
  """Float64 NumPy: Keras's moving variance after one step from 1."""
  x = np.asarray(x, np.float64)
  reduced = tuple(a for a in range(x.ndim) if a not in axes)
  variance = x.var(axis=reduced)
  n = x.size // variance.size
  if bessel:
    variance = variance * n / (n - 1)
  return 1.0 - (1.0 - variance) * (1 - momentum)


@pytest.mark.parametrize(
  "semantics, bessel", [("keras_v1", True), ("keras_v2", True), ("keras3", False), ("torch", True)]
)
def test_per_example_under_vmap_equals_the_batched_call(semantics, bessel):
  # NCHW conv activations: per example the input has rank 3, but Keras's fused rule (and its
  # Bessel correction) must see the batch's rank 4.
  x = jax.random.normal(jax.random.key(0), (8, 3, 4, 4)) * 1.3 + 0.2
  batched = functional.BatchNormConfig(axis=1, momentum=0.5, semantics=semantics)
  per_example = batched.replace(axis=0)
  params, stats = functional.init_variables(batched, jax.random.key(1), x.shape)

  def loss_and_stats(config, x, params, **kwargs):
    y, new = functional.batch_normalization(x, params, stats, config, training=True, **kwargs)
    return jnp.sum(jnp.sin(y)), new

  def example(x, params):
    return loss_and_stats(per_example, x, params, axis_name="b", per_example=True)

  def mapped(x, params):
    losses, new = jax.vmap(example, in_axes=(0, None), out_axes=(0, None), axis_name="b")(x, params)
    return jnp.sum(losses), new

  (loss_b, stats_b), grads_b = jax.value_and_grad(
    lambda x, p: loss_and_stats(batched, x, p), argnums=(0, 1), has_aux=True
  )(x, params)
  (loss_e, stats_e), grads_e = jax.value_and_grad(mapped, argnums=(0, 1), has_aux=True)(x, params)
  np.testing.assert_allclose(loss_e, loss_b, rtol=1e-5)
  for a, b in zip(
    jax.tree.leaves((grads_e, stats_e)), jax.tree.leaves((grads_b, stats_b)), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  expected = _reference_moving_variance(x, (1,), 0.5, bessel)
  np.testing.assert_allclose(stats_e["moving_variance"], expected, rtol=1e-5)


def test_per_example_needs_the_vmap_axis_name():
  config = functional.BatchNormConfig()
  params, stats = functional.init_variables(config, jax.random.key(0), (4, 3))
  with pytest.raises(ValueError, match="per_example=True.*axis_name"):
    functional.batch_normalization(
      jnp.ones(3), params, stats, config, training=True, per_example=True
    )


def test_ghost_batches_are_strided():
  x = jnp.arange(8.0)[:, None]
  ghost = functional.split_ghost_batches(x, 2)
  assert ghost.shape == (2, 4, 1)
  np.testing.assert_array_equal(ghost[:, 0, 0], [0.0, 4.0])  # sub-batch 0 = samples {0, 4}
  np.testing.assert_array_equal(functional.merge_ghost_batches(ghost), x)
