"""Issue 10: `kbn_jax.functional.batch_normalization`, the whole layer as one pure function.

* the 78 Keras V1 fixtures replayed through the pure function (no Flax in the loop), and the pure
  function equal to the linen Module bit for bit;
* the float64 reference of ``tests/reference.py`` on renorm, ghost, fused and masked
  configurations, eager and under ``jit`` (``chex.variants``);
* forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) through training calls
  of the pure function and of the Module, against reverse mode;
* ``jax.shard_map`` with ``axis_name`` against one device on the concatenated batch, ghost
  batches per device and across devices (``ghost_batch_scope``);
* `BatchNormConfig` as a static ``jit`` argument, and its errors equal to the Module's.
"""

from __future__ import annotations

import functools
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kbn_jax
from kbn_jax import functional
from tests import reference, replay
from tests._asserts import assert_trees_close
from tests.oracles.keras_parity.cases import CASES
from tests.oracles.keras_parity.test_parity import (
  _tolerance,
  build_layer,
  initial_variables,
  load_case,
)

# --------------------------------------------------------------------------------------------
# The Keras V1 fixtures, through the pure function
# --------------------------------------------------------------------------------------------


def _functional_step(config, mask):
  """One jitted training step of the pure function: output, new statistics, gradients."""

  @jax.jit
  def step(params, stats, x, dy):
    def forward(x, params):
      return functional.batch_normalization(x, params, stats, config, training=True, mask=mask)

    (y, new_stats), pullback = jax.vjp(forward, x, params)
    grad_x, grad_params = pullback((dy.astype(y.dtype), jax.tree.map(jnp.zeros_like, new_stats)))
    return y, new_stats, grad_x, grad_params

  return step


def _module_step(layer, mask):
  """The same step through the linen Module."""

  @jax.jit
  def step(params, stats, x, dy):
    def forward(x, params):
      y, updates = layer.apply(
        {"params": params, "batch_stats": stats},
        x,
        training=True,
        mask=mask,
        mutable=["batch_stats"],
      )
      return y, updates["batch_stats"]

    (y, new_stats), pullback = jax.vjp(forward, x, params)
    grad_x, grad_params = pullback((dy.astype(y.dtype), jax.tree.map(jnp.zeros_like, new_stats)))
    return y, new_stats, grad_x, grad_params

  return step


def _check(name, quantity, actual, expected, tolerance):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (name, quantity, actual.shape, expected.shape)
  scale = np.maximum(np.abs(expected), 1.0)
  error = float(np.max(np.abs(actual - expected) / scale)) if actual.size else 0.0
  assert error <= tolerance, f"{name}: {quantity} off by {error:.3g} (tolerance {tolerance})"


@pytest.mark.parametrize(
  "name", replay.tiered([case["name"] for case in CASES], replay.REPRESENTATIVE_V1)
)
def test_pure_function_matches_keras_v1_fixture(name):
  meta, arrays = load_case(name)
  layer = build_layer(meta, arrays)
  config = layer.config
  assert isinstance(config, functional.BatchNormConfig)
  variables = initial_variables(layer, meta, arrays)
  params, stats = variables["params"], variables["batch_stats"]
  mask = jnp.asarray(arrays["mask"]) if "mask" in arrays else None
  step = _functional_step(config, mask)
  compute = meta["compute_dtype"]
  tolerance = _tolerance(compute, meta["case"])
  for s in range(meta["case"]["steps"]):
    x = jnp.asarray(arrays[f"x_{s}"])
    y, stats, grad_x, grad_params = step(params, stats, x, jnp.asarray(arrays[f"dy_{s}"]))
    assert y.dtype == jnp.dtype(meta["output_dtype"]), (name, y.dtype)
    _check(name, f"step {s} output", y, arrays[f"y_{s}"], tolerance)
    _check(name, f"step {s} grad_x", grad_x, arrays[f"grad_x_{s}"], tolerance)
    for weight in ("gamma", "beta"):
      if weight in params:
        expected = arrays[f"grad_{weight}_{s}"].reshape(grad_params[weight].shape)
        _check(name, f"step {s} grad_{weight}", grad_params[weight], expected, tolerance)
    for weight in meta["weight_names"]:
      if weight not in ("gamma", "beta"):
        expected = arrays[f"w{s + 1}_{weight}"].reshape(stats[weight].shape)
        _check(name, f"step {s} {weight}", stats[weight], expected, _tolerance("float32", {}))
  y_infer, unchanged = jax.jit(
    lambda params, stats, x: functional.batch_normalization(
      x, params, stats, config, training=False
    )
  )(params, stats, jnp.asarray(arrays["x_infer"]))
  _check(name, "inference output", y_infer, arrays["y_infer"], tolerance)
  chex.assert_trees_all_equal(unchanged, stats)


BIT_FOR_BIT_CASES = [
  "r2_default",
  "r4_nhwc_fused",
  "r3_mask",
  "r2_renorm_all_clips",
  "r3_ghost",
  "r2_adjustment",
  "r4_fused_dtype_float16",
]


