"""From Flax's own batch norm: converted layers reproduce Flax's numbers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kbn_jax
import kbn_jax.nnx
from kbn_jax import flax_compat


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (8, 4, 4, 3)).astype(np.float32)
  return jnp.asarray(x)


def test_linen_batch_norm_checkpoint_carries_over():
  x = _data()
  flax_layer = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  flax_vars = flax_layer.init(jax.random.key(0), x)
  # A "trained" checkpoint: statistics and parameters away from their initial values.
  flax_vars = {
    "params": {"scale": jnp.arange(1.0, 4.0), "bias": jnp.array([0.5, -0.5, 1.0])},
    "batch_stats": {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([2.0, 3.0, 4.0])},
  }
  layer, variables = flax_compat.from_flax_batch_norm(flax_layer, flax_vars)
  with jax.numpy_dtype_promotion("standard"):
    y_flax, flax_updates = flax_layer.apply(flax_vars, x, mutable=["batch_stats"])
  y, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
  for theirs, ours in (("mean", "moving_mean"), ("var", "moving_variance")):
    np.testing.assert_allclose(
      updates["batch_stats"][ours], flax_updates["batch_stats"][theirs], rtol=1e-6
    )
  eval_flax = flax_layer.clone(use_running_average=True)
  y_eval = layer.apply(variables, x, training=False)
  with jax.numpy_dtype_promotion("standard"):
    np.testing.assert_allclose(y_eval, eval_flax.apply(flax_vars, x), rtol=1e-5, atol=1e-5)


def test_nnx_batch_norm_converts_to_both_front_ends():
  x = _data()
  flax_layer = nnx.BatchNorm(3, momentum=0.8, rngs=nnx.Rngs(0))
  with jax.numpy_dtype_promotion("standard"):
    flax_layer(x)  # one training step moves the statistics
  layer, variables = flax_compat.from_flax_batch_norm(flax_layer)
  converted = kbn_jax.nnx.BatchNormalization.from_linen(layer, variables)
  with jax.numpy_dtype_promotion("standard"):
    y_flax = flax_layer(x)
  y = converted(x)
  np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(converted.moving_variance[...], flax_layer.var[...], rtol=1e-6)


def test_rejects_other_layers():
  with pytest.raises(TypeError, match="flax.linen.BatchNorm or flax.nnx.BatchNorm"):
    flax_compat.from_flax_batch_norm(nn.Dense(3))
  with pytest.raises(TypeError, match="`variables` are needed"):
    flax_compat.from_flax_batch_norm(nn.BatchNorm())


def _linen_vars(**changes):
  variables = {
    "params": {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)},
    "batch_stats": {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)},
  }
  for key, value in changes.items():
    collection = "params" if key in ("scale", "bias") else "batch_stats"
    if value is None:
      del variables[collection][key]
    else:
      variables[collection][key] = value
  return variables


@pytest.mark.parametrize(
  ("changes", "error", "message"),
  [
    ({"var": np.ones(3, np.complex64)}, TypeError, r"'var' has dtype complex64.*real floating"),
    ({"mean": np.arange(3)}, TypeError, r"'mean' has dtype int64"),
    ({"scale": None}, ValueError, r"lack \['scale'\] \(use_scale=True"),
    ({"bias": None}, ValueError, r"lack \['bias'\]"),
    ({"var": np.ones(4, np.float32)}, ValueError, r"shapes differ.*'var': \(4,\)"),
    ({"var": np.ones(0, np.float32), "mean": np.ones(0, np.float32),
      "scale": np.ones(0, np.float32), "bias": np.ones(0, np.float32)},
     ValueError, r"shape \(0,\); a non-empty"),
  ],
)  # fmt: skip
def test_flax_variables_are_checked_at_load(changes, error, message):
  with pytest.raises(error, match=rf"Flax BatchNorm: .*{message}"):
    flax_compat.from_flax_batch_norm(nn.BatchNorm(), _linen_vars(**changes))


def test_flax_variables_without_scale_need_use_scale_false():
  variables = _linen_vars(scale=None)
  layer, converted = flax_compat.from_flax_batch_norm(nn.BatchNorm(use_scale=False), variables)
  assert not layer.scale and "gamma" not in converted["params"]
  with pytest.raises(ValueError, match=r"have \['scale'\], but the layer has use_scale=False"):
    flax_compat.from_flax_batch_norm(nn.BatchNorm(use_scale=False), _linen_vars())


def test_nnx_feature_count_is_checked():
  flax_layer = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  flax_layer.var = nnx.BatchStat(jnp.ones(4))
  flax_layer.mean = nnx.BatchStat(jnp.zeros(4))
  flax_layer.scale = nnx.Param(jnp.ones(4))
  flax_layer.bias = nnx.Param(jnp.zeros(4))
  with pytest.raises(ValueError, match=r"Flax BatchNorm: the variables have the shape \(4,\)"):
    flax_compat.from_flax_batch_norm(flax_layer)


def test_suspicious_flax_values_load_with_a_warning():
  variables = _linen_vars(var=np.array([1.0, -1.0, np.nan], np.float32))
  with pytest.warns(
    UserWarning, match=r"1 non-finite value in 'var', 1 negative value in 'var'; loaded as they"
  ):
    _, converted = flax_compat.from_flax_batch_norm(nn.BatchNorm(), variables)
  np.testing.assert_array_equal(converted["batch_stats"]["moving_variance"], [1.0, -1.0, np.nan])
