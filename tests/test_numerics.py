"""Numerically hard inputs, empty batches, NaN/Inf, compilation and determinism.

Also checks the float64 reference itself (`tests/reference.py`) against the committed Keras
fixtures and against finite differences, so the property tests stand on a verified oracle.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kbn_jax
from kbn_jax import diagnostics
from tests import reference

BN = kbn_jax.BatchNormalization
KEY = jax.random.key(0)
FIXTURES = pathlib.Path(__file__).parent / "oracles" / "keras_parity" / "fixtures"
FIXTURE_NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def _train(layer, variables, x, **kwargs):
  return layer.apply(variables, x, training=True, mutable=["batch_stats"], **kwargs)


def _f64(value):
  return np.asarray(jnp.asarray(value).astype(jnp.float32), np.float64)


def _state(variables):
  return reference.state_from_variables(variables)


# --------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------


def _fixture_config(meta, arrays):
  case, cfg = meta["case"], meta["case"]["config"]
  config = {
    "axis": cfg.get("axis", -1),
    "momentum": cfg.get("momentum", 0.99),
    "epsilon": cfg.get("epsilon", 1e-3),
    "center": cfg.get("center", True),
    "scale": cfg.get("scale", True),
    "renorm": cfg.get("renorm", False),
    "renorm_clipping": cfg.get("renorm_clipping"),
    "renorm_momentum": cfg.get("renorm_momentum", 0.99),
    "fused_resolved": meta["fused"],
    "virtual_batch_size": cfg.get("virtual_batch_size"),
    "trainable": cfg.get("trainable", True),
  }
  if case["adjustment"]:
    config["adjustment"] = (arrays["adj_scale"], arrays["adj_bias"])
  if case["mask"]:
    config["mask"] = arrays["mask"]
  return config


def _fixture_tolerance(dtype, large_mean):
  """Keras ran in float32 (or float16): 1e-5 of the largest magnitude, 2e-3 where a float16
  value is on the path; data with a large mean loses more in Keras's float32 arithmetic."""
  tol = 2e-3 if np.dtype(dtype) == np.float16 else 1e-5
  return tol * (5.0 if large_mean else 1.0)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_reference_matches_keras_fixture(name):
  """The float64 reference reproduces every stored Keras V1 quantity (outputs, gradients,
  every weight after every step, inference)."""
  meta = json.loads((FIXTURES / f"{name}.json").read_text())
  arrays = np.load(FIXTURES / f"{name}.npz")
  case = meta["case"]
  config = _fixture_config(meta, arrays)
  large_mean = "input_offset" in case
  weights = {n: arrays[f"w0_{n}"] for n in meta["weight_names"]}
  state = reference.state_from_keras_weights(weights, case["input_shape"], config["axis"])
  compute = np.dtype(meta["compute_dtype"])

  def check(expected, actual, what, through_compute=True):
    """`through_compute`: the value passed through the compute dtype (outputs, gradients);
    statistics are reduced in float32 whatever the compute dtype."""
    actual = np.asarray(actual, np.float64)
    expected_64 = np.asarray(expected, np.float64).reshape(actual.shape)
    dtypes = [expected.dtype] + ([compute] if through_compute else [])
    tol = max(_fixture_tolerance(d, large_mean) for d in dtypes)
    bound = tol * max(1.0, np.max(np.abs(expected_64)))
    error = np.max(np.abs(actual - expected_64), initial=0.0)
    assert error <= bound, f"{name} {what}: {error:.3g} > {bound:.3g}"

  for k in range(case["steps"]):
    x = arrays[f"x_{k}"].astype(compute)  # Keras casts to the compute dtype first.
    grads = reference.keras_v1_gradients(x, state, arrays[f"dy_{k}"], training=True, **config)
    y, state = reference.keras_v1_reference(x, state, training=True, **config)
    check(arrays[f"y_{k}"], y, f"y_{k}")
    check(arrays[f"grad_x_{k}"], grads["x"], f"grad_x_{k}")
    for weight in ("gamma", "beta"):
      assert (f"grad_{weight}_{k}" in arrays) == (weight in grads)
      if weight in grads:
        check(arrays[f"grad_{weight}_{k}"], grads[weight], f"grad_{weight}_{k}")
    for weight in meta["weight_names"]:
      check(arrays[f"w{k + 1}_{weight}"], state[weight], f"w{k + 1}_{weight}", False)
  y, _ = reference.keras_v1_reference(arrays["x_infer"].astype(compute), state, **config)
  check(arrays["y_infer"], y, "y_infer")