@pytest.mark.parametrize("name", BIT_FOR_BIT_CASES)
def test_pure_function_equals_module_bit_for_bit(name):
  """The Module is a shell over the pure function: same outputs, statistics and gradients."""
  meta, arrays = load_case(name)
  layer = build_layer(meta, arrays)
  variables = initial_variables(layer, meta, arrays)
  mask = jnp.asarray(arrays["mask"]) if "mask" in arrays else None
  pure, module = _functional_step(layer.config, mask), _module_step(layer, mask)
  params = variables["params"]
  pure_stats = module_stats = variables["batch_stats"]
  for s in range(meta["case"]["steps"]):
    x, dy = jnp.asarray(arrays[f"x_{s}"]), jnp.asarray(arrays[f"dy_{s}"])
    *pure_out, pure_stats_next = _reorder(pure(params, pure_stats, x, dy))
    *module_out, module_stats_next = _reorder(module(params, module_stats, x, dy))
    chex.assert_trees_all_equal(pure_out, module_out)
    chex.assert_trees_all_equal(pure_stats_next, module_stats_next)
    pure_stats, module_stats = pure_stats_next, module_stats_next


def _reorder(result):
  y, stats, grad_x, grad_params = result
  return y, grad_x, grad_params, stats


def test_bit_for_bit_cases_exist():
  names = {case["name"] for case in CASES}
  assert set(BIT_FOR_BIT_CASES) <= names, set(BIT_FOR_BIT_CASES) - names


# --------------------------------------------------------------------------------------------
# The float64 reference, eager and under jit
# --------------------------------------------------------------------------------------------

_CLIPPING = {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5}
_ADJUST_SCALE = np.array([0.5, 1.5, 2.0], np.float32)
_ADJUST_BIAS = np.array([0.1, -0.2, 0.3], np.float32)


def _state(features, rng, *, renorm=False):
  """A float64 state far from the initial one, so every statistic matters."""
  state = {
    "gamma": rng.uniform(0.5, 1.5, features),
    "beta": rng.normal(0.0, 0.5, features),
    "moving_mean": rng.normal(0.0, 0.5, features),
    "moving_variance": rng.uniform(0.5, 2.0, features),
  }
  if renorm:
    state["moving_stddev"] = np.sqrt(state["moving_variance"] + 1e-3)
    state["renorm_mean"] = rng.normal(0.0, 0.5, features)
    state["renorm_stddev"] = rng.uniform(0.6, 1.6, features)
  return state


def _split(state):
  params = {k: jnp.asarray(v, jnp.float32) for k, v in state.items() if k in ("gamma", "beta")}
  stats = {k: jnp.asarray(v, jnp.float32) for k, v in state.items() if k not in params}
  return params, stats


# name, config, input shape, reference keywords (fused resolution, mask, adjustment).
REFERENCE_CASES = (
  ("plain", {"momentum": 0.9}, (8, 3), {}),
  ("renorm", {"renorm": True, "renorm_clipping": _CLIPPING, "momentum": 0.9}, (8, 3), {}),
  ("ghost", {"virtual_batch_size": 2, "momentum": 0.8}, (8, 4, 3), {}),
  (
    "ghost_renorm",
    {"virtual_batch_size": 3, "renorm": True, "renorm_clipping": _CLIPPING, "momentum": 0.8},
    (6, 3),
    {},
  ),
  ("fused", {"momentum": 0.9}, (4, 3, 2, 3), {"fused_resolved": True}),
  ("fused_nchw", {"momentum": 0.9, "axis": 1}, (4, 3, 2, 2), {"fused_resolved": True}),
  ("mask", {"momentum": 0.9}, (4, 5, 3), {"mask": True}),
  ("adjustment", {"momentum": 0.9}, (6, 3), {"adjustment": True}),
)


