"""Generate tf_keras V2 BatchNormalization fixtures (semantics "keras_v2").

The oracle is ``tf_keras.src.layers.normalization.batch_normalization.BatchNormalization``
(``_USE_V2_BEHAVIOR = True``), which is what ``tf.keras.layers.BatchNormalization`` /
``tf_keras.layers.BatchNormalization`` is in a TF2 process. Run from the repository root in an
environment with ``tensorflow-cpu`` and ``tf-keras`` (the fixtures use 2.21.0)::

    python tests/oracles/framework_parity/generate_keras_v2.py  # all cases + errors json
    python tests/oracles/framework_parity/generate_keras_v2.py r2 r4_nchw # only the named cases

Writes ``fixtures/keras_v2_<name>.npz|json`` and ``fixtures/keras_v2_fused_errors.json``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

# Reproducible CPU numerics: no oneDNN rewrites, no GPU, single-threaded ops.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from tf_keras.src.layers.normalization import batch_normalization as bn_v2  # noqa: E402
from tf_keras.src.layers.normalization.batch_normalization_v1 import (  # noqa: E402
  BatchNormalization as BatchNormalizationV1,
)

BatchNormalization = bn_v2.BatchNormalization
ORACLE = "tf_keras.src.layers.normalization.batch_normalization.BatchNormalization"

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
tf_keras.utils.disable_interactive_logging()
tf.get_logger().setLevel("ERROR")


def _short_name(variable) -> str:
  return re.sub(r":\d+$", "", variable.name).split("/")[-1]


def _versions() -> dict:
  return {
    "tensorflow_version": tf.__version__,
    "tf_keras_version": tf_keras.__version__,
    "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
    "oracle_class": ORACLE,
    "use_v2_behavior": bool(BatchNormalization._USE_V2_BEHAVIOR),
    "tf_keras_layers_bn_is_oracle": tf_keras.layers.BatchNormalization is BatchNormalization,
  }


def _random_init(layer, names, arrays):
  values = []
  for name, current in zip(names, layer.get_weights(), strict=True):
    if name == "moving_stddev":
      v = np.sqrt(arrays["init_moving_variance"])
    else:
      v = arrays[f"init_{name}"]
    values.append(np.asarray(v, np.float32).reshape(current.shape))
  layer.set_weights(values)


def run_case(case: dict):
  assert tf.__internal__.tf2.enabled()
  arrays = _common.make_arrays(case)
  tf_keras.backend.clear_session()
  tf_keras.utils.set_random_seed(case["seed"])

  layer = BatchNormalization(**case["config"])
  keras_config = layer.get_config()  # before build
  fused_after_init = layer.fused

  layer(tf.constant(arrays["x_0"]), training=False)  # build; training=False moves nothing
  names = [_short_name(w) for w in layer.weights]
  assert len(set(names)) == len(names), names
  if case["random_init"]:
    _random_init(layer, names, arrays)

  out = {k: v for k, v in arrays.items() if not k.startswith("init_")}
  for name, value in zip(names, layer.get_weights(), strict=True):
    out[f"w0_{name}"] = value

  mask = tf.constant(arrays["mask"]) if case["mask"] else None
  affine = [(n, v) for n, v in (("gamma", layer.gamma), ("beta", layer.beta)) if v is not None]
  for k in range(case["steps"]):
    x = tf.constant(arrays[f"x_{k}"])
    dy = tf.constant(arrays[f"dy_{k}"])
    with tf.GradientTape() as tape:
      tape.watch(x)
      for _, v in affine:  # explicit: a trainable=False layer has no trainable weights
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
    "case": case,
    "semantics": "keras_v2",
    "fused_after_init": fused_after_init,
    "fused": bool(layer.fused),
    "data_format": getattr(layer, "_data_format", None) if layer.fused else None,
    "param_shape": [int(d) for d in layer._param_shape],
    "weight_names": names,
    "axis_after_build": [int(a) for a in layer.axis],
    "trainable": bool(layer.trainable),
    "compute_dtype": layer.compute_dtype,
    "variable_dtype": layer.variable_dtype,
    "output_dtype": out["y_0"].dtype.name,
    "keras_config": keras_config,
    **_versions(),
  }
  return out, meta


# --------------------------------------------------------------------------
# Fused resolution and its raises
# --------------------------------------------------------------------------
def _adjustment(shape):
  return tf.ones([1] * 4), tf.zeros([1] * 4)


def _try_build(cls, rank, kwargs, dtype):
  """Construct and build; returns ("ok", fused) or (exception class, message, stage)."""
  stage = "init"
  try:
    layer = cls(**kwargs, dtype=dtype) if dtype else cls(**kwargs)
    fused_after_init = layer.fused
    stage = "build"
    shape = {2: (4, 3), 3: (4, 3, 2), 4: (4, 3, 2, 3), 5: (2, 3, 2, 2, 3)}[rank]
    layer.build(tf.TensorShape(shape))
    return {
      "result": "ok",
      "fused_after_init": fused_after_init,
      "fused": bool(layer.fused),
      "data_format": getattr(layer, "_data_format", None) if layer.fused else None,
    }
  except Exception as e:  # noqa: BLE001 - the message is the data
    return {"result": "raises", "stage": stage, "exception": type(e).__name__, "message": str(e)}


def fused_errors() -> dict:
  combos = []
  base = [
    # (rank, axis, renorm, virtual_batch_size, adjustment, dtype)
    (2, -1, False, None, False, None),
    (3, -1, False, None, False, None),
    (4, -1, False, None, False, None),
    (4, 3, False, None, False, None),
    (4, 1, False, None, False, None),
    (4, -3, False, None, False, None),
    (4, 2, False, None, False, None),
    (4, -2, False, None, False, None),
    (4, -4, False, None, False, None),
    (4, 0, False, None, False, None),
    (4, [1, 3], False, None, False, None),
    (4, [3], False, None, False, None),
    (5, -1, False, None, False, None),
    (5, 4, False, None, False, None),
    (5, 1, False, None, False, None),
    (5, -4, False, None, False, None),
    (5, 3, False, None, False, None),
    (5, 2, False, None, False, None),
    (4, -1, True, None, False, None),
    (4, -1, False, 2, False, None),
    (4, -1, False, None, True, None),
    (4, -1, False, None, False, "float64"),
    (4, -1, False, None, False, "float16"),
    (4, -1, False, None, False, "bfloat16"),
    (4, -1, False, None, False, "mixed_float16"),
    (2, -1, True, None, False, None),
    (2, -1, False, 2, False, None),
    (2, -1, False, None, False, "float64"),
  ]
  for rank, axis, renorm, vbs, adjustment, dtype in base:
    kw = {"axis": axis}
    if renorm:
      kw["renorm"] = True
    if vbs is not None:
      kw["virtual_batch_size"] = vbs
    if adjustment:
      kw["adjustment"] = _adjustment
    for fused in (None, True, False):
      k2 = dict(kw, fused=fused)
      combos.append(
        {
          "rank": rank,
          "axis": axis,
          "renorm": renorm,
          "virtual_batch_size": vbs,
          "adjustment": adjustment,
          "dtype": dtype,
          "fused": fused,
          "v2": _try_build(BatchNormalization, rank, k2, dtype),
          "v1": _try_build(BatchNormalizationV1, rank, k2, dtype),
        }
      )
  # synchronized (V2 only; V1 drops the argument)
  sync = {
    "synchronized=True, fused=True": _try_build(
      BatchNormalization, 4, {"synchronized": True, "fused": True}, None
    ),
    "synchronized=True, fused=None": _try_build(
      BatchNormalization, 4, {"synchronized": True}, None
    ),
  }
  # The four raises the brief names, explicitly.
  named = {
    "fused=True, rank-2 input": _try_build(BatchNormalization, 2, {"fused": True}, None),
    "fused=True, renorm=True": _try_build(
      BatchNormalization, 4, {"fused": True, "renorm": True}, None
    ),
    "fused=True, virtual_batch_size=2": _try_build(
      BatchNormalization, 4, {"fused": True, "virtual_batch_size": 2}, None
    ),
    "fused=True, axis=2 on rank 4": _try_build(
      BatchNormalization, 4, {"fused": True, "axis": 2}, None
    ),
    "fused=True, adjustment": _try_build(
      BatchNormalization, 4, {"fused": True, "adjustment": _adjustment}, None
    ),
    "fused=True, dtype=float64": _try_build(BatchNormalization, 4, {"fused": True}, "float64"),
    "fused=True, axis=[1, 3] on rank 4": _try_build(
      BatchNormalization, 4, {"fused": True, "axis": [1, 3]}, None
    ),
    "fused=True, rank-3 input": _try_build(BatchNormalization, 3, {"fused": True}, None),
    "fused=None, axis=-4 on rank 4": _try_build(BatchNormalization, 4, {"axis": -4}, None),
    "fused=True, axis=3 on rank 5 (silent fallback)": _try_build(
      BatchNormalization, 5, {"fused": True, "axis": 3}, None
    ),
  }
  return {
    "named": named,
    "synchronized": sync,
    "combos": combos,
    **_versions(),
    "v1_class": "tf_keras.src.layers.normalization.batch_normalization_v1.BatchNormalization",
  }


def main(argv: list[str]) -> int:
  cases = _common.select(_common.load_cases("keras_v2"), argv)
  for case in cases:
    out, meta = run_case(case)
    _common.write_fixture(f"keras_v2_{case['name']}", out, meta)
    last = case["steps"]
    mv = out[f"w{last}_moving_variance"]
    print(
      f"keras_v2_{case['name']:24s} fused={str(meta['fused']):5s} "
      f"param_shape={tuple(meta['param_shape'])!s:12s}"
      f" mv[{last}]={[round(float(v), 5) for v in mv.ravel()[:3]]}"
    )
  if not argv:
    _common.write_json("keras_v2_fused_errors.json", fused_errors())
    print("wrote keras_v2_fused_errors.json")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
