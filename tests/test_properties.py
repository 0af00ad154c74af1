"""Property tests: random configurations against the float64 reference.

Each example draws a rank (1-5), a shape with size-1 dims, a set of feature axes (spelled
positive or negative, in any order), center/scale, momentum, epsilon, renorm with a random
subset of clipping keys, a ghost batch that divides the batch, an adjustment, a mask, `fused`,
`trainable`, the input dtype (float32, float16, bfloat16) and the layer dtype, plus random
initial variables. It then checks, against `tests/reference.py`:

* two training steps: outputs, gradients of ``sum(y * dy)`` w.r.t. input, gamma and beta, and
  every statistic after each step;
* inference with the final statistics.

Every example runs through the linen Module and the NNX Module (both front-ends).

Profiles (select with ``HYPOTHESIS_PROFILE``):

* ``ci`` (default): a fixed, derandomized set of examples, about 30 s on two CPU cores;
* ``long``: thousands of random examples, for a run on demand, e.g.
  ``HYPOTHESIS_PROFILE=long pytest tests/test_properties.py``.

Tolerances follow the float32 error model of batch norm: a result is compared with
``|actual - expected| <= rel * max(1, max|expected|)`` where ``rel = 32 u (1 + max|x| /
sqrt(epsilon))`` (``u`` is float32's unit roundoff; ``1/sqrt(epsilon)`` bounds ``1/sigma``, so
the factor bounds the size of the intermediate terms ``x * rsqrt(var + eps)`` that Keras's
arithmetic form rounds), plus the rounding of a 16-bit result dtype where one applies.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kbn_jax
import kbn_jax.nnx
from tests import reference

_PROFILES = {
  "ci": {"max_examples": 40, "derandomize": True, "database": None},
  "long": {"max_examples": 3000},
}
_PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if _PROFILE_NAME not in _PROFILES:
  raise ValueError(f"HYPOTHESIS_PROFILE={_PROFILE_NAME!r}; choose one of {sorted(_PROFILES)}")
PROFILE = settings(
  deadline=None,
  print_blob=True,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  **_PROFILES[_PROFILE_NAME],
)

_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
_U32 = 2.0**-24  # float32 unit roundoff


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


@st.composite
def _axis_spelling(draw, feature_axes, rank):
  """`feature_axes` written as Keras users do: an int or a list/tuple, negatives, any order."""
  spelled = [a - rank if draw(st.booleans()) else a for a in feature_axes]
  if len(spelled) == 1 and draw(st.booleans()):
    return spelled[0]
  ordered = draw(st.permutations(spelled))
  return list(ordered) if draw(st.booleans()) else tuple(ordered)


@st.composite
def configurations(draw):
  """One random layer configuration with matching inputs (all data from a drawn seed)."""
  rank = draw(st.integers(1, 5))
  n_features = draw(st.integers(1, min(rank, 2)))
  features = sorted(
    draw(st.lists(st.integers(0, rank - 1), min_size=n_features, max_size=n_features, unique=True))
  )
  shape = [draw(st.integers(1, 4)) for _ in range(rank)]
  vbs = None
  if rank >= 2 and 0 not in features and draw(st.integers(0, 3)) == 0:
    vbs = draw(st.integers(1, 4))
    shape[0] = vbs * draw(st.integers(1, 3))
  adjustment = None
  if vbs is None and draw(st.integers(0, 3)) == 0:
    adjustment = draw(st.sampled_from(["features", "full"]))
  renorm = draw(st.integers(0, 2)) == 0
  clipping = None
  if renorm:
    clipping = draw(
      st.fixed_dictionaries(
        {},
        optional={
          "rmax": st.floats(0.5, 3.0),
          "rmin": st.floats(0.2, 2.0),  # rmin > rmax is legal: rmin applies first
          "dmax": st.floats(0.0, 2.0),
        },
      )
    )
  input_dtype = draw(st.sampled_from(sorted(_DTYPES)))
  layer_dtype = None if input_dtype == "float32" else draw(st.sampled_from([None, input_dtype]))
  config = {
    "axis": draw(_axis_spelling(features, rank)),
    "momentum": draw(st.one_of(st.sampled_from([0.0, 0.5, 0.99, 1.0]), st.floats(0.0, 1.0))),
    "epsilon": draw(st.one_of(st.sampled_from([1e-4, 1e-3, 0.1]), st.floats(1e-4, 1.0))),
    "center": draw(st.booleans()),
    "scale": draw(st.booleans()),
    "renorm": renorm,
    "renorm_clipping": clipping,
    "renorm_momentum": draw(st.sampled_from([0.0, 0.5, 0.9, 0.99])),
    "fused": draw(st.sampled_from([None, True, False])),
    "trainable": draw(st.integers(0, 4)) > 0,
    "virtual_batch_size": vbs,
  }
  out_dtype = np.dtype(_DTYPES[layer_dtype or "float32"])
  fused = reference.v1_fused(
    axis=config["axis"],
    rank=rank,
    renorm=renorm,
    virtual_batch_size=vbs,
    adjustment=adjustment,
    fused=config["fused"],
    compute_dtype=out_dtype,
  )
  use_mask = rank >= 2 and vbs is None and not fused and draw(st.integers(0, 3)) == 0
  return {
    "config": config,
    "shape": tuple(shape),
    "features": tuple(features),
    "adjustment": adjustment,
    "mask": use_mask,
    "fused": fused,
    "input_dtype": input_dtype,
    "layer_dtype": layer_dtype,
    "renorm_floor": renorm and draw(st.integers(0, 4)) == 0,
    "seed": draw(st.integers(0, 2**32 - 1)),
  }


# --------------------------------------------------------------------------------------------
# Building an example
# --------------------------------------------------------------------------------------------


def _random_state(rng, features, case):
  """Random float32 initial variables (so initial values matter), as float64 for the reference."""
  config = case["config"]
  uniform = lambda low, high: rng.uniform(low, high, features).astype(np.float32)  # noqa: E731
  state = {"moving_mean": uniform(-1, 1), "moving_variance": uniform(0.5, 2.0)}
  if config["scale"]:
    state["gamma"] = uniform(-1.5, 1.5)
  if config["center"]:
    state["beta"] = uniform(-1, 1)
  if config["renorm"]:
    state["moving_stddev"] = uniform(0.7, 1.4)
    state["renorm_mean"] = uniform(-1, 1)
    # Sometimes below the sqrt(epsilon) floor of the renorm correction.
    state["renorm_stddev"] = (
      np.zeros_like(state["moving_mean"]) if case["renorm_floor"] else (uniform(0.5, 1.5))
    )
  return {name: value.astype(np.float64) for name, value in state.items()}


def _inputs(rng, case, shape):
  """An input of the case's dtype (values exactly representable) and its float64 copy."""
  x = rng.uniform(-2, 2) + rng.uniform(0.5, 2.0) * rng.normal(size=shape)
  x = jnp.asarray(x.astype(np.float32)).astype(_DTYPES[case["input_dtype"]])
  return x, np.asarray(x.astype(jnp.float32), np.float64)