class ReferenceTest(chex.TestCase):
  """The pure function against ``tests/reference.py`` (float64), with and without ``jit``."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*REFERENCE_CASES)
  def test_training_call_matches_float64_reference(self, config, shape, keywords):
    rng = np.random.default_rng(1)
    config = dict(config)
    x = rng.normal(0.3, 1.7, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    axis = config.get("axis", -1)
    state = _state(reference.feature_shape(shape, axis), rng, renorm=config.get("renorm", False))
    ref_kwargs = {
      k: config[k]
      for k in ("axis", "momentum", "renorm", "renorm_clipping", "virtual_batch_size")
      if k in config
    }
    ref_kwargs["fused_resolved"] = keywords.get("fused_resolved", False)
    mask = None
    if keywords.get("mask"):
      mask = (rng.uniform(size=shape[:-1]) > 0.3).astype(np.float32)
      ref_kwargs["mask"] = mask
    if keywords.get("adjustment"):
      config["adjustment"] = lambda shape: (_ADJUST_SCALE, _ADJUST_BIAS)
      ref_kwargs["adjustment"] = (_ADJUST_SCALE, _ADJUST_BIAS)
    bn_config = functional.BatchNormConfig(**config)
    params, stats = _split(state)

    def step(x, params, stats, dy):
      def forward(x, params):
        return functional.batch_normalization(x, params, stats, bn_config, training=True, mask=mask)

      (y, new_stats), pullback = jax.vjp(forward, x, params)
      grad_x, grad_params = pullback((dy, jax.tree.map(jnp.zeros_like, new_stats)))
      return y, new_stats, {"x": grad_x, **grad_params}

    y, new_stats, grads = self.variant(step)(x, params, stats, dy)
    expected_y, expected_state = reference.keras_v1_reference(x, state, training=True, **ref_kwargs)
    expected_grads = reference.keras_v1_gradients(x, state, dy, training=True, **ref_kwargs)
    chex.assert_type(y, jnp.float32)
    chex.assert_shape(y, shape)
    chex.assert_trees_all_close(y, expected_y.astype(np.float32), atol=1e-5, rtol=1e-5)
    expected_stats = {k: expected_state[k].astype(np.float32) for k in stats}
    chex.assert_trees_all_close(new_stats, expected_stats, atol=1e-5, rtol=1e-5)
    expected_grads = {k: v.astype(np.float32) for k, v in expected_grads.items()}
    chex.assert_trees_all_close(grads, expected_grads, atol=1e-5, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*REFERENCE_CASES)
  def test_inference_call_matches_float64_reference(self, config, shape, keywords):
    del keywords  # inference ignores the mask, the fused resolution and the adjustment
    rng = np.random.default_rng(2)
    axis = config.get("axis", -1)
    state = _state(reference.feature_shape(shape, axis), rng, renorm=config.get("renorm", False))
    x = rng.normal(0.3, 1.7, shape).astype(np.float32)
    bn_config = functional.BatchNormConfig(**config)
    params, stats = _split(state)
    y, new_stats = self.variant(
      lambda x, params, stats: functional.batch_normalization(
        x, params, stats, bn_config, training=False
      )
    )(x, params, stats)
    expected_y, _ = reference.keras_v1_reference(x, state, axis=axis, training=False)
    chex.assert_trees_all_close(y, expected_y.astype(np.float32), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal(new_stats, stats)


# --------------------------------------------------------------------------------------------
# Forward-mode autodiff through a training call
# --------------------------------------------------------------------------------------------


def _keyed_adjustment(shape, key):
  scale_key, bias_key = jax.random.split(key)
  scale = 1.0 + 0.2 * jax.random.normal(scale_key, shape[-1:])
  return scale, 0.1 * jax.random.normal(bias_key, shape[-1:])


# name: (config, input shape, masked)
FORWARD_PATHS = {
  "plain": ({"momentum": 0.9}, (6, 4), False),
  "fused": ({"momentum": 0.9}, (4, 3, 2, 3), False),
  "fused_nchw": ({"momentum": 0.9, "axis": 1}, (4, 3, 2, 2), False),
  "ghost": ({"virtual_batch_size": 2, "momentum": 0.8}, (6, 3), False),
  "ghost_rank3": ({"virtual_batch_size": 3, "momentum": 0.8}, (6, 4, 3), False),
  "renorm": ({"renorm": True, "renorm_clipping": _CLIPPING}, (6, 3), False),
  "masked": ({"momentum": 0.9}, (4, 5, 3), True),
  "masked_renorm": ({"renorm": True, "renorm_clipping": _CLIPPING}, (4, 5, 3), True),
  "adjustment": ({"adjustment": lambda shape: (_ADJUST_SCALE, _ADJUST_BIAS)}, (6, 3), False),
  "adjustment_key": ({"adjustment": _keyed_adjustment}, (6, 3), False),
  "multi_axis": ({"axis": (1, 2), "momentum": 0.9}, (5, 4, 3), False),
}


def _forward_problem(path, front_end):
  """``f(x, params) -> (y, new_stats)`` for a training call, and arrays to evaluate it at."""
  config, shape, masked = FORWARD_PATHS[path]
  rng = np.random.default_rng(3)
  bn_config = functional.BatchNormConfig(**config)
  state = _state(reference.feature_shape(shape, bn_config.axis), rng, renorm=bn_config.renorm)
  params, stats = _split(state)
  x = jnp.asarray(rng.normal(0.3, 1.7, shape), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=shape[:-1]) > 0.3, jnp.float32) if masked else None
  key = jax.random.key(7)
  if front_end == "functional":

    def f(x, params):
      return functional.batch_normalization(
        x, params, stats, bn_config, training=True, mask=mask, adjustment_key=key
      )

  else:
    layer = kbn_jax.BatchNormalization(**config)

    def f(x, params):
      y, updates = layer.apply(
        {"params": params, "batch_stats": stats},
        x,
        training=True,
        mask=mask,
        mutable=["batch_stats"],
        rngs={"adjustment": key},
      )
      return y, updates["batch_stats"]

  return f, x, params, rng


def _random_like(tree, rng):
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), tree)


def _vdot(a, b):
  return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# The derivative checks run on the pure function; through the linen shell they are slow-tier.
FRONT_ENDS = ("functional", pytest.param("linen", marks=pytest.mark.slow))
# ... and on four paths that cover the closed form, ghost batches and autodiff; the rest are slow.
DERIVATIVE_PATHS = replay.tiered(
  list(FORWARD_PATHS), ("plain", "fused_nchw", "ghost", "masked_renorm")
)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("path", DERIVATIVE_PATHS)
def test_jvp_agrees_with_vjp(path, front_end):
  """Issue 10 item 4: ``<J t, w> == <t, J^T w>`` for tangents on the input and parameters."""
  f, x, params, rng = _forward_problem(path, front_end)
  output = lambda x, params: f(x, params)[0]  # noqa: E731
  tangents = (_random_like(x, rng), _random_like(params, rng))
  (y, new_stats), (y_dot, stats_dot) = jax.jit(jax.jvp, static_argnums=0)(f, (x, params), tangents)
  # The statistic updates are under stop_gradient: no tangent flows into them.
  chex.assert_trees_all_close(stats_dot, jax.tree.map(jnp.zeros_like, new_stats), atol=0)
  chex.assert_trees_all_close(y, f(x, params)[0], atol=1e-6, rtol=1e-6)
  weights = _random_like(y, rng)
  _, pullback = jax.vjp(output, x, params)
  cotangents = pullback(weights)
  lhs, rhs = _vdot(y_dot, weights), _vdot(tangents, cotangents)
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("path", DERIVATIVE_PATHS)
def test_jacfwd_equals_jacrev(path, front_end):
  f, x, params, _ = _forward_problem(path, front_end)
  output = lambda x, params: f(x, params)[0]  # noqa: E731
  forward = jax.jit(jax.jacfwd(output, argnums=(0, 1)))(x, params)
  reverse = jax.jit(jax.jacrev(output, argnums=(0, 1)))(x, params)
  chex.assert_trees_all_close(forward, reverse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("path", DERIVATIVE_PATHS)
def test_linearize_equals_jvp(path, front_end):
  f, x, params, rng = _forward_problem(path, front_end)
  output = lambda x, params: f(x, params)[0]  # noqa: E731
  tangents = (_random_like(x, rng), _random_like(params, rng))
  y, linear = jax.linearize(output, x, params)
  y_ref, y_dot = jax.jvp(output, (x, params), tangents)
  chex.assert_trees_all_close(y, y_ref, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(linear(*tangents), y_dot, atol=1e-5, rtol=1e-5)
  # Linear in the tangent: twice the tangent gives twice the output tangent.
  doubled = linear(*jax.tree.map(lambda t: 2 * t, tangents))
  chex.assert_trees_all_close(doubled, 2 * y_dot, atol=1e-5, rtol=1e-5)
  # The linearized map is transposable: its transpose is the vjp.
  weights = _random_like(y, rng)
  transposed = jax.linear_transpose(linear, *tangents)(weights)
  _, pullback = jax.vjp(output, x, params)
  chex.assert_trees_all_close(transposed, pullback(weights), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# shard_map with axis_name: equal to one device on the concatenated batch
# --------------------------------------------------------------------------------------------

AXIS = "data"
NUM_DEVICES = 8
SHARD_TOLERANCE = 1e-6


def _sharded_step(config, mesh, masked):
  """A training step (output, per-device statistics, gradients) under `jax.shard_map`."""

  def local(params, stats, x, mask):
    y, new_stats = functional.batch_normalization(
      x, params, stats, config, training=True, mask=mask
    )
    return y, jax.tree.map(lambda a: a[None], new_stats)

  batch = P(AXIS)
  mapped = jax.shard_map(
    local if masked else lambda params, stats, x: local(params, stats, x, None),
    mesh=mesh,
    in_specs=(P(), P(), batch, batch) if masked else (P(), P(), batch),
    out_specs=(batch, batch),
  )
  return _with_gradients(mapped, masked)


def _one_device_step(config, masked):
  def one(params, stats, x, mask=None):
    return functional.batch_normalization(
      x, params, stats, config, training=True, mask=mask, axis_name=None
    )

  return _with_gradients(one, masked)


def _with_gradients(fn, masked):
  @jax.jit
  def step(params, stats, x, dy, mask=None):
    def forward(x, params):
      return fn(params, stats, x, mask)[0] if masked else fn(params, stats, x)[0]

    y, pullback = jax.vjp(forward, x, params)
    grad_x, grad_params = pullback(dy)
    new_stats = (fn(params, stats, x, mask) if masked else fn(params, stats, x))[1]
    return y, new_stats, {"x": grad_x, **grad_params}

  # Host copies: explicit mesh shardings would otherwise ride along into the comparisons.
  return lambda *args: jax.device_get(step(*args))


# name: (config, global input shape, masked)
SHARD_CASES = {
  "plain": ({"momentum": 0.9}, (64, 5), False),
  "rank3": ({"momentum": 0.9, "axis": 1}, (32, 3, 4), False),
  "fused": ({"momentum": 0.9}, (16, 3, 2, 4), False),
  "fused_nchw": ({"momentum": 0.9, "axis": 1}, (16, 4, 2, 2), False),
  "renorm": ({"renorm": True, "renorm_clipping": _CLIPPING, "momentum": 0.9}, (64, 5), False),
  "masked": ({"momentum": 0.9}, (32, 4, 3), True),
  "adjustment": (
    {"adjustment": lambda shape: (_ADJUST_SCALE, _ADJUST_BIAS), "momentum": 0.9},
    (32, 3),
    False,
  ),
  # ghost_batch_scope="global": Keras's one-device strided layout of the whole global batch.
  "global_ghost_8": (
    {"virtual_batch_size": 8, "ghost_batch_scope": "global", "momentum": 0.8},
    (64, 3),
    False,
  ),
  "global_ghost_16": (
    {"virtual_batch_size": 16, "ghost_batch_scope": "global", "momentum": 0.8},
    (64, 2, 3),
    False,
  ),
  "global_ghost_renorm": (
    {
      "virtual_batch_size": 16,
      "ghost_batch_scope": "global",
      "renorm": True,
      "renorm_clipping": _CLIPPING,
      "momentum": 0.8,
    },
    (64, 3),
    False,
  ),
  "global_ghost_whole_batch": (
    {"virtual_batch_size": 64, "ghost_batch_scope": "global", "momentum": 0.8},
    (64, 3),
    False,
  ),
}


def _put(mesh, params, stats, *batch):
  """Parameters and statistics replicated, the batch arrays split over the devices."""
  replicated = jax.device_put((params, stats), NamedSharding(mesh, P()))
  return replicated + tuple(jax.device_put(batch, NamedSharding(mesh, P(AXIS))))


def _shard_problem(config, shape, masked, seed=4):
  rng = np.random.default_rng(seed)
  bn_config = functional.BatchNormConfig(axis_name=AXIS, **config)
  state = _state(reference.feature_shape(shape, bn_config.axis), rng, renorm=bn_config.renorm)
  params, stats = _split(state)
  # Per-row offsets make the ghost-batch layout matter.
  x = rng.normal(0.3, 1.7, shape) + np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
  x = jnp.asarray(x / shape[0], jnp.float32)
  dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=shape[:-1]) > 0.3, jnp.float32) if masked else None
  return bn_config, params, stats, x, dy, mask


@pytest.mark.parametrize(
  "case",
  replay.tiered(list(SHARD_CASES), ("plain", "fused_nchw", "renorm", "masked", "global_ghost_16")),
)
def test_shard_map_equals_one_device(case):
  config, shape, masked = SHARD_CASES[case]
  bn_config, params, stats, x, dy, mask = _shard_problem(config, shape, masked)
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
  args = (params, stats, x, dy) + ((mask,) if masked else ())
  y, per_device_stats, grads = _sharded_step(bn_config, mesh, masked)(*_put(mesh, *args))
  expected_y, expected_stats, expected_grads = _one_device_step(bn_config, masked)(*args)
  assert_trees_close(y, expected_y, SHARD_TOLERANCE, "output")
  assert_trees_close(grads["x"], expected_grads["x"], SHARD_TOLERANCE, "grad_x ")
  # gamma/beta gradients are sums over the whole batch, added in another order on 8 devices
  # (8 partial sums, then a psum): their rounding grows with the mass of the terms, not the
  # result (the masked case cancels: 1.2e-5 off on a result of 10.5, with both sides 6e-6 off
  # the float64 value). So they are compared relative to that mass, sum |dy| (|x_hat| ~ 1).
  mass = float(np.max(np.sum(np.abs(np.asarray(dy)), axis=0)))
  for name in params:
    assert_trees_close(
      grads[name], expected_grads[name], SHARD_TOLERANCE * max(1.0, mass), f"grad_{name} "
    )
  for d in range(NUM_DEVICES):  # every device ends with the same statistics
    device_stats = jax.tree.map(lambda a, d=d: a[d], per_device_stats)
    assert_trees_close(device_stats, expected_stats, SHARD_TOLERANCE, f"device {d} statistics ")


def test_device_ghost_scope_splits_each_device_batch():
  """``"device"`` (Keras under tf.distribute): each device normalizes its own ghost batches,
  and the moving statistics move toward the mean over every device's ghost batches."""
  config = {"virtual_batch_size": 4, "momentum": 0.8}
  bn_config, params, stats, x, dy, _ = _shard_problem(config, (64, 3), False)
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
  y, per_device_stats, _ = _sharded_step(bn_config, mesh, False)(*_put(mesh, params, stats, x, dy))
  local = _one_device_step(bn_config, False)
  chunks = [local(params, stats, x[8 * d : 8 * d + 8], dy[8 * d : 8 * d + 8]) for d in range(8)]
  assert_trees_close(y, jnp.concatenate([c[0] for c in chunks]), SHARD_TOLERANCE, "output")
  # The EMA is affine in its target, so the synchronized update is the mean of local ones.
  expected_stats = jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), axis=0), *[c[1] for c in chunks])
  for d in range(NUM_DEVICES):
    device_stats = jax.tree.map(lambda a, d=d: a[d], per_device_stats)
    assert_trees_close(device_stats, expected_stats, SHARD_TOLERANCE, f"device {d} statistics ")


