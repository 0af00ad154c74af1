"""The linen Module: variables, training vs inference, V1 semantics, dtypes, compilation."""

from __future__ import annotations

import functools
import itertools
import re

import chex
import flax.linen as nn
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


# Flax's mode idiom, variables, tabulate and the other linen tools
def _x(shape=(8, 3), seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(0.5, 2.0, shape), jnp.float32)


class _PartialNet(nn.Module):
  """The ``functools.partial(nn.BatchNorm, use_running_average=not train)`` idiom."""

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(kbn_jax.BatchNormalization, use_running_average=not train)
    x = nn.Dense(4)(x)
    x = norm(momentum=0.9)(x)
    return norm(momentum=0.9, name="second")(nn.relu(x))


_MISSING = r"`batch_stats` .*not found.*as `init` returned them"


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, training: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(kbn_jax.BatchNormalization(renorm=True)(x, training=training))
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(kbn_jax.BatchNormalization(virtual_batch_size=2)(x, training=training))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


_CONSOLE = {"width": 400, "force_terminal": False, "no_color": True}


def _table_rows(table: str) -> tuple[list[str], list[list[str]]]:
  """The header and the body lines of a rich table, as cells (the first line of each row holds
  its path and module)."""
  header, rows = [], []
  for line in table.splitlines():
    if line.startswith("┃"):
      header = [cell.strip() for cell in line.strip("┃").split("┃")]
    elif line.startswith("│"):
      rows.append([cell.strip() for cell in line.strip("│").split("│")])
  return header, rows


def test_partial_idiom_trains_and_infers():
  x = _x()
  model = _PartialNet()
  variables = model.init(jax.random.key(0), x, train=False)
  y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  stats = updates["batch_stats"]
  for name in ("BatchNormalization_0", "second"):
    assert not np.allclose(
      stats[name]["moving_mean"], variables["batch_stats"][name]["moving_mean"]
    )
  # Training normalizes with batch statistics: the last layer's output has batch mean ~beta = 0.
  np.testing.assert_allclose(jnp.mean(y, axis=0), 0.0, atol=1e-5)
  # Inference reads the moving statistics; nothing to mutate.
  y_infer = model.apply({**variables, "batch_stats": stats}, x, train=False)
  assert not np.allclose(y_infer, y, atol=1e-3)


def test_sequential_with_use_running_average_false_trains():
  x = _x((16, 5))
  model = nn.Sequential([nn.Dense(4), kbn_jax.BatchNormalization(use_running_average=False)])
  variables = model.init(jax.random.key(0), x)
  y, updates = model.apply(variables, x, mutable=["batch_stats"])
  hidden = nn.Dense(4).apply({"params": variables["params"]["layers_0"]}, x)
  stats = updates["batch_stats"]["layers_1"]
  np.testing.assert_allclose(stats["moving_mean"], 0.01 * jnp.mean(hidden, axis=0), rtol=1e-5)
  np.testing.assert_allclose(
    stats["moving_variance"], 0.99 + 0.01 * jnp.var(hidden, axis=0), rtol=1e-5
  )
  np.testing.assert_allclose(jnp.mean(y, axis=0), 0.0, atol=1e-5)


def test_sequential_with_use_running_average_true_is_inference():
  x = _x((16, 5))
  model = nn.Sequential([nn.Dense(4), kbn_jax.BatchNormalization(use_running_average=True)])
  variables = model.init(jax.random.key(0), x)
  y, updates = model.apply(variables, x, mutable=["batch_stats"])
  chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
  hidden = nn.Dense(4).apply({"params": variables["params"]["layers_0"]}, x)
  np.testing.assert_allclose(y, hidden / np.sqrt(1.0 + 1e-3), rtol=1e-6)


@pytest.mark.parametrize("use_running_average", [None, True, False])
@pytest.mark.parametrize("training", [None, True, False])
def test_call_training_against_the_attribute(use_running_average, training):
  """``training=None`` defers to the attribute; agreeing values work; contradicting raise."""
  x = _x()
  layer = kbn_jax.BatchNormalization(use_running_average=use_running_average, momentum=0.5)
  variables = layer.init(jax.random.key(0), x)
  contradicts = (
    training is not None and use_running_average is not None and training == use_running_average
  )
  if contradicts:
    with pytest.raises(ValueError, match="contradicts `use_running_average`"):
      layer.apply(variables, x, training=training, mutable=["batch_stats"])
    return
  _, updates = layer.apply(variables, x, training=training, mutable=["batch_stats"])
  if training is None:
    trains = use_running_average is False
  else:
    trains = training
  changed = not np.allclose(
    updates["batch_stats"]["moving_mean"], variables["batch_stats"]["moving_mean"]
  )
  assert changed == trains