def _adjustment(rng, case, shape, features):
  if case["adjustment"] is None:
    return None
  if case["adjustment"] == "full":
    adj_shape = shape
  else:
    adj_shape = tuple(s if a in features else 1 for a, s in enumerate(shape))
  adj_scale = rng.uniform(0.5, 1.5, adj_shape).astype(np.float32)
  adj_bias = rng.uniform(-0.5, 0.5, adj_shape).astype(np.float32)
  return adj_scale, adj_bias


def _reference_config(case, adjustment, mask):
  config = dict(case["config"])
  config.pop("fused")
  return {**config, "fused_resolved": case["fused"], "adjustment": adjustment, "mask": mask}


def _layer(case, adjustment):
  config = dict(case["config"])
  if adjustment is not None:
    adj_scale, adj_bias = (jnp.asarray(a) for a in adjustment)
    config["adjustment"] = lambda shape: (adj_scale, adj_bias)
  layer_dtype = case["layer_dtype"]
  return kbn_jax.BatchNormalization(
    **config, dtype=None if layer_dtype is None else _DTYPES[layer_dtype]
  )


def _variables(state):
  params = {k: jnp.asarray(v, jnp.float32) for k, v in state.items() if k in ("gamma", "beta")}
  stats = {k: jnp.asarray(v, jnp.float32) for k, v in state.items() if k not in params}
  return params, stats


def _train_step(layer, mask):
  """A jitted training step returning ``(y, updated_stats, grad_params, grad_x)``."""

  def loss(params, stats, x, dy):
    variables = {"params": params, "batch_stats": stats} if params else {"batch_stats": stats}
    y, updates = layer.apply(variables, x, training=True, mask=mask, mutable=["batch_stats"])
    return jnp.sum(y.astype(jnp.float32) * dy), (y, updates["batch_stats"])

  @jax.jit
  def step(params, stats, x, dy):
    grads, (y, new_stats) = jax.grad(loss, argnums=(0, 2), has_aux=True)(params, stats, x, dy)
    return y, new_stats, grads[0], grads[1]

  return step


def _nnx_steps(layer, mask, params, stats):
  """The same step and inference through the NNX Module built from the linen one."""
  variables = {"params": params, "batch_stats": stats} if params else {"batch_stats": stats}
  module = kbn_jax.nnx.BatchNormalization.from_linen(layer, variables)
  names = [n for n in ("gamma", "beta") if n in params]

  @nnx.jit
  def run(module, x, dy):
    def loss(module, x):
      y = module(x, training=True, mask=mask)
      return jnp.sum(y.astype(jnp.float32) * dy), y

    (grad_module, grad_x), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(module, x)
    return y, {n: getattr(grad_module, n)[...] for n in names}, grad_x

  def step(params, stats, x, dy):
    module.load_variables({"params": params, "batch_stats": stats})
    y, grad_params, grad_x = run(module, x, dy)
    return y, module.linen_variables()["batch_stats"], grad_params, grad_x

  def infer(params, stats, x):
    module.load_variables({"params": params, "batch_stats": stats})
    return module(x, training=False)

  return step, infer


