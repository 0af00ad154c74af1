"""Generate Keras V1 BatchNormalization oracle fixtures.

Run from the repository root, in an environment with ``tensorflow-cpu`` and
``tf-keras`` (``pip install -e ".[oracle]"``)::

    python tests/oracles/keras_parity/generate.py            # all cases
    python tests/oracles/keras_parity/generate.py r2_ghost   # only the named cases

Writes ``tests/oracles/keras_parity/fixtures/<name>.npz`` and ``<name>.json`` for every
case of ``cases.py`` and checks the golden cases against the values of
section 10 of the Keras V1 specification.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

# Reproducible CPU numerics: no oneDNN graph rewrites, no GPU, single-threaded
# reductions. Must be set before TensorFlow is imported.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from tf_keras.src.layers.normalization.batch_normalization_v1 import (  # noqa: E402
  BatchNormalization,
)

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
tf_keras.utils.disable_interactive_logging()
tf.get_logger().setLevel("ERROR")


def _load_cases():
  spec = importlib.util.spec_from_file_location("keras_parity_cases", HERE / "cases.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.CASES


# --------------------------------------------------------------------------
# Deterministic inputs
# --------------------------------------------------------------------------
def _normalized_axes(axis, rank):
  axes = [axis] if isinstance(axis, int) else list(axis)
  return sorted(a + rank if a < 0 else a for a in axes)


def make_arrays(case: dict) -> dict[str, np.ndarray]:
  """All numpy inputs of a case: x_k, dy_k, x_infer, mask, adj_scale, adj_bias."""
  rs = np.random.RandomState(case["seed"])
  shape = tuple(case["input_shape"])
  rank = len(shape)
  in_dtype = np.dtype(case["input_dtype"])
  offset = float(case.get("input_offset", 0.0))
  infer_batch = int(case.get("infer_batch", shape[0]))

  # A fixed location / spread per non-batch position, so that statistics
  # differ along every axis (catches wrong reduction axes).
  loc_field = rs.uniform(-1.0, 1.0, size=shape[1:])
  scale_field = rs.uniform(0.5, 2.0, size=shape[1:])

  def sample(k, batch):
    base = rs.standard_normal((batch,) + shape[1:])
    step_scale = 1.0 + 0.5 * k if case["drift"] else 1.0
    step_loc = 0.75 * k if case["drift"] else 0.0
    return (base * scale_field * step_scale + loc_field + step_loc + offset).astype(in_dtype)

  out: dict[str, np.ndarray] = {}
  explicit = case.get("inputs")
  for k in range(case["steps"]):
    if explicit is not None:
      out[f"x_{k}"] = np.asarray(explicit[k], dtype=in_dtype).reshape(shape)
    else:
      out[f"x_{k}"] = sample(k, shape[0])
    out[f"dy_{k}"] = rs.standard_normal(shape).astype(np.float32)
  if case.get("infer_input") is not None:
    out["x_infer"] = np.asarray(case["infer_input"], dtype=in_dtype)
  else:
    out["x_infer"] = sample(case["steps"] - 1, infer_batch)

  if case["mask"]:
    mask = (rs.uniform(size=shape[:2]) > 0.3).astype(np.float32)
    mask[1, :] = 0.0  # one fully padded sequence
    mask[0, :] = 1.0  # and one full one
    out["mask"] = mask
  if case["adjustment"]:
    axes = _normalized_axes(case["config"].get("axis", -1), rank)
    adj_shape = tuple(shape[i] if i in axes else 1 for i in range(rank))
    out["adj_scale"] = rs.uniform(0.5, 1.5, size=adj_shape).astype(np.float32)
    out["adj_bias"] = rs.uniform(-0.2, 0.2, size=adj_shape).astype(np.float32)
  return out


# --------------------------------------------------------------------------
# Running the oracle
# --------------------------------------------------------------------------
def _short_name(variable) -> str:
  return re.sub(r":\d+$", "", variable.name).split("/")[-1]


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating,)):
    return float(obj)
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  return str(obj)


def run_case(case: dict) -> tuple[dict[str, np.ndarray], dict]:
  arrays = make_arrays(case)
  tf_keras.backend.clear_session()
  tf_keras.utils.set_random_seed(case["seed"])

  kwargs = dict(case["config"])
  if case["adjustment"]:
    adj_scale = tf.constant(arrays["adj_scale"], tf.float32)
    adj_bias = tf.constant(arrays["adj_bias"], tf.float32)
    kwargs["adjustment"] = lambda _shape: (adj_scale, adj_bias)
  layer = BatchNormalization(**kwargs)
  keras_config = layer.get_config()  # before build: axis as given

  # Build with an inference call (no statistics move).
  layer(tf.constant(arrays["x_0"]), training=False)
  names = [_short_name(w) for w in layer.weights]
  assert len(set(names)) == len(names), names

  out = dict(arrays)
  for name, value in zip(names, layer.get_weights(), strict=True):
    out[f"w0_{name}"] = value

  mask = tf.constant(arrays["mask"]) if case["mask"] else None
  affine = [(n, v) for n, v in (("gamma", layer.gamma), ("beta", layer.beta)) if v is not None]
  for k in range(case["steps"]):
    x = tf.constant(arrays[f"x_{k}"])
    dy = tf.constant(arrays[f"dy_{k}"])
    with tf.GradientTape() as tape:
      tape.watch(x)
      for _, v in affine:  # explicit: trainable=False layers have no trainable weights
        tape.watch(v)
      y = layer(x, training=True, mask=mask)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
    grads = tape.gradient(loss, [x] + [v for _, v in affine])
    out[f"y_{k}"] = y.numpy()
    out[f"grad_x_{k}"] = grads[0].numpy()
    for (n, _), g in zip(affine, grads[1:], strict=True):
      out[f"grad_{n}_{k}"] = g.numpy()
    for name, value in zip(names, layer.get_weights(), strict=True):
      out[f"w{k + 1}_{name}"] = value

  out["y_infer"] = layer(tf.constant(arrays["x_infer"]), training=False).numpy()

  meta = {
    "case": _jsonable(case),
    "fused": bool(layer.fused),
    "param_shape": [int(d) for d in layer._param_shape],
    "weight_names": names,
    "axis_after_build": [int(a) for a in layer.axis],
    "compute_dtype": layer.compute_dtype,
    "variable_dtype": layer.variable_dtype,
    "param_dtype": str(layer.weights[0].dtype.name),
    "output_dtype": out["y_0"].dtype.name,
    "adjustment_shape": list(arrays["adj_scale"].shape) if case["adjustment"] else None,
    "keras_config": _jsonable(keras_config),
    "tensorflow_version": tf.__version__,
    "tf_keras_version": tf_keras.__version__,
    "oracle_class": "tf_keras.src.layers.normalization.batch_normalization_v1.BatchNormalization",
    "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
  }
  return out, meta


# --------------------------------------------------------------------------
# Golden values (docs/keras_bn_v1_spec.md section 10)
# --------------------------------------------------------------------------
_G2_Y = [-0.9995004, -0.99987507, 0.9995004, 0.99987507]
GOLDEN = {
  "golden_g1": {
    "y_0": [
      -1.3415066,
      -1.3416073,
      -0.44716883,
      -0.44720244,
      0.44716895,
      0.44720244,
      1.3415066,
      1.3416073,
    ],
    "w1_moving_mean": [0.4, 0.8],
    "w1_moving_variance": [1.4, 2.9],
    "y_infer": [
      0.5069115,
      0.7045429,
      2.196617,
      3.0530188,
      3.8863218,
      5.4014955,
      5.576027,
      7.7499714,
    ],
  },
  "golden_g2": {
    "fused": True,
    "y_0": _G2_Y,
    "w1_moving_mean": [0.1, 0.3],
    "w1_moving_variance": [1.1, 1.7],
  },
  "golden_g2_nonfused": {
    "fused": False,
    "y_0": _G2_Y,
    "w1_moving_mean": [0.1, 0.3],
    "w1_moving_variance": [1.0, 1.3],
  },
  "golden_g3": {
    "y_0": [-0.9995004, -0.9995004, 0.9995004, 0.9995005],
    "w1_moving_mean": [1.5],
    "w1_moving_variance": [1.0],
    "param_shape": [1, 1, 1],
  },
  "golden_g4": {
    "y_0": [
      -1.51226,
      -1.512411,
      -0.17075324,
      -0.17080355,
      1.1707532,
      1.1708035,
      2.5122597,
      2.512411,
    ],
    "w1_moving_mean": [0.4, 0.8],
    "w1_moving_variance": [1.2615426, 1.8140144],
    "w1_moving_stddev": [1.1236292, 1.3472247],
    "w1_renorm_mean": [2.0, 4.0],
    "w1_renorm_stddev": [1.6181458, 2.7361238],
    "y_1": [
      -1.5124109,
      -1.5124488,
      -0.17080355,
      -0.17081618,
      1.1708038,
      1.1708162,
      2.5124109,
      2.5124485,
    ],
    "w2_moving_mean": [1.26, 2.42],
    "w2_moving_variance": [2.1261964, 4.438175],
    "w2_moving_stddev": [1.4584911, 2.106935],
    "w2_renorm_mean": [5.5, 10.5],
    "w2_renorm_stddev": [3.0451965, 5.840225],
    "y_infer": [
      -0.17826653,
      -0.19934177,
      1.1930137,
      1.6991506,
      2.5642939,
      3.5976431,
      3.9355738,
      5.4961348,
    ],
  },
  "golden_g5": {
    "w1_moving_variance": [
      216.50002,
      263.53195,
      307.45947,
      350.2827,
      392.5,
      434.3347,
      475.90775,
      517.29224,
      558.5356,
      599.6699,
      640.7182,
      681.69714,
    ],
    "w1_moving_variance.shape": [1, 3, 4],
    "param_shape": [1, 3, 4],
  },
}


def check_golden(name: str, out: dict, meta: dict) -> float:
  """Assert the spec's golden values (rtol = atol = 1e-6); returns the max abs error."""
  worst = 0.0
  for key, expected in GOLDEN[name].items():
    if key in ("fused", "param_shape"):
      assert meta[key] == expected, (name, key, meta[key], expected)
      continue
    if key.endswith(".shape"):
      got_shape = list(out[key[: -len(".shape")]].shape)
      assert got_shape == expected, (name, key, got_shape, expected)
      continue
    got = np.asarray(out[key], np.float64).ravel()
    exp = np.asarray(expected, np.float64)
    assert got.shape == exp.shape, (name, key, got.shape, exp.shape)
    err = np.abs(got - exp)
    worst = max(worst, float(err.max()))
    ok = np.all(err <= 1e-6 + 1e-6 * np.abs(exp))
    assert ok, f"{name}: {key} = {got.tolist()} differs from spec {exp.tolist()}"
  return worst


def main(argv: list[str]) -> int:
  cases = _load_cases()
  if argv:
    unknown = set(argv) - {c["name"] for c in cases}
    if unknown:
      raise SystemExit(f"unknown cases: {sorted(unknown)}")
    cases = [c for c in cases if c["name"] in argv]
  FIXTURES.mkdir(exist_ok=True)
  for case in cases:
    out, meta = run_case(case)
    name = case["name"]
    np.savez_compressed(FIXTURES / f"{name}.npz", **out)
    (FIXTURES / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    last = case["steps"]
    extra = ""
    if name in GOLDEN:
      extra = f"  golden OK (max abs err {check_golden(name, out, meta):.1e})"
    mv = out[f"w{last}_moving_variance"]
    print(
      f"{name:34s} fused={str(meta['fused']):5s} param_shape={tuple(meta['param_shape'])!s:18s} "
      f"weights={len(meta['weight_names'])} y={out['y_0'].dtype.name} "
      f"mv[{last}]={[round(float(v), 4) for v in mv.ravel()[:3]]}{extra}"
    )
  print(f"wrote {len(cases)} cases to {FIXTURES}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
