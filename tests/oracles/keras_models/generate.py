"""Generate the Keras interop fixtures of `tests/oracles/keras_models/fixtures` from real tf_keras
models.

Run from the repository root with the oracle environment (tensorflow-cpu + tf-keras, no JAX)::

    /work/oracle_venv/bin/python tests/oracles/keras_models/generate.py \
      [--kbn-python .venv/bin/python]

`--kbn-python` is an interpreter with kbn_jax installed: it runs `export_configs.py`, whose
``to_keras_config()`` output is fed to ``tf_keras``'s V1 ``BatchNormalization.from_config`` here.

Writes (all small, committed; see README.md):

* ``configs.json`` / ``configs.npz``: every `cases.CONFIG_CASES` layer's ``get_config()`` in each
  format Keras writes (new and legacy serialization, before and after build, TF1 graph mode) and
  its behaviour: initial weights, one training call, one inference call, regularization losses;
* ``exported.json`` / ``exported.npz``: `cases.EXPORT_CASES` configs written by kbn_jax, as
  Keras accepted and rebuilt them, and the rebuilt layer's behaviour;
* ``constraints.json`` / ``constraints.npz``: Keras constraints applied to weights of Keras's
  parameter shapes;
* ``<model>.h5`` / ``<model>.npz`` / ``<model>.json`` for each of `cases.MODELS`: trained
  ``tf_keras`` models with V1 ``BatchNormalization`` layers, their HDF5 weight files, an inference
  and a training batch with Keras's outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from tf_keras.src.layers.normalization.batch_normalization_v1 import (  # noqa: E402
  BatchNormalization,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
FIXTURES = HERE / "fixtures"


def _load_cases():
  spec = importlib.util.spec_from_file_location("keras_models_cases", HERE / "cases.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CASES = _load_cases()


def _setup_tf():
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf_keras.utils.disable_interactive_logging()
  tf.get_logger().setLevel("ERROR")


def _jsonable(value):
  """Keras configs hold tuples, ListWrappers and NumPy scalars; JSON wants plain types."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _versions():
  return {"tensorflow_version": tf.__version__, "tf_keras_version": tf_keras.__version__}


def _write_json(name, payload):
  text = json.dumps(_jsonable(payload), indent=1, sort_keys=True) + "\n"
  (FIXTURES / name).write_text(text)


def _inputs(case, rs):
  dtype = np.dtype(case.get("input_dtype", "float32"))
  shape = tuple(case["input_shape"])
  loc = rs.uniform(-1.0, 1.0, size=shape[1:])
  return [(rs.standard_normal(shape) * 1.5 + loc + 0.5).astype(dtype) for _ in range(2)]


def _layer_behaviour(layer, case, arrays, prefix, rs):
  """Builds `layer` on the case's input and records weights, one training and one inference call."""
  x_train, x_infer = _inputs(case, rs)
  if case["kwargs"].get("dtype") == "mixed_float16":
    x_train, x_infer = x_train.astype(np.float16), x_infer.astype(np.float16)
  layer.build(x_train.shape)
  arrays[f"{prefix}/x_train"] = x_train
  arrays[f"{prefix}/x_infer"] = x_infer
  for i, w in enumerate(layer.get_weights()):
    arrays[f"{prefix}/w0_{i}"] = w
  losses = [float(v) for v in layer.losses]
  arrays[f"{prefix}/y_train"] = layer(x_train, training=True).numpy()
  for i, w in enumerate(layer.get_weights()):
    arrays[f"{prefix}/w1_{i}"] = w
  arrays[f"{prefix}/y_infer"] = layer(x_infer, training=False).numpy()
  return {
    "weight_names": [w.name.split("/")[-1].split(":")[0] for w in layer.weights],
    "losses": losses,
    "fused": bool(layer.fused),
    "axis_after_build": list(layer.axis),
    "output_dtype": arrays[f"{prefix}/y_train"].dtype.name,
  }


def write_config_cases(tf1_configs):
  rs = np.random.RandomState(20)
  records, arrays = {}, {}
  for case in CASES.CONFIG_CASES:
    name = case["name"]
    layer = BatchNormalization(**case["kwargs"])
    unbuilt = layer.get_config()
    behaviour = _layer_behaviour(layer, case, arrays, name, rs)
    records[name] = {
      "case": case,
      "config_unbuilt": unbuilt,
      "config_built": layer.get_config(),
      "layer_legacy": tf_keras.layers.serialize(layer, use_legacy_format=True),
      "layer_serialized": tf_keras.layers.serialize(layer),
      "config_tf1_unbuilt": tf1_configs.get(name, {}).get("unbuilt"),
      "config_tf1_built": tf1_configs.get(name, {}).get("built"),
      **behaviour,
    }
  _write_json("configs.json", {"cases": records, **_versions()})
  np.savez_compressed(FIXTURES / "configs.npz", **arrays)