REFERENCE_GRADIENT_CASES = {
  "rank3_axis1": dict(shape=(3, 4, 2), axis=1),
  "multi_axis": dict(shape=(3, 2, 4), axis=[-1, 1]),
  "ghost": dict(shape=(6, 3), virtual_batch_size=3),
  "ghost_rank4": dict(shape=(4, 2, 1, 3), virtual_batch_size=2, axis=1),
  "mask_with_empty_row": dict(shape=(3, 4, 2), mask="row0"),
  "mask_axis1": dict(shape=(3, 4, 2), axis=1, mask="random"),
  "adjustment_full": dict(shape=(5, 3), adjustment="full"),
  "no_affine": dict(shape=(5, 3), center=False, scale=False),
  "inference": dict(shape=(3, 4), training=False),
  "batch_of_one": dict(shape=(1, 4)),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_GRADIENT_CASES))
def test_reference_gradients_match_finite_differences(name, rng):
  """Central differences of the float64 reference's ``sum(y * dy)`` (renorm is left out: its
  ``r, d`` are stop-gradient constants, which finite differences cannot hold fixed)."""
  config = dict(REFERENCE_GRADIENT_CASES[name])
  shape = config.pop("shape")
  training = config.pop("training", True)
  axis = config.get("axis", -1)
  features = reference.feature_shape(shape, axis)
  mask = config.pop("mask", None)
  if mask == "row0":
    config["mask"] = np.ones(shape[:-1]).astype(np.float64)
    config["mask"][0] = 0.0
  elif mask == "random":
    config["mask"] = (rng.uniform(size=shape[:-1]) < 0.5).astype(np.float64)
  if config.pop("adjustment", None) == "full":
    config["adjustment"] = (rng.uniform(0.5, 1.5, shape), rng.uniform(-1, 1, shape))
  state = reference.initial_state(
    features, center=config.get("center", True), scale=config.get("scale", True)
  )
  for name_ in state:
    state[name_] = state[name_] + rng.uniform(0.1, 0.5, features)
  x = rng.normal(size=shape) * 2 + 1
  dy = rng.normal(size=shape)

  def loss(x_, state_):
    y, _ = reference.keras_v1_reference(x_, state_, training=training, **config)
    return float(np.sum(y * dy))

  grads = reference.keras_v1_gradients(x, state, dy, training=training, **config)
  h = 1e-6
  numeric = np.zeros(shape)
  for index in np.ndindex(shape):
    step = np.zeros(shape)
    step[index] = h
    numeric[index] = (loss(x + step, state) - loss(x - step, state)) / (2 * h)
  np.testing.assert_allclose(grads["x"], numeric, rtol=1e-5, atol=1e-6)
  for weight in ("gamma", "beta"):
    if weight not in state:
      assert weight not in grads
      continue
    numeric = np.zeros(features)
    for index in np.ndindex(features):
      up, down = dict(state), dict(state)
      up[weight], down[weight] = state[weight].copy(), state[weight].copy()
      up[weight][index] += h
      down[weight][index] -= h
      numeric[index] = (loss(x, up) - loss(x, down)) / (2 * h)
    np.testing.assert_allclose(grads[weight], numeric, rtol=1e-5, atol=1e-6)


def test_reference_ghost_layout_is_strided():
  """Spec 3.3: with B=8, vbs=2 the ghost batches are {0,4}, {1,5}, {2,6}, {3,7}."""
  assert reference.ghost_batch_members(8, 2) == [[0, 4], [1, 5], [2, 6], [3, 7]]
  split = reference.split_ghost_batches(np.arange(8.0)[:, None], 2)
  assert [sorted(split[:, j, 0].astype(int).tolist()) for j in range(4)] == [
    [0, 4],
    [1, 5],
    [2, 6],
    [3, 7],
  ]