def test_device_ghost_scope_spans_consecutive_devices():
  """A per-device batch smaller than the ghost batch: consecutive devices form one."""
  config = {"virtual_batch_size": 8, "momentum": 0.8}
  bn_config, params, stats, x, dy, _ = _shard_problem(config, (32, 3), False)
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
  y, _, _ = _sharded_step(bn_config, mesh, False)(*_put(mesh, params, stats, x, dy))
  local = _one_device_step(bn_config, False)
  expected = [
    local(params, stats, x[8 * g : 8 * g + 8], dy[8 * g : 8 * g + 8])[0] for g in range(4)
  ]
  assert_trees_close(y, jnp.concatenate(expected), SHARD_TOLERANCE, "output")


@pytest.mark.parametrize("virtual_batch_size", [8, 16])
def test_device_and_global_ghost_scopes_differ(virtual_batch_size):
  """Same data, same ghost size: ``"device"`` groups rows by device (contiguous), ``"global"``
  strides over the whole batch, so the outputs and moving variances differ."""
  config = {"virtual_batch_size": virtual_batch_size, "momentum": 0.8}
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
  results = {}
  for scope in ("device", "global"):
    bn_config, params, stats, x, dy, _ = _shard_problem(
      {**config, "ghost_batch_scope": scope}, (64, 3), False
    )
    results[scope] = _sharded_step(bn_config, mesh, False)(*_put(mesh, params, stats, x, dy))
  (y_device, stats_device, _), (y_global, stats_global, _) = results["device"], results["global"]
  assert float(jnp.max(jnp.abs(y_device - y_global))) > 1e-2
  variance_gap = jnp.abs(stats_device["moving_variance"] - stats_global["moving_variance"])
  assert float(jnp.max(variance_gap)) > 1e-4
  # Equal-sized ghost batches partition the batch either way: the moving means agree.
  assert_trees_close(stats_device["moving_mean"], stats_global["moving_mean"], 1e-6, "moving_mean")


