"""Generate Keras 3 BatchNormalization fixtures (semantics "keras3").

The oracle is ``keras.layers.BatchNormalization`` of Keras 3 (3.15.1 for the committed
fixtures) on the TensorFlow backend (``KERAS_BACKEND=tensorflow`` is forced here and
recorded in every fixture). Run from the repository root in an environment with
``tensorflow-cpu`` (which brings Keras 3)::

    python tests/oracles/framework_parity/generate_keras3.py             # all keras3 cases
    python tests/oracles/framework_parity/generate_keras3.py r2 r3_mask  # only the named cases

Writes ``fixtures/keras3_<name>.npz|json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Reproducible CPU numerics: no oneDNN rewrites, no GPU, single-threaded ops.
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ORACLE = "keras.layers.BatchNormalization"

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.get_logger().setLevel("ERROR")
assert keras.backend.backend() == "tensorflow", keras.backend.backend()


def _versions() -> dict:
  return {
    "keras_version": keras.__version__,
    "keras_backend": keras.backend.backend(),
    "tensorflow_version": tf.__version__,
    "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
    "oracle_class": f"{ORACLE} ({type(keras.layers.BatchNormalization()).__module__})",
  }


def _random_init(layer, arrays):
  values = []
  for w, current in zip(layer.weights, layer.get_weights(), strict=True):
    if w.name == "moving_stddev":
      v = np.sqrt(arrays["init_moving_variance"])
    else:
      v = arrays[f"init_{w.name}"]
    values.append(np.asarray(v, np.float32).reshape(current.shape))
  layer.set_weights(values)


def run_case(case: dict):
  arrays = _common.make_arrays(case)
  keras.backend.clear_session()
  keras.utils.set_random_seed(case["seed"])

  layer = keras.layers.BatchNormalization(**case["config"])
  keras_config = layer.get_config()  # before build

  layer(tf.constant(arrays["x_0"]), training=False)  # build; training=False moves nothing
  names = [w.name for w in layer.weights]
  assert len(set(names)) == len(names), names
  if case["random_init"]:
    _random_init(layer, arrays)

  out = {k: v for k, v in arrays.items() if not k.startswith("init_")}
  for name, value in zip(names, layer.get_weights(), strict=True):
    out[f"w0_{name}"] = value

  mask = tf.constant(arrays["mask"] > 0) if case["mask"] else None  # bool, as Keras masks are
  affine = [(n, v) for n, v in (("gamma", layer.gamma), ("beta", layer.beta)) if v is not None]
  for k in range(case["steps"]):
    x = tf.constant(arrays[f"x_{k}"])
    dy = tf.constant(arrays[f"dy_{k}"])
    with tf.GradientTape() as tape:
      tape.watch(x)
      for _, v in affine:  # explicit: a trainable=False layer has no trainable weights
        tape.watch(v.value)
      y = layer(x, training=True, mask=mask)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
    grads = tape.gradient(loss, [x] + [v.value for _, v in affine])
    out[f"y_{k}"] = np.asarray(y)
    out[f"grad_x_{k}"] = np.asarray(grads[0])
    for (n, _), g in zip(affine, grads[1:], strict=True):
      out[f"grad_{n}_{k}"] = np.asarray(g)
    for name, value in zip(names, layer.get_weights(), strict=True):
      out[f"w{k + 1}_{name}"] = value

  out["y_infer"] = np.asarray(layer(tf.constant(arrays["x_infer"]), training=False))

  meta = {
    "case": case,
    "semantics": "keras3",
    "param_shape": [int(d) for d in layer.moving_mean.shape],
    "weight_names": names,
    "axis": int(layer.axis),
    "reduction_axes": list(layer._reduction_axes),
    "trainable": bool(layer.trainable),
    "compute_dtype": layer.compute_dtype,
    "variable_dtype": layer.variable_dtype,
    "output_dtype": out["y_0"].dtype.name,
    "keras_config": keras_config,
    **_versions(),
  }
  return out, meta


def main(argv: list[str]) -> int:
  cases = _common.select(_common.load_cases("keras3"), argv)
  for case in cases:
    out, meta = run_case(case)
    _common.write_fixture(f"keras3_{case['name']}", out, meta)
    last = case["steps"]
    mv = out[f"w{last}_moving_variance"]
    print(
      f"keras3_{case['name']:24s} y={meta['output_dtype']:8s} weights={len(meta['weight_names'])}"
      f" mv[{last}]={[round(float(v), 5) for v in mv.ravel()[:3]]}"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