# --------------------------------------------------------------------------------------------
# Numerically hard inputs
# --------------------------------------------------------------------------------------------


class _Hard:
  """One training step and one inference step of the layer, and the same in the reference."""

  def __init__(self, x, *, epsilon=1e-3, dtype=None, momentum=0.5, **config):
    x = jnp.asarray(x)
    layer = BN(epsilon=epsilon, momentum=momentum, dtype=dtype, **config)
    variables = layer.init(KEY, x)
    self.y, updates = _train(layer, variables, x)
    self.stats = updates["batch_stats"]
    self.y_infer = layer.apply({**variables, **updates}, x)
    self.out_dtype = jnp.dtype(dtype or jnp.float32)
    self.x64 = _f64(x)
    self.axis = config.get("axis", -1)
    self.epsilon = epsilon
    self.vbs = config.get("virtual_batch_size")
    fused = reference.v1_fused(
      axis=self.axis,
      rank=x.ndim,
      fused=config.get("fused"),
      virtual_batch_size=self.vbs,
      compute_dtype=self.out_dtype,
    )
    ref_config = dict(
      epsilon=epsilon,
      momentum=momentum,
      fused_resolved=fused,
      **{k: v for k, v in config.items() if k != "fused"},
    )
    state0 = _state(variables)
    assert all(np.all(state0[k] == 1.0) for k in ("moving_stddev", "renorm_stddev") if k in state0)
    self.expected, self.state = reference.keras_v1_reference(
      self.x64, state0, training=True, **ref_config
    )
    self.expected_infer, _ = reference.keras_v1_reference(self.x64, self.state, **ref_config)

  def _feature(self, value):
    axes = reference.feature_axes(self.axis, self.x64.ndim)
    return reference.broadcast_feature(value, axes, self.x64.ndim)

  def channel_bounds(self):
    """Per channel, what float32 two-pass arithmetic can deliver (feature-shaped arrays).

    The float32 batch mean is off by up to ``dmu`` = 2 ulps of the channel's largest value;
    the two-pass variance then carries ``dmu**2`` (plus rounding), and ``sigma = sqrt(var +
    eps)`` carries ``dvar / (2 sigma)``. Everything the layer computes inherits these.
    """
    x = self.x64
    axes = reference.feature_axes(self.axis, x.ndim)
    others = reference.reduction_axes(axes, x.ndim)
    xs = reference.split_ghost_batches(x, self.vbs) if self.vbs else x
    fax = tuple(a + 1 for a in axes) if self.vbs else axes
    red = tuple(a for a in reference.reduction_axes(fax, xs.ndim) if not (self.vbs and a == 1))
    _, var = reference.moments(xs, red)
    features = reference.feature_shape(x.shape, self.axis)
    group_axes = reference.reduction_axes(fax, xs.ndim)
    var_min = np.min(var, axis=group_axes).reshape(features)
    var_max = np.max(var, axis=group_axes).reshape(features)
    ulp = np.spacing(np.max(np.abs(x), axis=others).astype(np.float32)).astype(np.float64)
    dmu = 2.0 * ulp.reshape(features)
    dvar = dmu**2 + 1e-5 * var_max
    sigma = np.sqrt(var_min + self.epsilon)
    dsig = dvar / (2.0 * sigma) + 1e-6 * sigma
    count = xs.size // max(1, math.prod(features)) // (xs.shape[1] if self.vbs else 1)
    return {"dmu": dmu, "dvar": dvar, "sigma": sigma, "dsig": dsig, "count": count}

  def check(self):
    """Finite results, no negative statistic, every error within the float32 bound."""
    b = self.channel_bounds()
    y, y_infer = _f64(self.y), _f64(self.y_infer)
    assert self.y.dtype == self.out_dtype and self.y_infer.dtype == self.out_dtype
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(y_infer))
    rounding = 1e-5
    if self.out_dtype.itemsize < 4:
      rounding += float(jnp.finfo(self.out_dtype).eps)

    # Training: y = x_hat * r + d (renorm: r = sigma_B / 1, d = mu_B / 1 with the initial
    # renorm statistics), x_hat = (x - mu) / sigma with |x_hat| <= sqrt(count).
    xhat = math.sqrt(b["count"])
    r = np.maximum(1.0, b["sigma"])
    dxhat = (b["dmu"] + xhat * b["dsig"]) / b["sigma"]
    bound = self._feature(dxhat * r + xhat * b["dsig"] + b["dmu"])
    bound = bound + rounding * np.maximum(1.0, np.abs(self.expected))
    _assert_within(y, self.expected, bound, "training output")

    # Statistics after the step.
    stats = {k: np.asarray(v, np.float64) for k, v in self.stats.items()}
    for name, value in stats.items():
      expected = self.state[name]
      assert np.all(np.isfinite(value)), name
      if name in ("moving_variance", "moving_stddev", "renorm_stddev"):
        assert np.all(value >= 0), f"negative {name}"
      if name in ("moving_mean", "renorm_mean"):
        error = b["dmu"]
      elif name == "moving_variance":
        ms = self.state.get("moving_stddev", 0.0)
        error = 2.0 * b["dvar"] + 2.0 * (np.abs(ms) + b["dsig"]) * b["dsig"]
      else:
        error = b["dsig"]
      _assert_within(value, expected, error + 1e-6 * np.abs(expected), name)

    # Inference: (x - mm) / sqrt(mv + eps) with the statistics above.
    s = np.sqrt(self.state["moving_variance"] + self.epsilon)
    dmm = b["dmu"] + 1e-6 * np.abs(self.state["moving_mean"])
    dmv = 2.0 * b["dvar"] + 2.0 * (1.0 + b["dsig"]) * b["dsig"] + 1e-6 * s**2
    mag = np.abs(self.expected_infer)
    bound = self._feature((dmm + b["dmu"]) / s) + mag * self._feature(dmv / (2 * s**2))
    bound = bound + rounding * np.maximum(1.0, mag)
    _assert_within(y_infer, self.expected_infer, bound, "inference output")


