"""Replays every committed Keras V1 fixture through `kbn_jax.BatchNormalization`.

For each case: the Keras initial weights are loaded, then every training step's output, input
and weight gradients and weights after the step are compared, then the final inference output.
No TensorFlow is needed. ``python -m tests.oracles.keras_parity.test_parity`` prints the largest
error
seen per quantity.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kbn_jax
from tests.oracles.keras_parity.cases import CASES

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# Keras layer dtypes whose compute (and output) dtype is float16; parameters stay float32.
_FLOAT16_POLICIES = ("float16", "mixed_float16")


def load_case(name: str):
  meta = json.loads((FIXTURES / f"{name}.json").read_text())
  with np.load(FIXTURES / f"{name}.npz") as data:
    arrays = dict(data)
  return meta, arrays


def build_layer(meta, arrays) -> kbn_jax.BatchNormalization:
  config = dict(meta["case"]["config"])
  dtype = config.pop("dtype", None)
  if dtype in _FLOAT16_POLICIES:
    config["dtype"] = jnp.float16
  elif dtype not in (None, "float32"):
    raise NotImplementedError(f"layer dtype {dtype!r}")
  if meta["case"]["adjustment"]:
    scale, bias = jnp.asarray(arrays["adj_scale"]), jnp.asarray(arrays["adj_bias"])
    config["adjustment"] = lambda shape: (scale, bias)
  return kbn_jax.BatchNormalization(**config)


def initial_variables(layer, meta, arrays):
  """Our variables, filled with Keras's initial weights (same element order, feature shape)."""
  variables = layer.init(jax.random.key(0), jnp.asarray(arrays["x_0"]))
  return _with_keras_weights(variables, meta, arrays, step=0)


def _with_keras_weights(variables, meta, arrays, step):
  out = {"params": dict(variables.get("params", {})), "batch_stats": {}}
  for name in meta["weight_names"]:
    collection = "params" if name in ("gamma", "beta") else "batch_stats"
    reference = variables[collection][name]
    out[collection][name] = jnp.asarray(
      arrays[f"w{step}_{name}"].reshape(reference.shape), reference.dtype
    )
  return out


def _tolerance(dtype, case) -> float:
  if jnp.dtype(dtype) != jnp.float32:
    return 2e-3
  if "input_offset" in case:
    # Inputs near 100 with spread 0.3: Keras's float32 arithmetic form (x * inv + shift) and its
    # gradient cancel catastrophically, so Keras itself is up to 6.6e-5 off a float64 reference
    # (r2_large_mean, grad_gamma); XLA's fused multiply-add rounds differently from TF's
    # separate kernels. Agreement is asked to the accuracy Keras has, not to its rounding.
    return 1e-4
  return 1e-5


def case_errors(name: str) -> dict[str, float]:
  """Runs one case; returns the largest relative-or-absolute error per quantity."""
  meta, arrays = load_case(name)
  layer = build_layer(meta, arrays)
  variables = initial_variables(layer, meta, arrays)
  mask = jnp.asarray(arrays["mask"]) if "mask" in arrays else None
  errors: dict[str, float] = {}

  def record(quantity, actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (name, quantity, actual.shape, expected.shape)
    scale = np.maximum(np.abs(expected), 1.0)
    error = float(np.max(np.abs(actual - expected) / scale)) if actual.size else 0.0
    tolerance = _tolerance(dtype, meta["case"])
    assert error <= tolerance, f"{name}: {quantity} off by {error:.3g} (tolerance {tolerance})"
    errors[quantity] = max(errors.get(quantity, 0.0), error)

  @jax.jit
  def train_step(params, batch_stats, x, dy):
    def forward(x, params):
      return layer.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        training=True,
        mask=mask,
        mutable=["batch_stats"],
      )

    (y, updates), pullback = jax.vjp(forward, x, params, has_aux=False)
    grad_x, grad_params = pullback((dy.astype(y.dtype), jax.tree.map(jnp.zeros_like, updates)))
    return y, updates.get("batch_stats", batch_stats), grad_x, grad_params

  params, batch_stats = variables["params"], variables["batch_stats"]
  for step in range(meta["case"]["steps"]):
    x = jnp.asarray(arrays[f"x_{step}"])
    y, batch_stats, grad_x, grad_params = train_step(
      params, batch_stats, x, jnp.asarray(arrays[f"dy_{step}"])
    )
    compute = meta["compute_dtype"]
    record("output", y, arrays[f"y_{step}"], compute)
    assert y.dtype == jnp.dtype(meta["output_dtype"]), (name, y.dtype)
    record("grad_x", grad_x, arrays[f"grad_x_{step}"], compute)
    for weight in ("gamma", "beta"):
      if weight in params:
        expected = arrays[f"grad_{weight}_{step}"].reshape(grad_params[weight].shape)
        record(f"grad_{weight}", grad_params[weight], expected, compute)
    for weight in meta["weight_names"]:
      if weight not in ("gamma", "beta"):
        expected = arrays[f"w{step + 1}_{weight}"]
        record(weight, batch_stats[weight], expected.reshape(batch_stats[weight].shape), "float32")

  y_infer = layer.apply({"params": params, "batch_stats": batch_stats}, arrays["x_infer"])
  record("inference_output", y_infer, arrays["y_infer"], meta["compute_dtype"])
  return errors


@pytest.mark.parametrize("name", [case["name"] for case in CASES])
def test_matches_keras_v1(name):
  assert case_errors(name)


def test_every_fixture_is_a_case():
  names = {case["name"] for case in CASES}
  on_disk = {path.stem for path in FIXTURES.glob("*.json")}
  assert len(names) >= 30
  assert names == on_disk


if __name__ == "__main__":
  worst: dict[str, tuple[float, str]] = {}
  for case in CASES:
    for quantity, error in case_errors(case["name"]).items():
      if error >= worst.get(quantity, (-1.0, ""))[0]:
        worst[quantity] = (error, case["name"])
  print(f"{len(CASES)} cases; largest error per quantity (relative, or absolute below 1):")
  for quantity, (error, case_name) in sorted(worst.items()):
    print(f"  {quantity:18s} {error:.3g}  ({case_name})")
