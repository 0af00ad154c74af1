"""The Flax NNX front-end: Keras V1 parity, equality with linen, modes, errors.

The 78 tf_keras V1 fixtures are replayed through `kbn_jax.nnx.BatchNormalization` (outputs,
every statistic after every step, gradients with respect to input, gamma and beta, inference),
and a few cases are compared with the linen Module bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kbn_jax
import kbn_jax.nnx
from tests.keras_parity import test_parity
from tests.keras_parity.cases import CASES


def _nnx_layer(name):
  meta, arrays = test_parity.load_case(name)
  linen = test_parity.build_layer(meta, arrays)
  variables = test_parity.initial_variables(linen, meta, arrays)
  return meta, arrays, linen, variables, kbn_jax.nnx.BatchNormalization.from_linen(linen, variables)


def _replay(name):
  """Runs one case through NNX; returns per-step results for comparison."""
  meta, arrays, _, _, layer = _nnx_layer(name)
  mask = jnp.asarray(arrays["mask"]) if "mask" in arrays else None

  @nnx.jit
  def step(layer, x, dy):
    def loss(layer, x):
      y = layer(x, training=True, mask=mask)
      return jnp.sum(y.astype(jnp.float32) * dy), y

    grads, y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
    return y, grads

  results = []
  for k in range(meta["case"]["steps"]):
    y, (grad_layer, grad_x) = step(
      layer, jnp.asarray(arrays[f"x_{k}"]), jnp.asarray(arrays[f"dy_{k}"])
    )
    stats = layer.linen_variables()["batch_stats"]
    grads = {n: getattr(grad_layer, n)[...] for n in ("gamma", "beta") if hasattr(grad_layer, n)}
    results.append((y, grad_x, grads, stats))
  layer.eval()
  y_infer = layer(jnp.asarray(arrays["x_infer"]))
  return meta, arrays, results, y_infer


@pytest.mark.parametrize("name", [case["name"] for case in CASES])
def test_nnx_matches_keras_v1(name):
  meta, arrays, results, y_infer = _replay(name)
  tolerance = test_parity._tolerance(meta["compute_dtype"], meta["case"])

  def close(actual, expected, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    error = np.max(np.abs(actual.reshape(expected.shape) - expected) / np.maximum(abs(expected), 1))
    assert error <= tolerance, f"{name}: {what} off by {error:.3g}"

  for k, (y, grad_x, grads, stats) in enumerate(results):
    close(y, arrays[f"y_{k}"], f"output {k}")
    close(grad_x, arrays[f"grad_x_{k}"], f"grad_x {k}")
    for weight, value in grads.items():
      close(value, arrays[f"grad_{weight}_{k}"], f"grad_{weight} {k}")
    for weight in meta["weight_names"]:
      if weight not in ("gamma", "beta"):
        close(stats[weight], arrays[f"w{k + 1}_{weight}"], f"{weight} after {k}")
  close(y_infer, arrays["y_infer"], "inference")


@pytest.mark.parametrize(
  "name", ["r2_default", "r4_nhwc_fused", "r2_renorm_all_clips", "r2_ghost", "r3_mask"]
)
def test_nnx_equals_linen_exactly(name):
  if name not in {case["name"] for case in CASES}:
    pytest.fail(f"unknown case {name}")
  meta, arrays, linen, variables, layer = _nnx_layer(name)
  x = jnp.asarray(arrays["x_0"])
  y_linen, updates = jax.jit(
    lambda v, x: linen.apply(v, x, training=True, mutable=["batch_stats"])
  )(variables, x)
  y_nnx = nnx.jit(lambda m, x: m(x, training=True))(layer, x)
  np.testing.assert_array_equal(y_nnx, y_linen)
  for stat, value in updates["batch_stats"].items():
    np.testing.assert_array_equal(getattr(layer, stat)[...], value)


def test_modes_follow_train_eval_and_view():
  layer = kbn_jax.nnx.BatchNormalization(3, momentum=0.5, rngs=nnx.Rngs(0))
  x = jnp.arange(12.0).reshape(4, 3)
  assert layer.use_running_average is False  # training by default, as nnx.BatchNorm
  layer(x)
  moved = layer.moving_mean[...]
  np.testing.assert_allclose(moved, 0.5 * x.mean(0), rtol=1e-6)
  layer.eval()
  y_eval = layer(x)
  np.testing.assert_array_equal(layer.moving_mean[...], moved)
  expected = (x - moved[None]) / jnp.sqrt(layer.moving_variance[...][None] + 1e-3)
  np.testing.assert_allclose(y_eval, expected, rtol=1e-6)
  layer.train()
  layer(x, training=False)  # the call overrides the mode
  np.testing.assert_array_equal(layer.moving_mean[...], moved)
  eval_view = nnx.view(layer, use_running_average=True)
  eval_view(x)
  np.testing.assert_array_equal(layer.moving_mean[...], moved)


def test_optimizer_trains_only_params():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.bn = kbn_jax.nnx.BatchNormalization(4, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.dense(x))

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (8, 3))

  @nnx.jit
  def step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, x)) for _ in range(5)]
  assert losses[-1] < losses[0]
  assert not np.allclose(model.bn.moving_mean[...], 0.0)


def test_interop_with_keras_weights_and_config():
  config = {"axis": -1, "momentum": 0.9, "epsilon": 1e-3, "renorm": True}
  layer = kbn_jax.nnx.BatchNormalization.from_keras_config(config, num_features=3, rngs=nnx.Rngs(0))
  assert layer.renorm and layer.momentum == 0.9
  weights = [np.full(3, float(i + 1)) for i in range(7)]
  variables = kbn_jax.keras_compat.variables_from_keras(layer, weights, (None, 3))
  layer.load_variables(variables)
  back = kbn_jax.keras_compat.keras_weights_from_variables(layer, layer.linen_variables())
  for value, expected in zip(back, weights, strict=True):
    np.testing.assert_array_equal(value, expected)
  assert layer.to_keras_config()["renorm"] is True


def test_errors_speak_nnx():
  layer = kbn_jax.nnx.BatchNormalization(3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"Construct the layer with `num_features`"):
    layer(jnp.ones((4, 5)))
  with pytest.raises(TypeError, match=r"model\.train\(\)"):
    nnx.jit(lambda m, x, t: m(x, training=t))(layer, jnp.ones((4, 3)), True)
  synced = kbn_jax.nnx.BatchNormalization(3, axis_name="data", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"nnx\.shard_map"):
    synced(jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"`num_features`=\(3, 4\) gives 2 size"):
    kbn_jax.nnx.BatchNormalization((3, 4), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"Unknown arguments \['use_bias'\]"):
    kbn_jax.nnx.BatchNormalization(3, use_bias=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"`momentum`=2"):
    kbn_jax.nnx.BatchNormalization(3, momentum=2, rngs=nnx.Rngs(0))


def test_training_helpers_work_on_nnx_models():
  """Penalties, constraints and frozen layers (kbn_jax.training) with nnx.Optimizer."""

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.bn = kbn_jax.nnx.BatchNormalization(
        4, gamma_regularizer="l2", gamma_constraint="non_neg", rngs=rngs
      )
      self.frozen = kbn_jax.nnx.BatchNormalization(4, trainable=False, rngs=rngs)

    def __call__(self, x):
      return self.frozen(self.bn(self.dense(x))) * self.dense.kernel[0, 0]

  model = Model(nnx.Rngs(0))
  sites = kbn_jax.training.find_batch_norms(model)
  assert [site.path for site in sites] == [("bn",), ("frozen",)]
  penalty = kbn_jax.training.regularization_penalty(nnx.state(model, nnx.Param), sites)
  np.testing.assert_allclose(penalty, 0.01 * 4, rtol=1e-6)  # Keras's l2: 0.01 * sum(gamma**2)
  tx = kbn_jax.training.keras_optimizer(optax.sgd(5.0), sites)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  frozen_gamma = model.frozen.gamma[...]
  x = jax.random.normal(jax.random.key(1), (8, 3))

  @nnx.jit
  def step(model, optimizer):
    def loss(m):
      params = nnx.state(m, nnx.Param)
      return jnp.mean(m(x)) + 10 * kbn_jax.training.regularization_penalty(params, sites)

    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)

  for _ in range(3):
    step(model, optimizer)
  np.testing.assert_array_equal(model.frozen.gamma[...], frozen_gamma)  # frozen: untouched
  assert np.all(model.bn.gamma[...] >= 0)  # the non_neg constraint held after big steps
  assert not np.allclose(model.bn.gamma[...], 1.0)