def test_call_training_overrides_an_unset_attribute_per_call():
  x = _x()
  layer = kbn_jax.BatchNormalization(momentum=0.5)
  variables = layer.init(jax.random.key(0), x)
  y_train, _ = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  y_infer = layer.apply(variables, x, training=False)
  np.testing.assert_allclose(jnp.mean(y_train, axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y_infer, x / np.sqrt(1.0 + 1e-3), rtol=1e-6)


def test_bad_use_running_average_names_the_attribute():
  with pytest.raises((TypeError, ValueError), match="use_running_average"):
    kbn_jax.BatchNormalization(use_running_average="yes")


def test_forgotten_mode_with_mutable_batch_stats_raises():
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="No mode was given: pass `training=True`"):
    layer.apply(variables, x, mutable=["batch_stats"])
  with pytest.raises(ValueError, match="use_running_average"):
    layer.apply(variables, x, mutable=True)


def test_forgotten_mode_in_a_model_raises():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return kbn_jax.BatchNormalization()(nn.Dense(3)(x))

  x = _x()
  variables = Net().init(jax.random.key(0), x)  # init itself is fine
  with pytest.raises(ValueError, match="No mode was given"):
    Net().apply(variables, x, mutable=["batch_stats"])


def test_explicit_training_none_is_keras_inference():
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)
  y, updates = layer.apply(variables, x, training=None, mutable=["batch_stats"])
  chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(y, x / np.sqrt(1.0 + 1e-3), rtol=1e-6)


def test_no_mode_without_mutable_batch_stats_is_inference():
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)
  np.testing.assert_allclose(layer.apply(variables, x), x / np.sqrt(1.0 + 1e-3), rtol=1e-6)


@pytest.mark.parametrize("rngs", [None, "params"], ids=["no_rngs", "params_rng"])
@pytest.mark.parametrize("training", [True, False])
def test_missing_batch_stats_raises_and_never_reinitializes(rngs, training):
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)
  kwargs = {} if rngs is None else {"rngs": {"params": jax.random.key(1)}}
  with pytest.raises(ValueError, match=_MISSING):
    layer.apply(
      {"params": variables["params"]}, x, training=training, mutable=["batch_stats"], **kwargs
    )


def test_missing_batch_stats_in_a_model_names_the_layer():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, training=False):
      return kbn_jax.BatchNormalization(name="bn")(nn.Dense(3)(x), training=training)

  x = _x()
  variables = Net().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"`batch_stats` of BatchNormalization 'bn' not found"):
    Net().apply(
      {"params": variables["params"]},
      x,
      training=True,
      mutable=["batch_stats"],
      rngs={"params": jax.random.key(1)},
    )


def test_random_statistic_initializer_needs_no_key_at_apply():
  """A random moving-mean initializer draws at ``init`` only, never in a training apply."""
  x = _x()
  layer = kbn_jax.BatchNormalization(moving_mean_initializer="random_normal")
  variables = layer.init(jax.random.key(0), x)
  _, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  assert updates["batch_stats"]["moving_mean"].shape == (3,)
  with pytest.raises(ValueError, match=_MISSING):
    layer.apply(
      {"params": variables["params"]},
      x,
      training=True,
      mutable=["batch_stats"],
      rngs={"params": jax.random.key(1)},
    )


@pytest.mark.parametrize("training", [False, True])
def test_tabulate_with_show_repeated_and_flops(training):
  x = jnp.ones((4, 6, 6, 2), jnp.float32)
  table = _ConvNet().tabulate(
    jax.random.key(0),
    x,
    training=training,
    show_repeated=True,
    compute_flops=True,
    compute_vjp_flops=True,
    console_kwargs=_CONSOLE,
  )
  header, rows = _table_rows(table)
  path_col, module_col = header.index("path"), header.index("module")
  bn_rows = [r for r in rows if r[module_col] == "BatchNormalization"]
  assert [r[path_col] for r in bn_rows] == ["BatchNormalization_0", "BatchNormalization_1"]
  assert sum("BatchNormalization" in line for line in table.splitlines()) == 2, table
  for helper in ("_mode", "_variables", "_train", "nowrap"):
    assert helper not in table
  flops_col = header.index("flops")
  assert all(int(r[flops_col]) > 0 for r in bn_rows)
  assert "moving_mean" in table and "renorm_stddev" in table


def test_nn_tabulate_function():
  x = jnp.ones((4, 6, 6, 2), jnp.float32)
  tabulate = nn.tabulate(_ConvNet(), jax.random.key(0), show_repeated=True, console_kwargs=_CONSOLE)
  table = tabulate(x, training=True)
  assert len(re.findall(r"│ BatchNormalization_\d", table)) == 2, table


def test_module_paths_lists_only_the_layers():
  paths = _ConvNet().module_paths(jax.random.key(0), jnp.ones((4, 6, 6, 2), jnp.float32))
  assert list(paths) == [
    "",
    "Conv_0",
    "BatchNormalization_0",
    "Conv_1",
    "BatchNormalization_1",
    "Dense_0",
  ]
  assert isinstance(paths["BatchNormalization_0"], kbn_jax.BatchNormalization)