def _assert_within(actual, expected, bound, what):
  excess = np.abs(actual - expected) - bound
  worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
  if excess.size and excess[worst] > 0:
    error = np.abs(actual - expected)[worst]
    limit = np.broadcast_to(bound, excess.shape)[worst]
    raise AssertionError(f"{what}: error {error:.3g} > bound {limit:.3g} at {worst}")


@pytest.mark.parametrize("epsilon", [1e-3, 1e-8])
@pytest.mark.parametrize(
  "shape, config",
  [
    ((64, 3), {}),
    ((4, 4, 4, 3), {}),
    ((4, 4, 4, 3), {"fused": False}),
    ((64, 3), {"renorm": True}),
  ],
  ids=["rank2", "rank4_fused", "rank4_nonfused", "renorm"],
)
def test_large_mean_small_std_float32(shape, config, epsilon, rng):
  """Mean 1e4, std 1e-2 in float32: a one-pass ``E[x^2] - E[x]^2`` would lose the variance
  entirely (float32 spacing at 1e8 is 8); the two-pass moments keep it to float32 accuracy."""
  x = (1e4 + 1e-2 * rng.normal(size=shape)).astype(np.float32)
  hard = _Hard(x, epsilon=epsilon, momentum=0.0, **config)  # statistics = batch statistics
  hard.check()
  variance = np.asarray(hard.stats["moving_variance"], np.float64)
  expected = hard.state["moving_variance"]
  # Beyond the per-element bound of `check`, in plain numbers: the float32 mean is up to 2e-3
  # (0.2 standard deviations) off, so the variance is off by up to (2e-3 / 1e-2)**2 = 4% and
  # the output by about 0.25. One-pass moments would be off by orders of magnitude: the
  # float32 spacing of E[x^2] = 1e8 is 8, the variance 1e-4.
  np.testing.assert_allclose(variance, expected, rtol=0.05)
  assert np.max(np.abs(_f64(hard.y) - hard.expected)) < 0.5