def tf1_configs():
  """Runs in a subprocess: configs of the V1 layer under TF1 graph mode (V1 initializers)."""
  tf.compat.v1.disable_v2_behavior()
  out = {}
  for case in CASES.CONFIG_CASES:
    try:
      layer = BatchNormalization(**case["kwargs"])
    except (TypeError, ValueError):  # e.g. mixed-precision policies in graph mode
      continue
    unbuilt = layer.get_config()
    layer(tf.compat.v1.placeholder(tf.float32, case["input_shape"]), training=True)
    out[case["name"]] = {"unbuilt": unbuilt, "built": layer.get_config()}
  print(json.dumps(_jsonable(out)))


def _tf1_configs_from_subprocess():
  result = subprocess.run(
    [sys.executable, __file__, "--tf1-configs"], capture_output=True, text=True, check=True
  )
  return json.loads(result.stdout.strip().splitlines()[-1])


def write_exported(kbn_python):
  result = subprocess.run(
    [kbn_python, str(HERE / "export_configs.py")],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
  )
  exported = json.loads(result.stdout.strip().splitlines()[-1])
  rs = np.random.RandomState(21)
  records, arrays = {}, {}
  for case in CASES.EXPORT_CASES:
    name = case["name"]
    config = exported[name]
    layer = BatchNormalization.from_config(json.loads(json.dumps(config)))
    unbuilt = layer.get_config()
    behaviour = _layer_behaviour(layer, case, arrays, name, rs)
    records[name] = {
      "case": case,
      "exported": config,
      "keras_config_unbuilt": unbuilt,
      "keras_config_built": layer.get_config(),
      "layer_serialized": tf_keras.layers.serialize(layer),
      "keras_trainable": bool(layer.trainable),
      **behaviour,
    }
  _write_json("exported.json", {"cases": records, **_versions()})
  np.savez_compressed(FIXTURES / "exported.npz", **arrays)


def write_constraints():
  rs = np.random.RandomState(22)
  records, arrays = {}, {}
  for case in CASES.CONSTRAINT_CASES:
    constraint = tf_keras.constraints.get(case["config"])
    shapes = case.get("shapes", CASES.CONSTRAINT_SHAPES)
    for shape in shapes:
      key = f"{case['name']}/{'x'.join(map(str, shape))}"
      w = (rs.standard_normal(shape) * 1.2).astype(np.float32)
      arrays[f"{key}/w"] = w
      arrays[f"{key}/projected"] = constraint(tf.constant(w)).numpy()
    records[case["name"]] = {"config": case["config"], "shapes": shapes}
  _write_json("constraints.json", {"cases": records, **_versions()})
  np.savez_compressed(FIXTURES / "constraints.npz", **arrays)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def _convnet():
  layers = tf_keras.layers
  inputs = layers.Input((6, 6, 3))
  x = layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
  x = BatchNormalization(momentum=0.5, name="bn1")(x)
  x = layers.ReLU()(x)
  x = layers.Conv2D(5, 3, strides=2, padding="same", name="conv2")(x)
  x = BatchNormalization(
    momentum=0.8,
    epsilon=0.01,
    gamma_regularizer="l2",
    beta_constraint="non_neg",
    name="bn2",
  )(x)
  x = layers.ReLU()(x)
  x = layers.GlobalAveragePooling2D()(x)
  x = layers.Dense(6, name="dense1")(x)
  x = BatchNormalization(center=False, momentum=0.7, name="bn3")(x)
  x = layers.ReLU()(x)
  outputs = layers.Dense(3, name="logits")(x)
  return tf_keras.Model(inputs, outputs, name="convnet"), (6, 6, 3), "classify"


def _renorm_mlp():
  layers = tf_keras.layers
  inputs = layers.Input((5,))
  x = layers.Dense(8, name="dense")(inputs)
  x = BatchNormalization(
    renorm=True,
    renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.5},
    renorm_momentum=0.7,
    momentum=0.6,
    name="bn",
  )(x)
  x = layers.ReLU()(x)
  outputs = layers.Dense(2, name="out")(x)
  return tf_keras.Model(inputs, outputs, name="renorm_mlp"), (5,), "regress"