def test_global_ghost_scope_needs_a_multiple_of_the_device_count():
  config = {"virtual_batch_size": 4, "ghost_batch_scope": "global"}
  bn_config, params, stats, x, dy, _ = _shard_problem(config, (64, 3), False)
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    _sharded_step(bn_config, mesh, False)(*_put(mesh, params, stats, x, dy))


def test_unbound_axis_name_is_a_clear_error():
  bn_config, params, stats, x, _, _ = _shard_problem({}, (8, 3), False)
  with pytest.raises(ValueError, match="is not bound.*shard_map"):
    functional.batch_normalization(x, params, stats, bn_config, training=True)
  # Inference needs no collective, and a per-call axis_name=None opts out.
  functional.batch_normalization(x, params, stats, bn_config, training=False)
  functional.batch_normalization(x, params, stats, bn_config, training=True, axis_name=None)


# --------------------------------------------------------------------------------------------
# BatchNormConfig: a static jit argument, validated with the Module's messages
# --------------------------------------------------------------------------------------------


def test_config_is_hashable_and_compares_by_value():
  a = functional.BatchNormConfig(axis=[1, 3], renorm=True, renorm_clipping={"rmax": 2.0})
  b = functional.BatchNormConfig(axis=(1, 3), renorm=True, renorm_clipping={"rmax": 2.0})
  assert a == b and hash(a) == hash(b)
  assert a != a.replace(momentum=0.9)
  assert {a: 1}[b] == 1
  # The Module's config is the same object kind, equal for equal arguments.
  assert (
    kbn_jax.BatchNormalization(axis=[1, 3], renorm=True, renorm_clipping={"rmax": 2.0}).config == a
  )