@pytest.mark.parametrize("out", ["float32", "same"])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(64, 3), (4, 4, 4, 3)], ids=["rank2", "rank4_fused"])
def test_large_mean_16_bit(shape, dtype, out, rng):
  """Mean 1e3 in float16/bfloat16: reduced in float32, so as exact as the stored values."""
  x = jnp.asarray((1e3 + 8.0 * rng.normal(size=shape)).astype(np.float32)).astype(dtype)
  out_dtype = jnp.float32 if out == "float32" else dtype
  hard = _Hard(x, dtype=None if out == "float32" else dtype)
  assert hard.out_dtype == out_dtype
  hard.check()


@pytest.mark.parametrize("out", ["float32", "float16"])
@pytest.mark.parametrize("spread", ["near_max", "full_range"])
def test_values_near_float16_max(spread, out, rng):
  """Values near 65504: squares overflow float16, so statistics must live in float32."""
  if spread == "near_max":
    values = 6.0e4 + 2.0e3 * rng.normal(size=(32, 3))
  else:
    values = rng.uniform(-65504, 65504, size=(32, 3))
  x = jnp.asarray(np.clip(values, -65504, 65504).astype(np.float16))
  out_dtype = jnp.float32 if out == "float32" else jnp.float16
  hard = _Hard(x, dtype=None if out == "float32" else jnp.float16)
  assert hard.out_dtype == out_dtype
  hard.check()
  assert float(np.max(hard.stats["moving_variance"])) > 6e4  # float16 could not hold it


@pytest.mark.parametrize("epsilon", [1e-3, 1e-8])
@pytest.mark.parametrize(
  "shape, config",
  [
    ((8, 3), {}),
    ((2, 2, 2, 3), {}),
    ((8, 3), {"renorm": True}),
    ((8, 3), {"virtual_batch_size": 4}),
  ],
  ids=["rank2", "rank4_fused", "renorm", "ghost"],
)
def test_constant_channels(shape, config, epsilon, rng):
  """Variance 0: no NaN, statistics >= 0, and without renorm the output is beta = 0 up to the
  rounding of Keras's ``x * inv + (beta - mean * inv)`` (``inv = 1/sqrt(eps)``)."""
  x = rng.normal(size=shape).astype(np.float32)
  x[..., 0] = 0.1  # not representable: the float32 mean may differ from it by an ulp
  x[..., 1] = 3.0e3
  hard = _Hard(x, epsilon=epsilon, **config)
  hard.check()
  np.testing.assert_array_equal(hard.state["moving_variance"][:2] >= 0, True)
  if not config.get("renorm"):  # renorm adds d = (mean - renorm_mean) / renorm_stddev
    ulp = np.spacing(np.float32([0.1, 3.0e3])).astype(np.float64)
    bound = 4 * ulp / math.sqrt(epsilon)
    assert np.all(np.abs(_f64(hard.y)[..., :2]) <= bound)


@pytest.mark.parametrize(
  "shape, config",
  [
    ((1, 4), {}),
    ((1, 3, 3, 2), {}),
    ((1, 1, 1, 2), {}),
    ((1, 4), {"renorm": True}),
    ((4, 3), {"virtual_batch_size": 1}),
    ((1, 5, 3), {"axis": 1}),
  ],
  ids=["rank2", "rank4_fused", "rank4_fused_n1", "renorm", "ghost_vbs1", "rank3_axis1"],
)
def test_batch_of_one(shape, config, rng):
  """A batch of one sample (or ghost batches of one): finite, exact, variance never negative."""
  x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
  _Hard(x, **config).check()


def test_tiny_epsilon_random_data(rng):
  """epsilon 1e-8 on ordinary data: float32 accuracy (no epsilon clamp, as in TF >= 2.15)."""
  x = rng.normal(size=(16, 4, 4, 3)).astype(np.float32)
  for config in ({}, {"fused": False}):
    hard = _Hard(x, epsilon=1e-8, **config)
    hard.check()
    np.testing.assert_allclose(_f64(hard.y), hard.expected, atol=2e-5)


# --------------------------------------------------------------------------------------------
# Empty batches
# --------------------------------------------------------------------------------------------