def test_eval_shape_of_init():
  x = jnp.ones((4, 6, 6, 2), jnp.float32)
  shapes = jax.eval_shape(_ConvNet().init, jax.random.key(0), x)
  variables = _ConvNet().init(jax.random.key(0), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, variables)
  stats = shapes["batch_stats"]["BatchNormalization_0"]
  assert set(stats) == {
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
  }
  chex.assert_shape(list(stats.values()), (4,))


def test_capture_intermediates_sees_the_layer_output():
  x = jnp.ones((4, 6, 6, 2), jnp.float32)
  variables = _ConvNet().init(jax.random.key(0), x)
  _, state = _ConvNet().apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  out = state["intermediates"]["BatchNormalization_1"]["__call__"][0]
  chex.assert_shape(out, (4, 6, 6, 4))
  assert set(state["intermediates"]["BatchNormalization_1"]) == {"__call__"}


def test_traced_training_error_names_both_static_arguments():
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)

  @jax.jit
  def step(variables, x, training):
    return layer.apply(variables, x, training=training, mutable=["batch_stats"])

  with pytest.raises(TypeError, match="static_argnames") as error:
    step(variables, x, True)
  assert "static_argnums" in str(error.value)
  assert "traced" in str(error.value)


def test_traced_training_error_of_the_pure_function():
  from kbn_jax import functional  # noqa: PLC0415

  config = functional.BatchNormConfig()
  x = _x()
  params, stats = functional.init_variables(config, jax.random.key(0), x.shape)
  step = jax.jit(
    lambda x, training: functional.batch_normalization(x, params, stats, config, training=training)
  )
  with pytest.raises(TypeError, match="static_argnames") as error:
    step(x, True)
  assert "static_argnums" in str(error.value)


@pytest.mark.parametrize("value", ["True", "False"])
def test_string_training_says_it_is_a_string(value):
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(TypeError, match=rf"`training`='{value}' must be a Python bool, not a string"):
    layer.apply(variables, x, training=value, mutable=["batch_stats"])


@pytest.mark.parametrize("semantics", ["keras_v2", "keras3"])
def test_frozen_layer_trains_as_inference(semantics):
  x = _x((8, 3))
  layer = kbn_jax.BatchNormalization(
    trainable=False,
    semantics=semantics,
    moving_mean_initializer={"class_name": "Constant", "config": {"value": 0.5}},
    moving_variance_initializer={"class_name": "Constant", "config": {"value": 2.0}},
    gamma_initializer={"class_name": "Constant", "config": {"value": 1.5}},
  )
  variables = layer.init(jax.random.key(0), x)
  y_train, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  y_infer = layer.apply(variables, x, training=False)
  chex.assert_trees_all_equal(y_train, y_infer)
  chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(y_infer, (x - 0.5) / np.sqrt(2.0 + 1e-3) * 1.5, rtol=1e-5)


def test_frozen_v1_layer_still_uses_batch_statistics():
  x = _x((8, 3))
  layer = kbn_jax.BatchNormalization(trainable=False)
  variables = layer.init(jax.random.key(0), x)
  y_train, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(jnp.mean(y_train, axis=0), 0.0, atol=1e-5)


def test_torch_cumulative_average_over_three_steps():
  """``momentum=None`` under ``semantics="torch"``: the running statistics are the plain means
  of the batch means and of the unbiased batch variances; ``num_batches_tracked`` counts."""
  layer = kbn_jax.BatchNormalization(semantics="torch", momentum=None, epsilon=1e-5)
  rng = np.random.default_rng(5)
  batches = [rng.normal(i, 1.0 + i, (6, 3)).astype(np.float32) for i in range(3)]
  variables = layer.init(jax.random.key(0), jnp.asarray(batches[0]))
  assert int(variables["batch_stats"]["num_batches_tracked"]) == 0
  step = jax.jit(
    lambda variables, x: layer.apply(variables, x, training=True, mutable=["batch_stats"])
  )
  for x in batches:
    _, updates = step(variables, jnp.asarray(x))
    variables = {**variables, **updates}
  stats = variables["batch_stats"]
  batches64 = [b.astype(np.float64) for b in batches]
  expected_mean = np.mean([b.mean(axis=0) for b in batches64], axis=0)
  expected_variance = np.mean([b.var(axis=0, ddof=1) for b in batches64], axis=0)
  np.testing.assert_allclose(stats["moving_mean"], expected_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["moving_variance"], expected_variance, rtol=1e-5)
  assert int(stats["num_batches_tracked"]) == 3
  assert jnp.issubdtype(stats["num_batches_tracked"].dtype, jnp.integer)