def test_config_is_a_static_jit_argument():
  """Equal configs built separately share one compiled function; a different one retraces."""
  traced = []

  def bn(x, params, stats, config, training):
    traced.append(config)
    return functional.batch_normalization(x, params, stats, config, training=training)

  step = jax.jit(bn, static_argnames=("config", "training"))
  x = jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3)
  config = functional.BatchNormConfig(momentum=0.9, axis=[-1])
  params, stats = functional.init_variables(config, jax.random.key(0), x.shape)
  y1, stats1 = step(x, params, stats, config, True)
  y2, stats2 = step(x, params, stats, functional.BatchNormConfig(momentum=0.9, axis=(-1,)), True)
  assert len(traced) == 1
  chex.assert_trees_all_equal((y1, stats1), (y2, stats2))
  step(x, params, stats, config.replace(momentum=0.5), True)
  step(x, params, stats, config, False)
  assert len(traced) == 3
  # Positional static index works too (the config is the fourth argument).
  by_index = jax.jit(
    functools.partial(functional.batch_normalization, training=True), static_argnums=3
  )
  chex.assert_trees_all_equal(by_index(x, params, stats, config), (y1, stats1))


def test_config_replace_validates():
  config = functional.BatchNormConfig()
  with pytest.raises(ValueError, match="momentum"):
    config.replace(momentum=2.0)


BAD_ARGUMENTS = [
  ({"momentum": 2}, "momentum"),
  ({"momentum": -0.5}, "momentum"),
  ({"epsilon": -1.0}, "epsilon"),
  ({"virtual_batch_size": 0}, "virtual_batch_size"),
  ({"virtual_batch_size": 2.5}, "virtual_batch_size"),
  ({"axis": "x"}, "axis"),
  ({"renorm": True, "renorm_clipping": {"bad": 1.0}}, "renorm_clipping"),
  ({"center": "yes"}, "center"),
  ({"gamma_initializer": "no_such_initializer"}, "gamma_initializer"),
  ({"beta_regularizer": "no_such_regularizer"}, "beta_regularizer"),
  ({"semantics": "tf"}, "semantics"),
  ({"ghost_batch_scope": "host"}, "ghost_batch_scope"),
  ({"momentum": None}, "momentum"),
  ({"renorm": True, "semantics": "torch"}, "renorm"),
  ({"dtype": "no_such_dtype"}, "dtype"),
]