EMPTY_CASES = {
  "rank2": ((0, 3), {}, None, ()),
  "rank4_fused": ((0, 2, 2, 3), {}, None, ()),
  "rank4_nonfused": ((0, 2, 2, 3), {"fused": False}, None, ()),
  "multi_axis": ((0, 2, 3), {"axis": [1, 2]}, None, ()),
  "renorm": ((0, 3), {"renorm": True, "renorm_clipping": {"rmax": 2.0}}, None, ()),
  "ghost": ((0, 3), {"virtual_batch_size": 2}, None, ()),
  "ghost_renorm": ((0, 3), {"virtual_batch_size": 2, "renorm": True}, None, ()),
  "adjustment": (
    (0, 3),
    {"adjustment": lambda shape: (jnp.full(3, 2.0), jnp.ones(3))},
    None,
    (),
  ),
  "mask": ((0, 5, 3), {}, "mask", ()),
}


def _random_stats(variables, rng):
  """Non-default statistics, so that "unchanged" cannot pass by accident."""
  stats = {
    k: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), jnp.float32)
    for k, v in variables["batch_stats"].items()
  }
  return {**variables, "batch_stats": stats}


def _empty_step(name, jit, rng):
  """A training step (loss = sum(y)) on an empty batch: ``(variables, grads, y, updates)``."""
  shape, config, mask, _ = EMPTY_CASES[name]
  layer = BN(momentum=0.5, **config)
  variables = _random_stats(layer.init(KEY, jnp.ones((4,) + shape[1:])), rng)
  x = jnp.zeros(shape, jnp.float32)
  kwargs = {"mask": jnp.zeros(shape[:-1])} if mask else {}

  def step(variables, x):
    def loss(params):
      y, updates = _train(layer, {**variables, "params": params}, x, **kwargs)
      return jnp.sum(y), (y, updates)

    return jax.grad(loss, has_aux=True)(variables["params"])

  grads, (y, updates) = (jax.jit(step) if jit else step)(variables, x)
  return variables, grads, y, updates


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(EMPTY_CASES))
def test_empty_batch_leaves_statistics_unchanged(name, jit, rng):
  """Deliberate difference from Keras (spec §4.4), whose statistics become NaN."""
  variables, _, y, updates = _empty_step(name, jit, rng)
  assert y.shape == EMPTY_CASES[name][0] and y.dtype == jnp.float32
  for stat, value in updates["batch_stats"].items():
    np.testing.assert_array_equal(value, variables["batch_stats"][stat], err_msg=stat)


@pytest.mark.parametrize(
  "name", [pytest.param(n, marks=c[3]) for n, c in sorted(EMPTY_CASES.items())]
)
def test_empty_batch_gradients_are_zero(name, rng):
  """``sum(y)`` over no elements does not depend on gamma or beta: the gradients are 0, so an
  optimizer step on an empty batch changes nothing (no NaN leaks in through NaN moments)."""
  _, grads, _, _ = _empty_step(name, True, rng)
  for grad in jax.tree.leaves(grads):
    np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_empty_batch_inference():
  layer = BN()
  variables = layer.init(KEY, jnp.ones((2, 3)))
  y = layer.apply(variables, jnp.zeros((0, 3)))
  assert y.shape == (0, 3)


def test_empty_reduced_axis_leaves_statistics_unchanged():
  """A non-empty batch with an empty reduced axis (B, 0, C) reduces over nothing either: its NaN
  moments must not reach the moving statistics (the guard counts elements per channel)."""
  layer = BN(momentum=0.5)
  variables = layer.init(KEY, jnp.ones((4, 2, 3)))
  _, updates = _train(layer, variables, jnp.zeros((4, 0, 3)))
  for stat, value in updates["batch_stats"].items():
    np.testing.assert_array_equal(value, variables["batch_stats"][stat], err_msg=stat)


def test_zero_features_train():
  """Zero channels (B, 0) train without dividing by the (zero) number of channels."""
  layer = BN()
  variables = layer.init(KEY, jnp.ones((4, 0)))
  y, updates = _train(layer, variables, jnp.ones((4, 0)))
  assert y.shape == (4, 0) and updates["batch_stats"]["moving_mean"].shape == (0,)


