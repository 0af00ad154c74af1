"""Fixture replay for any front-end given as ``apply(variables, x, training, mask) -> (y, stats)``.

``make_apply(layer)`` turns a linen `kbn_jax.BatchNormalization` (built from a fixture the way
the fixture suites build it) into that function; `keras_v1_errors` replays one of the 78 tf_keras
V1 fixtures (`tests/oracles/keras_parity`) and `framework_errors` one of the V2 / Keras 3 / PyTorch
fixtures (`tests/oracles/framework_parity`, through its own `replay`). Both compare every training
step's output, input and parameter gradients and statistics, and the final inference output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.oracles.framework_parity import test_framework_parity
from tests.oracles.keras_parity import test_parity

Apply = Callable[[dict, jax.Array, bool, Any], tuple[jax.Array, dict]]


def keras_v1_errors(name: str, make_apply: Callable[[Any], Apply]) -> dict[str, float]:
  """Replays V1 fixture `name` through ``make_apply(layer)``; returns the largest errors."""
  meta, arrays = test_parity.load_case(name)
  layer = test_parity.build_layer(meta, arrays)
  variables = test_parity.initial_variables(layer, meta, arrays)
  apply = make_apply(layer)
  mask = jnp.asarray(arrays["mask"]) if "mask" in arrays else None
  tolerance = test_parity._tolerance(meta["compute_dtype"], meta["case"])
  errors: dict[str, float] = {}

  def record(quantity, actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    actual = actual.reshape(expected.shape)
    error = float(np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1.0)))
    assert error <= tolerance, f"{name}: {quantity} off by {error:.3g} (tolerance {tolerance})"
    errors[quantity] = max(errors.get(quantity, 0.0), error)

  @jax.jit
  def step(variables, x, dy):
    def loss(params, x):
      y, stats = apply({**variables, "params": params}, x, True, mask)
      return jnp.sum(y.astype(jnp.float32) * dy), (y, stats)

    (grad_params, grad_x), (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
      variables["params"], x
    )
    return y, stats, grad_x, grad_params

  for k in range(meta["case"]["steps"]):
    x, dy = jnp.asarray(arrays[f"x_{k}"]), jnp.asarray(arrays[f"dy_{k}"])
    y, stats, grad_x, grad_params = step(variables, x, dy)
    assert y.dtype == jnp.dtype(meta["output_dtype"]), (name, y.dtype)
    record("output", y, arrays[f"y_{k}"])
    record("grad_x", grad_x, arrays[f"grad_x_{k}"])
    for weight, value in grad_params.items():
      record(f"grad_{weight}", value, arrays[f"grad_{weight}_{k}"])
    for weight in meta["weight_names"]:
      if weight not in ("gamma", "beta"):
        record(weight, stats[weight], arrays[f"w{k + 1}_{weight}"])
    variables = {**variables, "batch_stats": stats}
  y_infer, _ = jax.jit(lambda v, x: apply(v, x, False, None))(
    variables, jnp.asarray(arrays["x_infer"])
  )
  record("inference", y_infer, arrays["y_infer"])
  return errors


def framework_errors(stem: str, make_apply: Callable[[Any], Apply]) -> dict[str, float]:
  """Replays V2 / Keras 3 / PyTorch fixture `stem` through ``make_apply(layer)``."""
  runners = {**test_framework_parity.RUNNERS, "under_test": make_apply}
  with mock.patch.object(test_framework_parity, "RUNNERS", runners):
    return test_framework_parity.replay(stem, "under_test")


# The cases where a front-end must equal the linen Module bit for bit, and the framework stems
# it must replay (Keras 3's synchronized case is not reproduced on purpose).
EXACT_CASES = ["r2_default", "r4_nhwc_fused", "r2_renorm_all_clips", "r2_ghost", "r3_mask"]
FRAMEWORK_STEMS = [
  s for s in test_framework_parity.STEMS if s not in test_framework_parity._NOT_REPRODUCED
]


# Every front-end replays these V1 fixtures in the default tier (one case per regime, dtype and
# rank) and the rest in the slow tier, which CI also runs (`tests/conftest.py` tiers linen's).
REPRESENTATIVE_V1 = (
  "r2_default",
  "r2_batch1",
  "r2_dtype_float16",
  "r2_renorm_all_clips",
  "r2_ghost",
  "r3_mask",
  "r3_multi12",
  "r4_nhwc_fused",
  "r4_nchw_nonfused",
  "r4_fused_float16_input",
  "r5_ncdhw_fused",
  "golden_g3",
)
REPRESENTATIVE_FRAMEWORK = test_framework_parity.DEFAULT_TIER_STEMS


def tiered(names: list[str], representative: tuple[str, ...]) -> list[Any]:
  """`names` as pytest parameters: the `representative` ones in the default tier, the rest slow."""
  unknown = set(representative) - set(names)
  if unknown:
    raise ValueError(f"representative cases {sorted(unknown)} are not among {names}")
  return [n if n in representative else pytest.param(n, marks=pytest.mark.slow) for n in names]


def assert_equals_linen_exactly(name: str, make_apply: Callable[[Any], Apply]) -> None:
  """One jitted training call of V1 fixture `name`: output and statistics equal linen's bits."""
  meta, arrays = test_parity.load_case(name)
  linen = test_parity.build_layer(meta, arrays)
  variables = test_parity.initial_variables(linen, meta, arrays)
  x = jnp.asarray(arrays["x_0"])
  mask = jnp.asarray(arrays["mask"]) if "mask" in arrays else None
  y_linen, updates = jax.jit(
    lambda v, x: linen.apply(v, x, training=True, mask=mask, mutable=["batch_stats"])
  )(variables, x)
  y, stats = jax.jit(lambda v, x: make_apply(linen)(v, x, True, mask))(variables, x)
  np.testing.assert_array_equal(y, y_linen)
  for stat, value in updates["batch_stats"].items():
    np.testing.assert_array_equal(stats[stat], value)