@pytest.mark.parametrize(
  ("kwargs", "argument"), BAD_ARGUMENTS, ids=[str(kw) for kw, _ in BAD_ARGUMENTS]
)
def test_bad_argument_raises_the_module_message(kwargs, argument):
  with pytest.raises((ValueError, TypeError)) as from_config:
    functional.BatchNormConfig(**kwargs)
  with pytest.raises((ValueError, TypeError)) as from_module:
    kbn_jax.BatchNormalization(**kwargs)
  assert type(from_config.value) is type(from_module.value)
  assert str(from_config.value) == str(from_module.value)
  assert argument in str(from_config.value)


@pytest.mark.parametrize("axis", [[1, 1], 3, -4])
def test_axis_checked_against_the_input_like_the_module(axis):
  """Keras checks the axis against the rank at build: the pure function at its call."""
  x = jnp.ones((2, 3, 4), jnp.float32)
  config = functional.BatchNormConfig(axis=axis)
  with pytest.raises(ValueError) as from_function:
    functional.init_variables(config, jax.random.key(0), x.shape)
  with pytest.raises(ValueError) as from_module:
    kbn_jax.BatchNormalization(axis=axis).init(jax.random.key(0), x)
  assert str(from_function.value) == str(from_module.value)
  assert "axis" in str(from_function.value)


# --------------------------------------------------------------------------------------------
# Per-call cross-device overrides
# --------------------------------------------------------------------------------------------

_GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]