# --------------------------------------------------------------------------------------------
# NaN and Inf
# --------------------------------------------------------------------------------------------


def _poisoned_input(rng):
  x = rng.normal(size=(6, 4)).astype(np.float32)
  x[2, 0] = np.nan
  x[4, 1] = np.inf
  x[1, 2] = -np.inf
  return x  # channel 3 is clean


@pytest.mark.parametrize("config", [{}, {"renorm": True}], ids=["plain", "renorm"])
def test_nan_inf_propagate_to_affected_channels_only(config, rng):
  """Documented behaviour: no error; NaN/Inf spread over the output and the statistics of the
  channels they touch (through the batch moments), and nowhere else."""
  x = _poisoned_input(rng)
  layer = BN(momentum=0.5, **config)
  variables = layer.init(KEY, jnp.ones((6, 4)))
  y, updates = _train(layer, variables, jnp.asarray(x))
  y = np.asarray(y)
  assert np.all(np.isnan(y[:, :3]))
  expected, state = reference.keras_v1_reference(
    x[:, 3:].astype(np.float64),
    {k: v[3:] for k, v in _state(variables).items()},
    momentum=0.5,
    training=True,
    **config,
  )
  np.testing.assert_allclose(y[:, 3:], expected, rtol=1e-5, atol=1e-6)
  for name, value in updates["batch_stats"].items():
    value = np.asarray(value)
    assert not np.any(np.isfinite(value[:3])), name
    np.testing.assert_allclose(value[3:], state[name], rtol=1e-6, err_msg=name)


def test_nan_in_inference_stays_elementwise(rng):
  """In inference the moving statistics are used, so a NaN only affects its own element."""
  x = _poisoned_input(rng)
  layer = BN()
  variables = layer.init(KEY, jnp.ones((6, 4)))
  y = np.asarray(layer.apply(variables, jnp.asarray(x)))
  np.testing.assert_array_equal(np.isfinite(y), np.isfinite(x))


def test_diagnostics_find_and_contain_nonfinite_statistics(rng):
  layer = BN(momentum=0.5, renorm=True)
  variables = layer.init(KEY, jnp.ones((6, 4)))
  _, updates = _train(layer, variables, jnp.asarray(_poisoned_input(rng)))

  marks = diagnostics.nonfinite_statistics(updates)
  for name, mark in marks["batch_stats"].items():
    np.testing.assert_array_equal(mark, [True, True, True, False], err_msg=name)
  assert bool(diagnostics.has_nonfinite(updates))
  assert bool(jax.jit(diagnostics.has_nonfinite)(updates))
  assert not bool(diagnostics.has_nonfinite(variables))
  assert not bool(diagnostics.has_nonfinite({}))

  with pytest.raises(FloatingPointError, match=r"\['batch_stats'\]\['moving_mean'\] at \[\(0,\)"):
    diagnostics.assert_finite(updates)
  diagnostics.assert_finite(variables)  # no error

  previous = {"batch_stats": variables["batch_stats"]}
  kept = jax.jit(diagnostics.keep_finite)(updates, previous)
  for name, value in kept["batch_stats"].items():
    np.testing.assert_array_equal(value[:3], previous["batch_stats"][name][:3], err_msg=name)
    np.testing.assert_array_equal(value[3], updates["batch_stats"][name][3], err_msg=name)
  assert not bool(diagnostics.has_nonfinite(kept))


def test_diagnostics_ignore_integer_leaves():
  tree = {"step": jnp.asarray(3), "x": jnp.asarray([1.0, jnp.inf])}
  np.testing.assert_array_equal(diagnostics.nonfinite_statistics(tree)["step"], False)
  np.testing.assert_array_equal(diagnostics.nonfinite_statistics(tree)["x"], [False, True])
  kept = diagnostics.keep_finite(tree, {"step": jnp.asarray(0), "x": jnp.asarray([0.0, 2.0])})
  assert int(kept["step"]) == 3
  np.testing.assert_array_equal(kept["x"], [1.0, 2.0])