def _multi_axis():
  layers = tf_keras.layers
  inputs = layers.Input((4, 5, 3))
  x = BatchNormalization(axis=[1, 3], momentum=0.5, name="bn_multi")(inputs)
  x = layers.Conv2D(4, 1, name="conv")(x)
  x = BatchNormalization(virtual_batch_size=4, momentum=0.5, name="bn_ghost")(x)
  x = layers.Flatten()(x)
  outputs = layers.Dense(2, name="out")(x)
  return tf_keras.Model(inputs, outputs, name="multi_axis"), (4, 5, 3), "regress"


def port_mlp():
  """The tiny model of `examples/keras_v1_port.py` (kept in sync by hand)."""
  layers = tf_keras.layers
  inputs = layers.Input((4,))
  x = layers.Dense(16, name="dense")(inputs)
  x = BatchNormalization(momentum=0.9, name="bn")(x)
  x = layers.ReLU()(x)
  outputs = layers.Dense(3, name="logits")(x)
  return tf_keras.Model(inputs, outputs, name="port_mlp"), (4,), "classify"


def port_data(n, seed):
  """Three Gaussian blobs in 4-D (the data of `examples/keras_v1_port.py`)."""
  rs = np.random.RandomState(seed)
  labels = rs.randint(0, 3, size=n)
  centers = np.array([[2.0, 0, 0, 1], [0, 2.0, 0, -1], [0, 0, 2.0, 0]])
  x = centers[labels] + rs.standard_normal((n, 4))
  return x.astype(np.float32), labels.astype(np.int32)


def _train(model, input_shape, task, rs):
  if task == "classify":
    x = rs.standard_normal((32,) + input_shape).astype(np.float32)
    y = rs.randint(0, 3, size=32)
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  else:
    x = rs.standard_normal((32,) + input_shape).astype(np.float32) * 2.0 + 0.5
    y = rs.standard_normal((32, 2)).astype(np.float32)
    loss = "mse"
  model.compile(optimizer=tf_keras.optimizers.SGD(0.05), loss=loss)
  model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)


def write_model(name):
  tf_keras.utils.set_random_seed(23)
  rs = np.random.RandomState(23)
  model, input_shape, task = {
    "convnet": _convnet,
    "renorm_mlp": _renorm_mlp,
    "multi_axis": _multi_axis,
    "port_mlp": port_mlp,
  }[name]()
  if name == "port_mlp":
    x, y = port_data(96, 0)
    model.compile(
      optimizer=tf_keras.optimizers.SGD(0.1),
      loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0)
    x_infer, _ = port_data(8, 1)
  else:
    _train(model, input_shape, task, rs)
    x_infer = (rs.standard_normal((8,) + input_shape) * 1.5 + 0.3).astype(np.float32)

  arrays = {"x_infer": x_infer, "y_infer": model(x_infer, training=False).numpy()}
  layers = {}
  for layer in model.layers:
    if not layer.weights:
      continue
    for i, w in enumerate(layer.get_weights()):
      arrays[f"{layer.name}/{i}"] = w
    layers[layer.name] = {
      "class_name": type(layer).__name__,
      "config": layer.get_config(),
      "weight_names": [w.name for w in layer.weights],
    }
  if name != "port_mlp":
    model.save(FIXTURES / f"{name}.h5", save_format="h5", include_optimizer=False)
  if name == "convnet":
    model.save_weights(FIXTURES / f"{name}_weights.h5")  # legacy HDF5 format
  # One training call after the files are written: outputs and the BN weights it leaves.
  arrays["y_train"] = model(x_infer, training=True).numpy()
  for layer in model.layers:
    if isinstance(layer, BatchNormalization):
      for i, w in enumerate(layer.get_weights()):
        arrays[f"{layer.name}/after_train/{i}"] = w
  _write_json(
    f"{name}.json",
    {"input_shape": list(input_shape), "layers": layers, "model": name, **_versions()},
  )
  np.savez_compressed(FIXTURES / f"{name}.npz", **arrays)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kbn-python", default=str(ROOT / ".venv" / "bin" / "python"))
  parser.add_argument("--tf1-configs", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  _setup_tf()
  if args.tf1_configs:
    tf1_configs()
    return
  FIXTURES.mkdir(exist_ok=True)
  write_config_cases(_tf1_configs_from_subprocess())
  write_exported(args.kbn_python)
  write_constraints()
  for name in CASES.MODELS:
    write_model(name)
  print(f"wrote {sorted(p.name for p in FIXTURES.iterdir())}")


if __name__ == "__main__":
  main()
