"""The linen Module: variables, training vs inference, V1 semantics, dtypes, compilation."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kbn_jax


def _train(layer, variables, x, **kwargs):
  y, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"], **kwargs)
  return y, {**variables, **updates}


@pytest.mark.parametrize(
  "kwargs, shape, params, stats, feature_shape",
  [
    ({}, (4, 3), {"gamma", "beta"}, {"moving_mean", "moving_variance"}, (3,)),
    ({"center": False}, (4, 3), {"gamma"}, {"moving_mean", "moving_variance"}, (3,)),
    ({"scale": False, "center": False}, (4, 3), set(), {"moving_mean", "moving_variance"}, (3,)),
    (
      {"renorm": True},
      (4, 3),
      {"gamma", "beta"},
      {"moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"},
      (3,),
    ),
    ({"axis": [1, 3]}, (2, 3, 4, 5), {"gamma", "beta"}, {"moving_mean", "moving_variance"}, (3, 5)),
    (
      {"axis": 1, "virtual_batch_size": 2},
      (4, 3, 5),
      {"gamma", "beta"},
      {"moving_mean", "moving_variance"},
      (3,),
    ),
  ],
)
def test_variables(kwargs, shape, params, stats, feature_shape):
  variables = kbn_jax.BatchNormalization(**kwargs).init(jax.random.key(0), jnp.ones(shape))
  assert set(variables.get("params", {})) == params
  assert set(variables["batch_stats"]) == stats
  for collection in variables.values():
    for value in collection.values():
      assert value.shape == feature_shape
      assert value.dtype == jnp.float32


def test_initial_values_follow_keras():
  layer = kbn_jax.BatchNormalization(
    renorm=True,
    moving_variance_initializer={"class_name": "Constant", "config": {"value": 4.0}},
    moving_mean_initializer={"class_name": "Constant", "config": {"value": 0.5}},
  )
  stats = layer.init(jax.random.key(0), jnp.ones((2, 3)))["batch_stats"]
  np.testing.assert_array_equal(stats["moving_variance"], [4.0] * 3)
  np.testing.assert_array_equal(stats["moving_stddev"], [2.0] * 3)  # sqrt(init), not +eps
  np.testing.assert_array_equal(stats["renorm_stddev"], [2.0] * 3)
  np.testing.assert_array_equal(stats["renorm_mean"], [0.5] * 3)


def test_init_does_not_update_and_training_defaults_to_false(rng):
  layer = kbn_jax.BatchNormalization()
  x = jnp.asarray(rng.normal(size=(8, 3)) * 5 + 2, jnp.float32)
  variables = layer.init(jax.random.key(0), x, training=True)
  np.testing.assert_array_equal(variables["batch_stats"]["moving_mean"], np.zeros(3))
  y = layer.apply(variables, x)  # inference: moving statistics
  np.testing.assert_allclose(y, np.asarray(x) / np.sqrt(1 + 1e-3), rtol=1e-6)


def test_training_normalizes_with_batch_statistics_and_updates(rng):
  layer = kbn_jax.BatchNormalization(momentum=0.8, epsilon=1e-2)
  x = rng.normal(size=(16, 4)) * 3 + 1
  variables = layer.init(jax.random.key(0), jnp.float32(x))
  y, variables = _train(layer, variables, jnp.float32(x))
  np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-2), atol=1e-5)
  stats = variables["batch_stats"]
  np.testing.assert_allclose(stats["moving_mean"], 0.2 * x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats["moving_variance"], 0.8 + 0.2 * x.var(0), rtol=1e-5)


def test_training_requires_mutable_batch_stats():
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), jnp.ones((4, 2)))
  with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
    layer.apply(variables, jnp.ones((4, 2)), training=True)


def test_trainable_false_keeps_statistics_but_gradients_flow(rng):
  layer = kbn_jax.BatchNormalization(trainable=False)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  variables = layer.init(jax.random.key(0), x)
  y, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  assert updates.get("batch_stats", variables["batch_stats"]) == variables["batch_stats"]
  np.testing.assert_allclose(np.asarray(y).mean(0), 0.0, atol=1e-5)  # batch statistics
  grads = jax.grad(
    lambda p: jnp.sum(layer.apply({**variables, "params": p}, x, training=True) * x)
  )(variables["params"])
  assert float(jnp.abs(grads["gamma"]).sum()) > 0  # Keras computes them; an optimizer mask skips


def test_moving_statistics_after_several_steps_match_numpy(rng):
  layer = kbn_jax.BatchNormalization(axis=1, momentum=0.7, fused=None)
  variables = layer.init(jax.random.key(0), jnp.ones((4, 3, 5, 5)))  # fused (NCHW): Bessel
  mean, variance = np.zeros(3), np.ones(3)
  step = jax.jit(lambda v, x: _train(layer, v, x)[1])
  for i in range(3):
    x = rng.normal(size=(4, 3, 5, 5)) * (i + 1) + i
    variables = step(variables, jnp.float32(x))
    n = 4 * 25
    mean = mean - (mean - x.mean((0, 2, 3))) * 0.3
    variance = variance - (variance - x.var((0, 2, 3)) * n / (n - 1)) * 0.3
  np.testing.assert_allclose(variables["batch_stats"]["moving_mean"], mean, rtol=1e-5)
  np.testing.assert_allclose(variables["batch_stats"]["moving_variance"], variance, rtol=1e-5)


@pytest.mark.parametrize(
  "shape, kwargs, fused",
  [
    ((2, 3, 4, 5), {}, True),
    ((2, 3, 4, 5), {"axis": 1}, True),
    ((2, 3, 4, 5), {"axis": -3}, True),
    ((2, 3, 4, 5), {"axis": 2}, False),
    ((2, 3, 4, 5), {"axis": 0}, False),
    ((2, 3, 4, 5, 6), {"axis": 4}, True),
    ((2, 3, 4, 5, 6), {"axis": 1}, True),
    ((2, 3, 4, 5, 6), {"axis": 3}, False),
    ((2, 3), {"fused": True}, False),
    ((2, 3, 4, 5), {"fused": False}, False),
    ((2, 3, 4, 5), {"renorm": True, "fused": True}, False),
    ((2, 3, 4, 5), {"axis": [1, 3]}, False),
    ((2, 3, 4, 6), {"adjustment": lambda shape: (jnp.ones(6), jnp.zeros(6))}, False),
  ],
)
def test_fused_resolution_follows_v1(shape, kwargs, fused):
  """Only fused layers feed the Bessel-corrected variance to the moving average."""
  layer = kbn_jax.BatchNormalization(momentum=0.0, **kwargs)
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  _, variables = _train(layer, layer.init(jax.random.key(0), x), x)
  feature_axes = [a % len(shape) for a in np.atleast_1d(kwargs.get("axis", -1))]
  reduce = tuple(a for a in range(len(shape)) if a not in feature_axes)
  n = int(np.prod([shape[a] for a in reduce]))
  biased = x.astype(np.float64).var(reduce)
  expected = biased * n / (n - 1) if fused else biased
  np.testing.assert_allclose(
    variables["batch_stats"]["moving_variance"].ravel(), expected.ravel(), rtol=1e-5, atol=1e-7
  )


def test_mask_on_fused_layer_is_ignored_with_a_warning():
  layer = kbn_jax.BatchNormalization()
  x = jnp.ones((2, 3, 3, 2))
  variables = layer.init(jax.random.key(0), x)
  with pytest.warns(UserWarning, match="Masking is not supported with `fused=True`"):
    _train(layer, variables, x, mask=jnp.zeros((2, 3, 3)))


def test_adjustment_receives_an_rng_when_it_asks():
  def adjustment(shape, key):
    return jax.random.uniform(key, shape[-1:], minval=0.5, maxval=1.5), jnp.zeros(shape[-1:])

  layer = kbn_jax.BatchNormalization(adjustment=adjustment)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
  variables = layer.init(jax.random.key(0), x)
  y1, _ = _train(layer, variables, x, rngs={"adjustment": jax.random.key(1)})
  y2, _ = _train(layer, variables, x, rngs={"adjustment": jax.random.key(2)})
  y1_again, _ = _train(layer, variables, x, rngs={"adjustment": jax.random.key(1)})
  np.testing.assert_array_equal(y1, y1_again)
  assert not np.allclose(y1, y2)
  # Adjustment applies in training only.
  np.testing.assert_allclose(layer.apply(variables, x), np.asarray(x) / np.sqrt(1.001), rtol=1e-6)


def test_per_call_renorm_clipping_compiles_once(rng):
  layer = kbn_jax.BatchNormalization(renorm=True, renorm_momentum=0.5)
  x = jnp.asarray(rng.normal(size=(8, 2)) * 4 + 3, jnp.float32)
  variables = layer.init(jax.random.key(0), x)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(variables, rmax, dmax):
    clipping = {"rmax": rmax, "rmin": 1 / rmax, "dmax": dmax}
    return _train(layer, variables, x, renorm_clipping=clipping)

  for rmax, dmax in ((1.0, 0.0), (1.5, 1.0), (3.0, 5.0)):
    y, _ = step(variables, jnp.float32(rmax), jnp.float32(dmax))
    static = layer.clone(renorm_clipping={"rmax": rmax, "rmin": 1 / rmax, "dmax": dmax})
    expected, _ = _train(static, variables, x)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_jitted_train_step_compiles_once_and_training_is_static(rng):
  layer = kbn_jax.BatchNormalization()
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  variables = layer.init(jax.random.key(0), x)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(variables, x):
    return _train(layer, variables, x)[1]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def predict(variables, x):
    return layer.apply(variables, x)

  for _ in range(3):
    variables = train_step(variables, x)
    predict(variables, x)


@pytest.mark.parametrize(
  "input_dtype, param_dtype, dtype",
  list(
    itertools.product(
      [jnp.float16, jnp.bfloat16, jnp.float32], [jnp.float32, jnp.bfloat16], [None, jnp.bfloat16]
    )
  ),
)
def test_dtype_policy(input_dtype, param_dtype, dtype, rng):
  layer = kbn_jax.BatchNormalization(dtype=dtype, param_dtype=param_dtype, momentum=0.5)
  x64 = rng.normal(size=(16, 4)) * 3 + 100
  x = jnp.asarray(x64, input_dtype)
  variables = layer.init(jax.random.key(0), x)
  assert variables["params"]["gamma"].dtype == param_dtype
  assert variables["batch_stats"]["moving_mean"].dtype == jnp.float32
  y, variables = _train(layer, variables, x)
  with jax.numpy_dtype_promotion("standard"):
    expected_dtype = dtype or jnp.promote_types(input_dtype, param_dtype)
  assert y.dtype == expected_dtype
  y_inference = layer.apply(variables, x)
  assert y_inference.dtype == expected_dtype
  # Statistics are reduced in float32 from the (possibly rounded) input.
  seen = np.asarray(x.astype(dtype or input_dtype).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(variables["batch_stats"]["moving_mean"], 0.5 * seen.mean(0), rtol=1e-5)
  np.testing.assert_allclose(
    variables["batch_stats"]["moving_variance"], 0.5 + 0.5 * seen.var(0), rtol=1e-4
  )
  expected = (seen - seen.mean(0)) / np.sqrt(seen.var(0) + 1e-3)
  tolerance = 2e-2 if jnp.bfloat16 in (input_dtype, param_dtype, dtype) else 5e-3
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=tolerance * 4)


def test_integer_input_is_cast_to_float():
  layer = kbn_jax.BatchNormalization()
  x = jnp.arange(8, dtype=jnp.int32).reshape(4, 2)
  variables = layer.init(jax.random.key(0), x)
  y, _ = _train(layer, variables, x)
  assert y.dtype == jnp.float32
  expected = np.arange(8.0).reshape(4, 2)
  np.testing.assert_allclose(
    y, (expected - expected.mean(0)) / np.sqrt(expected.var(0) + 1e-3), rtol=1e-5
  )


def test_empty_batch_leaves_statistics_unchanged():
  layer = kbn_jax.BatchNormalization(renorm=True)
  variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
  y, updated = _train(layer, variables, jnp.ones((0, 3)))
  assert y.shape == (0, 3)
  chex.assert_trees_all_equal(updated["batch_stats"], variables["batch_stats"])


def test_regularizer_penalties_are_sown_when_losses_is_mutable():
  layer = kbn_jax.BatchNormalization(
    gamma_regularizer={"class_name": "L2", "config": {"l2": 0.5}}, beta_regularizer="l1"
  )
  x = jnp.ones((4, 2))
  variables = layer.init(jax.random.key(0), x)
  variables = {
    **variables,
    "params": {"gamma": jnp.asarray([1.0, 2.0]), "beta": jnp.asarray([-3.0, 1.0])},
  }
  _, updates = layer.apply(variables, x, training=True, mutable=["batch_stats", "losses"])
  gamma_penalty = updates["losses"]["gamma_regularizer"]
  beta_penalty = updates["losses"]["beta_regularizer"]
  np.testing.assert_allclose(gamma_penalty, 0.5 * (1 + 4), rtol=1e-6)  # Keras: no 1/2
  np.testing.assert_allclose(beta_penalty, 0.01 * (3 + 1), rtol=1e-6)


def test_initializers_are_called_with_keras_parameter_shape():
  shapes = []

  def init(key, shape, dtype):
    shapes.append(tuple(shape))
    return jnp.ones(shape, dtype)

  kbn_jax.BatchNormalization(axis=[1, 3], gamma_initializer=init).init(
    jax.random.key(0), jnp.ones((2, 3, 4, 5))
  )
  assert shapes == [(1, 3, 1, 5)]


@pytest.mark.parametrize("training", [None, 0, np.False_])
def test_keras_inference_spellings_of_training(training, rng):
  """Keras resolves ``training=None`` to the learning phase, inference (0) in TF2."""
  layer = kbn_jax.BatchNormalization()
  x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  variables = layer.init(jax.random.key(0), x)
  np.testing.assert_allclose(
    layer.apply(variables, x, training=training), np.asarray(x) / np.sqrt(1 + 1e-3), rtol=1e-6
  )


def test_module_with_list_and_dict_arguments_is_hashable():
  """Modules must hash to be static arguments of `jax.jit`; lists and dicts are frozen."""
  kwargs = dict(
    axis=[1, 2],
    renorm=True,
    renorm_clipping={"rmax": 2.0},
    gamma_initializer={"class_name": "Constant", "config": {"value": 2.0}},
  )
  layer = kbn_jax.BatchNormalization(**kwargs)
  assert hash(layer) == hash(kbn_jax.BatchNormalization(**kwargs))
  x = jnp.ones((4, 3, 5))
  variables = layer.init(jax.random.key(0), x)
  y = jax.jit(lambda module, v, x: module.apply(v, x), static_argnums=0)(layer, variables, x)
  np.testing.assert_allclose(y, 2.0 / np.sqrt(1 + 1e-3) * np.ones((4, 3, 5)), rtol=1e-6)


@pytest.mark.parametrize(
  "policy, dtype", [("mixed_float16", jnp.float16), ("bfloat16", jnp.bfloat16)]
)
def test_keras_dtype_policies(policy, dtype):
  layer = kbn_jax.BatchNormalization(dtype=policy)
  x = jnp.arange(8.0).reshape(4, 2)
  variables = layer.init(jax.random.key(0), x)
  assert variables["params"]["gamma"].dtype == jnp.float32  # variables stay float32
  y, _ = _train(layer, variables, x)
  assert y.dtype == dtype


@pytest.mark.parametrize(
  "argument, value", [("dtype", "foo"), ("dtype", jnp.int32), ("param_dtype", "mixed_float16")]
)
def test_bad_dtypes_are_rejected(argument, value):
  with pytest.raises(TypeError, match=rf"`{argument}`=.* is not a floating dtype"):
    kbn_jax.BatchNormalization(**{argument: value})