def _sharded_with_groups(config, **per_call):
  params, stats = functional.init_variables(config, jax.random.key(0), (64, 3))
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))

  def local(x):
    y, new_stats = functional.batch_normalization(
      x, params, stats, config, training=True, **per_call
    )
    return y, jax.tree.map(lambda a: a[None], new_stats)

  mapped = jax.shard_map(local, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
  x = _shard_problem({}, (64, 3), False)[3]
  return jax.device_get(jax.jit(mapped)(jax.device_put(x, NamedSharding(mesh, P(AXIS)))))


def test_per_call_axis_index_groups_equal_config_groups():
  config = functional.BatchNormConfig(axis_name=AXIS, momentum=0.9)
  per_call = _sharded_with_groups(config, axis_index_groups=_GROUPS)
  from_config = _sharded_with_groups(config.replace(axis_index_groups=_GROUPS))
  assert_trees_close(per_call, from_config, SHARD_TOLERANCE)
  # A per-call None drops the config's groups: one group of all devices.
  ungrouped = _sharded_with_groups(
    config.replace(axis_index_groups=_GROUPS), axis_index_groups=None
  )
  assert_trees_close(ungrouped, _sharded_with_groups(config), SHARD_TOLERANCE)


def test_per_call_axis_index_groups_with_ghost_batches_are_rejected():
  # Regression: per-call groups were once accepted with ghost batches and silently ignored by
  # the moving-average collective; they get the config's check now.
  config = functional.BatchNormConfig(axis_name=AXIS, virtual_batch_size=8)
  with pytest.raises(ValueError, match="cannot be combined with `virtual_batch_size`"):
    _sharded_with_groups(config, axis_index_groups=_GROUPS)


def test_per_call_axis_index_groups_are_validated():
  # Regression: per-call groups get the config's checks (TPU collectives need equal groups).
  config = functional.BatchNormConfig(axis_name=AXIS)
  with pytest.raises(ValueError, match="groups of equal size"):
    _sharded_with_groups(config, axis_index_groups=[[0, 1, 2], [3, 4, 5, 6, 7]])


def test_fused_mask_warning_points_at_the_caller():
  # Regression: the warning once named the caller's caller (or flax/linen/module.py); it names
  # the first frame outside kbn_jax, Flax and JAX.
  config = functional.BatchNormConfig()
  params, stats = functional.init_variables(config, jax.random.key(0), (2, 3, 3, 4))
  x, mask = jnp.ones((2, 3, 3, 4), jnp.float32), jnp.ones((2, 3, 3), jnp.float32)

  def caller():
    return functional.batch_normalization(x, params, stats, config, training=True, mask=mask)

  with pytest.warns(UserWarning, match="Masking is not supported with `fused=True`") as record:
    caller()
  assert record[0].filename == __file__
  assert record[0].lineno == caller.__code__.co_firstlineno + 1


# Per-call renorm clipping: a warm-up schedule under jit
STEPS = 5


CONFIG = {"momentum": 0.5, "renorm_momentum": 0.5}


def warmup(step):
  """A warm-up of the bounds in the style of the paper, fast enough to move in 5 steps."""
  rmax = 1.0 + 0.5 * step
  return {"rmax": rmax, "rmin": 1.0 / rmax, "dmax": 0.5 * step}


def _inputs(rng):
  """Batches whose mean and spread drift, so that r and d hit the clipping bounds."""
  return [
    jnp.asarray(rng.normal(2.0 * t, 3.0**t, (8, 3)), jnp.float32) for t in range(1, STEPS + 1)
  ]


def _fixed_clipping_run(xs):
  """The same steps with the bounds as fixed layer configuration (a new layer per step)."""
  layer = kbn_jax.BatchNormalization(renorm=True, **CONFIG)
  variables = layer.init(jax.random.key(0), xs[0])
  outputs, all_variables = [], []
  for t, x in enumerate(xs):
    fixed = kbn_jax.BatchNormalization(renorm=True, renorm_clipping=warmup(float(t)), **CONFIG)
    y, updates = fixed.apply(variables, x, training=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    outputs.append(y)
    all_variables.append(variables)
  return outputs, all_variables


class _CompileLog(logging.Handler):
  """Collects JAX's "finished compilation" records of ``train_step`` (`jax.log_compiles`)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages = []

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Finished XLA compilation of jit(train_step)"):
      self.messages.append(message)


def _count_compiles(fn):
  handler = _CompileLog()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      result = fn()
  finally:
    logger.removeHandler(handler)
  return result, handler.messages


def _assert_matches(outputs, variables, expected_outputs, expected_variables):
  for t in range(STEPS):
    np.testing.assert_allclose(outputs[t], expected_outputs[t], rtol=1e-6, atol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
      variables[t],
      expected_variables[t],
    )


@pytest.mark.parametrize("as_arrays", [True, False], ids=["jnp_scalars", "python_floats"])
def test_clipping_passed_per_call_compiles_once(rng, as_arrays):
  xs = _inputs(rng)
  layer = kbn_jax.BatchNormalization(renorm=True, **CONFIG)
  variables = layer.init(jax.random.key(0), xs[0])
  traces = []

  @jax.jit
  def train_step(variables, x, clipping):
    traces.append(clipping)
    y, updates = layer.apply(
      variables, x, training=True, renorm_clipping=clipping, mutable=["batch_stats"]
    )
    return y, {**variables, **updates}

  def run(variables):
    outputs, all_variables = [], []
    for t, x in enumerate(xs):
      clipping = warmup(float(t))
      if as_arrays:
        clipping = {k: jnp.asarray(v, jnp.float32) for k, v in clipping.items()}
      y, variables = train_step(variables, x, clipping)
      outputs.append(y)
      all_variables.append(variables)
    return outputs, all_variables

  (outputs, all_variables), compiles = _count_compiles(lambda: run(variables))
  assert len(traces) == 1, f"traced {len(traces)} times for {STEPS} clipping values"
  assert len(compiles) == 1, compiles
  _assert_matches(outputs, all_variables, *_fixed_clipping_run(xs))


def test_clipping_from_a_traced_step_count_compiles_once(rng):
  # The optax style: the schedule is a function of the step count carried in the train state.
  xs = _inputs(rng)
  layer = kbn_jax.BatchNormalization(renorm=True, **CONFIG)
  variables = layer.init(jax.random.key(0), xs[0])
  traces = []

  @jax.jit
  def train_step(variables, x, step):
    traces.append(step)
    clipping = warmup(step.astype(jnp.float32))
    y, updates = layer.apply(
      variables, x, training=True, renorm_clipping=clipping, mutable=["batch_stats"]
    )
    return y, {**variables, **updates}, step + 1

  def run(variables):
    step = jnp.zeros((), jnp.int32)
    outputs, all_variables = [], []
    for x in xs:
      y, variables, step = train_step(variables, x, step)
      outputs.append(y)
      all_variables.append(variables)
    return outputs, all_variables

  (outputs, all_variables), compiles = _count_compiles(lambda: run(variables))
  assert len(traces) == 1 and len(compiles) == 1, compiles
  _assert_matches(outputs, all_variables, *_fixed_clipping_run(xs))


def test_fixed_clipping_run_matches_float64_reference_and_clipping_binds(rng):
  # Pins the comparison target above to the spec (section 3.6), and shows the bounds matter.
  xs = _inputs(rng)
  outputs, all_variables = _fixed_clipping_run(xs)
  state = reference.initial_state((3,), renorm=True)
  differs = []
  for t, x in enumerate(xs):
    x64 = np.asarray(x, np.float64)
    unclipped, _ = reference.keras_v1_reference(x64, state, renorm=True, training=True, **CONFIG)
    expected, state = reference.keras_v1_reference(
      x64, state, renorm=True, renorm_clipping=warmup(float(t)), training=True, **CONFIG
    )
    np.testing.assert_allclose(outputs[t], expected, rtol=1e-5, atol=1e-5)
    for name, value in state.items():
      actual = {**all_variables[t]["params"], **all_variables[t]["batch_stats"]}[name]
      np.testing.assert_allclose(actual, value, rtol=1e-5, atol=1e-5)
    differs.append(not np.allclose(unclipped, expected, atol=1e-3))
  assert all(differs), "every step's clipping must change the output, or the test is vacuous"