# --------------------------------------------------------------------------------------------
# Compilation: no silent retracing, no leaked tracers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _count_compilations():
  """Counts XLA backend compilations (JAX's own monitoring event) inside the block."""
  compiled = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiled
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _train_step(layer):
  def loss(params, stats, x):
    y, updates = _train(layer, {"params": params, "batch_stats": stats}, x)
    return jnp.sum(jnp.square(y)), updates["batch_stats"]

  def step(params, stats, x):
    grads, stats = jax.grad(loss, has_aux=True)(params, stats, x)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return params, stats

  return step


@pytest.mark.parametrize(
  "config",
  [{}, {"renorm": True}, {"virtual_batch_size": 2}],
  ids=["plain", "renorm", "ghost"],
)
def test_train_step_compiles_once(config, rng):
  layer = BN(**config)
  variables = layer.init(KEY, jnp.ones((8, 4, 3)))
  params, stats = variables["params"], variables["batch_stats"]
  batches = [rng.normal(size=(8, 4, 3)).astype(np.float32) for _ in range(4)]
  traces = []

  def counted(*args):
    traces.append(1)
    return _train_step(layer)(*args)

  step = jax.jit(counted)
  with _count_compilations() as compiled, jax.checking_leaks():
    for x in batches:
      params, stats = step(params, stats, x)
  assert len(traces) == 1
  assert len(compiled) == 1
  assert not bool(diagnostics.has_nonfinite(stats))


def test_training_flag_is_static_and_compiles_once_per_value(rng):
  """A Python bool `training` selects one of two programs; repeated calls reuse them."""
  layer = BN()
  variables = layer.init(KEY, jnp.ones((8, 3)))
  x = rng.normal(size=(8, 3)).astype(np.float32)

  def forward(variables, x, training):
    if training:
      return _train(layer, variables, x)[0]
    return layer.apply(variables, x, training=False)

  step = jax.jit(forward, static_argnames="training")
  with _count_compilations() as compiled, jax.checking_leaks():
    outputs = [step(variables, x, training=t) for t in (True, False, True, False, True)]
  assert len(compiled) == 2
  np.testing.assert_array_equal(outputs[0], outputs[2])
  np.testing.assert_array_equal(outputs[1], outputs[3])
  assert not np.array_equal(outputs[0], outputs[1])


def test_traced_training_flag_is_a_clear_type_error():
  layer = BN()
  variables = layer.init(KEY, jnp.ones((4, 3)))
  step = jax.jit(lambda v, x, t: layer.apply(v, x, training=t))
  with pytest.raises(TypeError, match=r"`training`=.* must be a Python bool.*static_argnames"):
    step(variables, jnp.ones((4, 3)), True)


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "config",
  [
    pytest.param({}, id="plain"),
    pytest.param(
      {"renorm": True, "renorm_clipping": {"rmax": 2.0}}, id="renorm", marks=pytest.mark.slow
    ),
    pytest.param({"virtual_batch_size": 4}, id="ghost", marks=pytest.mark.slow),
  ],
)
def test_two_runs_are_bit_identical(config, rng):
  """Same inputs, fresh compilation each time: bit-identical outputs, gradients, statistics."""
  x = rng.normal(size=(16, 5, 3)).astype(np.float32) * 3 + 2

  def run():
    layer = BN(momentum=0.9, **config)
    variables = layer.init(KEY, jnp.asarray(x))

    @jax.jit
    def step(params, stats, x):
      def loss(params):
        y, updates = _train(layer, {"params": params, "batch_stats": stats}, x)
        return jnp.sum(y * y), (y, updates["batch_stats"])

      return jax.grad(loss, has_aux=True)(params)

    params, stats = variables["params"], variables["batch_stats"]
    results = []
    for _ in range(3):
      grads, (y, stats) = step(params, stats, x)
      results.append((y, grads, stats))
    return jax.tree.map(np.asarray, results)

  first = run()
  jax.clear_caches()
  second = run()
  jax.tree.map(np.testing.assert_array_equal, first, second)