def _linen_steps(layer, mask):
  def infer(params, stats, x):
    return layer.apply(
      {"params": params, "batch_stats": stats} if params else {"batch_stats": stats}, x
    )

  return _train_step(layer, mask), infer


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def _rel_tolerance(x64, epsilon, *dtypes):
  """Float32 error model (module docstring), plus one rounding of any 16-bit dtype involved."""
  rel = 32 * _U32 * (1.0 + np.max(np.abs(x64), initial=0.0) / math.sqrt(epsilon))
  for dtype in dtypes:
    if np.dtype(dtype).itemsize < 4:
      rel += 2 * float(jnp.finfo(dtype).eps)
  return rel


def _assert_close(actual, expected, rel, what):
  actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  bound = rel * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
  error = float(np.max(np.abs(actual - expected), initial=0.0))
  assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} (rel {rel:.3g})"


def _assert_state_close(actual_stats, expected_state, rel, what):
  expected_stats = {k: v for k, v in expected_state.items() if k not in ("gamma", "beta")}
  assert set(actual_stats) == set(expected_stats), what
  for name, expected in expected_stats.items():
    _assert_close(actual_stats[name], expected, rel, f"{what} {name}")
    if name == "moving_variance":
      assert np.all(np.asarray(actual_stats[name]) >= 0), f"{what}: negative {name}"


# --------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("front_end", ["linen", "nnx"])
@PROFILE
@given(case=configurations())
def test_layer_matches_float64_reference(front_end, case):
  _check_against_reference(front_end, case)


@settings(PROFILE, max_examples=12)
@given(case=configurations())
def test_layer_matches_float64_reference_on_a_dozen_cases(case):
  """The default tier's sample of the property (the slow tier draws 40 cases per front-end)."""
  _check_against_reference("linen", case)


def _check_against_reference(front_end, case):
  rng = np.random.default_rng(case["seed"])
  shape = case["shape"]
  features = case["features"]
  feature_shape = tuple(shape[a] for a in features)
  state0 = _random_state(rng, feature_shape, case)
  (x0, x0_64), (x1, x1_64) = _inputs(rng, case, shape), _inputs(rng, case, shape)
  dy0, dy1 = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
  adjustment = _adjustment(rng, case, shape, features)
  mask = (rng.uniform(size=shape[:-1]) < 0.7).astype(np.float32) if case["mask"] else None
  ref_config = _reference_config(case, adjustment, mask)

  layer = _layer(case, adjustment)
  variables = layer.init(jax.random.key(0), x0)
  params, stats = _variables(state0)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
    jnp.shape, {"params": params, "batch_stats": stats} if params else {"batch_stats": stats}
  )
  mask_array = None if mask is None else jnp.asarray(mask)
  if front_end == "nnx":
    step, infer = _nnx_steps(layer, mask_array, params, stats)
  else:
    step, infer = _linen_steps(layer, mask_array)
  out_dtype = np.dtype(_DTYPES[case["layer_dtype"] or "float32"])
  input_dtype = np.dtype(_DTYPES[case["input_dtype"]])
  epsilon = case["config"]["epsilon"]

  state = state0
  for k, (x, x64, dy) in enumerate(((x0, x0_64, dy0), (x1, x1_64, dy1))):
    y, stats, grad_params, grad_x = step(params, stats, x, jnp.asarray(dy))
    expected_grads = reference.keras_v1_gradients(x64, state, dy, training=True, **ref_config)
    expected_y, state = reference.keras_v1_reference(x64, state, training=True, **ref_config)
    rel = _rel_tolerance(x64, epsilon)
    assert y.dtype == out_dtype
    assert grad_x.dtype == input_dtype
    _assert_close(y, expected_y, _rel_tolerance(x64, epsilon, out_dtype), f"step {k} y")
    _assert_close(
      grad_x,
      expected_grads["x"],
      _rel_tolerance(x64, epsilon, out_dtype, input_dtype),
      f"step {k} grad x",
    )
    for name in ("gamma", "beta"):
      assert (name in grad_params) == (name in expected_grads)
      if name in grad_params:
        # A sum over the reduced elements: allow the rounding of each term.
        count = max(1, x64.size // max(1, math.prod(feature_shape)))
        grad_rel = _rel_tolerance(x64, epsilon, out_dtype) * math.sqrt(count)
        _assert_close(grad_params[name], expected_grads[name], grad_rel, f"step {k} grad {name}")
    _assert_state_close(stats, state, rel, f"step {k}")

  y_infer = infer(params, stats, x1)
  expected_infer, _ = reference.keras_v1_reference(x1_64, state, training=False, **ref_config)
  _assert_close(y_infer, expected_infer, _rel_tolerance(x1_64, epsilon, out_dtype), "inference y")
