"""`kbn_jax.folding`: batch norm folded into the preceding Dense/Conv equals the unfolded model.

Expected values come from the float64 NumPy reference of the layer (`tests/reference.py`) and
from the invariant "folded model == unfolded model in inference".
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kbn_jax
from kbn_jax import folding
from tests import reference

TRANSFORMS = [lambda f: f, jax.jit]


def _random_variables(rng, features, *, center=True, scale=True, renorm=False):
  """Feature-shaped variables with non-trivial values (not the initializers' 0/1)."""
  state = {
    "moving_mean": rng.normal(0.5, 2.0, features),
    "moving_variance": rng.uniform(0.05, 4.0, features),
  }
  if scale:
    state["gamma"] = rng.normal(1.0, 0.5, features)
  if center:
    state["beta"] = rng.normal(0.0, 1.0, features)
  if renorm:
    state["moving_stddev"] = np.sqrt(state["moving_variance"] + 1e-3)
    state["renorm_mean"] = rng.normal(size=features)
    state["renorm_stddev"] = rng.uniform(0.5, 2.0, features)
  return state, reference.variables_from_state(state)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(("center", "scale"), [(True, True), (False, True), (True, False)])
def test_inference_affine_matches_float64_reference(rng, transform, center, scale):
  epsilon = 0.01
  layer = kbn_jax.BatchNormalization(epsilon=epsilon, center=center, scale=scale)
  state, variables = _random_variables(rng, (5,), center=center, scale=scale)
  scale_, shift = transform(lambda v: folding.inference_affine(layer, v))(variables)

  # x * a + b must be the layer's inference map; check it on the identity and zero inputs.
  x = np.concatenate([np.zeros((1, 5)), np.eye(5)])
  expected_y, _ = reference.keras_v1_reference(
    x, state, epsilon=epsilon, center=center, scale=scale
  )
  np.testing.assert_allclose(shift, expected_y[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(scale_, np.diag(expected_y[1:] - expected_y[0]), rtol=1e-5)
  assert scale_.dtype == shift.dtype == jnp.float32


def _linear_params(rng, kernel_shape, use_bias):
  """Parameters of ``nn.Dense``/``nn.Conv`` (kernel ``(..., in, out)``), drawn with NumPy."""
  params = {"kernel": jnp.asarray(rng.normal(0.0, 0.5, kernel_shape), jnp.float32)}
  if use_bias:
    params["bias"] = jnp.asarray(rng.normal(size=kernel_shape[-1]), jnp.float32)
  return params


def _train(layer, variables, rng, steps=3, shape=(16, 4)):
  """A few training steps so the moving statistics are the layer's own (e.g. renorm's)."""
  for _ in range(steps):
    x = jnp.asarray(rng.normal(1.0, 3.0, shape), jnp.float32)
    _, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
  return variables


BN_CONFIGS = {
  "default": {},
  "epsilon": {"epsilon": 0.5, "momentum": 0.5},
  "renorm": {"renorm": True, "momentum": 0.5, "renorm_clipping": {"rmax": 2.0, "dmax": 1.0}},
  "ghost": {"virtual_batch_size": 4, "momentum": 0.5},
  "no_center": {"center": False, "momentum": 0.5},
  "no_scale": {"scale": False, "momentum": 0.5},
}


@pytest.mark.parametrize("config", list(BN_CONFIGS), ids=list(BN_CONFIGS))
@pytest.mark.parametrize("use_bias", [True, False])
def test_folded_dense_equals_dense_then_batch_norm(rng, config, use_bias):
  layer = kbn_jax.BatchNormalization(**BN_CONFIGS[config])
  dense = nn.Dense(4, use_bias=use_bias)
  x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  dense_params = _linear_params(rng, (6, 4), use_bias)
  _, bn_variables = _random_variables(
    rng, (4,), center=layer.center, scale=layer.scale, renorm=layer.renorm
  )
  bn_variables = _train(layer, bn_variables, rng)

  folded = jax.jit(lambda p, v: folding.fold_batch_norm(p, layer, v))(dense_params, bn_variables)
  y_folded = nn.Dense(4, use_bias=True).apply({"params": folded}, x)
  y = layer.apply(bn_variables, dense.apply({"params": dense_params}, x))
  np.testing.assert_allclose(y_folded, y, rtol=1e-5, atol=1e-5)

  # And against float64: the dense layer in NumPy, then the reference layer in inference.
  u = np.asarray(x, np.float64) @ np.asarray(dense_params["kernel"], np.float64)
  if use_bias:
    u = u + np.asarray(dense_params["bias"], np.float64)
  expected, _ = reference.keras_v1_reference(
    u,
    reference.state_from_variables(bn_variables),
    epsilon=layer.epsilon,
    center=layer.center,
    scale=layer.scale,
  )
  np.testing.assert_allclose(y_folded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  ("kernel_size", "input_shape"),
  [((3, 3), (4, 6, 6, 3)), ((3,), (4, 7, 3))],
  ids=["conv2d_fused", "conv1d"],
)
@pytest.mark.parametrize("use_bias", [True, False])
def test_folded_conv_equals_conv_then_batch_norm(rng, kernel_size, input_shape, use_bias):
  # Rank 4 with axis=-1 takes Keras's fused inference form, rank 3 the non-fused one.
  layer = kbn_jax.BatchNormalization(momentum=0.5)
  conv = nn.Conv(5, kernel_size, use_bias=use_bias)
  x = jnp.asarray(rng.normal(size=input_shape), jnp.float32)
  conv_params = _linear_params(rng, (*kernel_size, input_shape[-1], 5), use_bias)
  u = conv.apply({"params": conv_params}, x)
  bn_variables = reference.variables_from_state(reference.initial_state((5,)))
  bn_variables = _train(layer, bn_variables, rng, shape=u.shape)

  folded = folding.fold_batch_norm(conv_params, layer, bn_variables)
  y_folded = nn.Conv(5, kernel_size, use_bias=True).apply({"params": folded}, x)
  y = layer.apply(bn_variables, u)
  assert not np.allclose(y, u, atol=1e-2), "the batch norm under test must not be the identity"
  np.testing.assert_allclose(y_folded, y, rtol=1e-5, atol=1e-5)


def test_fold_into_kernel_keeps_dtypes_and_other_entries():
  kernel = jnp.full((2, 3), 2.0, jnp.bfloat16)
  scale = jnp.asarray([1.0, 0.5, 2.0], jnp.float32)
  shift = jnp.asarray([1.0, -1.0, 0.0], jnp.float32)
  new_kernel, new_bias = folding.fold_into_kernel(kernel, None, scale, shift)
  assert new_kernel.dtype == new_bias.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(new_kernel, np.float32), [[2.0, 1.0, 4.0]] * 2)
  np.testing.assert_array_equal(np.asarray(new_bias, np.float32), [1.0, -1.0, 0.0])

  layer = kbn_jax.BatchNormalization()
  variables = reference.variables_from_state(reference.initial_state((3,)))
  params = {"kernel": jnp.ones((2, 3)), "extra": "kept"}
  folded = folding.fold_batch_norm(params, layer, variables)
  assert folded["extra"] == "kept" and set(folded) == {"kernel", "bias", "extra"}


def test_rejects_a_layer_that_is_not_batch_normalization():
  with pytest.raises(TypeError, match=r"`layer` must be a kbn_jax.BatchNormalization.*Dense"):
    folding.inference_affine(nn.Dense(3), {})


def test_rejects_several_feature_axes():
  layer = kbn_jax.BatchNormalization(axis=[1, 2])
  with pytest.raises(ValueError, match=r"`axis`=\(1, 2\) normalizes several axes.*axis=-1"):
    folding.inference_affine(layer, {})


def test_rejects_missing_gamma_with_a_hint():
  variables = reference.variables_from_state(reference.initial_state((3,), scale=False))
  with pytest.raises(ValueError, match=r"`variables\['params'\]` has no 'gamma'.*scale=False"):
    folding.inference_affine(kbn_jax.BatchNormalization(), variables)


def test_rejects_feature_count_mismatch():
  variables = reference.variables_from_state(reference.initial_state((3,)))
  params = {"kernel": jnp.ones((2, 4))}
  with pytest.raises(ValueError, match=r"`scale` has shape \(3,\) but the kernel .* 4 output"):
    folding.fold_batch_norm(params, kbn_jax.BatchNormalization(), variables)


def test_rejects_params_without_kernel():
  variables = reference.variables_from_state(reference.initial_state((3,)))
  with pytest.raises(ValueError, match=r"`params` must hold .* 'kernel'.*received keys \['w'\]"):
    folding.fold_batch_norm({"w": jnp.ones((2, 3))}, kbn_jax.BatchNormalization(), variables)


def test_rejects_multi_axis_statistics():
  state = reference.initial_state((2, 3))
  with pytest.raises(ValueError, match=r"feature shape \(C,\) of a single axis"):
    folding.inference_affine(kbn_jax.BatchNormalization(), reference.variables_from_state(state))
