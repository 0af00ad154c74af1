"""Write the saved-model fixtures of `tests/oracles/keras_files/fixtures` with real tf_keras and
Keras 3.

Run from the repository root with an oracle venv that has TensorFlow, tf_keras and Keras 3 (no JAX
needed)::

    python3 -m venv /tmp/oracle_h2
    /tmp/oracle_h2/bin/pip install "tensorflow-cpu==2.21.*" "tf-keras==2.21.*" h5py numpy
    /tmp/oracle_h2/bin/python tests/oracles/keras_files/generate.py

Each library runs in its own subprocess (``--part tf_keras`` / ``--part keras3``); the parent
merges their manifests into ``fixtures/manifest.json``. See README.md for the files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"

# Deterministic, quiet, modest CPU use; Keras 3 on the TensorFlow backend.
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.pop("TF_USE_LEGACY_KERAS", None)

SEED = 0
N_FIT = 32  # samples for the short fit
N_REF = 8  # samples of the reference batch


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if hasattr(value, "item") and getattr(value, "shape", None) == ():
    return value.item()
  return value


def _setup_tf():
  import tensorflow as tf  # noqa: PLC0415

  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.get_logger().setLevel("ERROR")
  return tf


def _data(np, shape=(6, 6, 3), n=N_FIT, seed=SEED):
  rng = np.random.default_rng(seed)
  x = (1.0 + 2.0 * rng.standard_normal((n, *shape))).astype("float32")
  y = rng.integers(0, 3, size=(n,)).astype("int32")
  return x, y


def _reference(np, keras, model, bn_inputs, bn_layers, x):
  """Per BN layer: its input batch, Keras's outputs on it and get_weights() around a training call.

  `bn_inputs[key]` is a list of (model, tensor) stages: the first extracts from `model`'s input,
  each further one from the previous stage's nested model input (for layers of nested models).
  """
  arrays, shapes = {}, {}
  for key, layer in bn_layers.items():
    value = x
    for stage_model, tensor in bn_inputs[key]:
      value = np.asarray(keras.Model(stage_model.inputs, tensor)([value], training=False))
    w_before = [np.asarray(w) for w in layer.get_weights()]
    y_infer = np.asarray(layer(value, training=False))
    y_train = np.asarray(layer(value, training=True))
    w_after = [np.asarray(w) for w in layer.get_weights()]
    arrays[f"{key}/x"] = value
    arrays[f"{key}/y_infer"] = y_infer
    arrays[f"{key}/y_train"] = y_train
    for i, w in enumerate(w_before):
      arrays[f"{key}/w_before/{i}"] = w
    for i, w in enumerate(w_after):
      arrays[f"{key}/w_after/{i}"] = w
    shapes[key] = [None, *value.shape[1:]]
  return arrays, shapes


def _layer_info(layer, shapes, key, y_infer, y_train, w_before, w_after, np):
  return {
    "class": type(layer).__module__ + "." + type(layer).__name__,
    "get_config": _jsonable(layer.get_config()),
    "input_shape": shapes[key],
    "n_weights": len(w_before),
    "frozen": not layer.trainable,
    "train_equals_infer": bool(np.array_equal(y_train, y_infer)),
    "stats_moved": bool(
      any(not np.array_equal(a, b) for a, b in zip(w_before, w_after, strict=True))
    ),
  }


def _summarize(np, bn_layers, arrays, shapes):
  out = {}
  for key, layer in bn_layers.items():
    n = sum(1 for k in arrays if k.startswith(f"{key}/w_before/"))
    wb = [arrays[f"{key}/w_before/{i}"] for i in range(n)]
    wa = [arrays[f"{key}/w_after/{i}"] for i in range(n)]
    out[key] = _layer_info(
      layer, shapes, key, arrays[f"{key}/y_infer"], arrays[f"{key}/y_train"], wb, wa, np
    )
  return out


# ---------------------------------------------------------------------------------------------
# tf_keras (TF2: `tf_keras.layers.BatchNormalization` is the V2 class)
# ---------------------------------------------------------------------------------------------
def _tf_keras_part():
  import numpy as np  # noqa: PLC0415

  tf = _setup_tf()
  import tf_keras as keras  # noqa: PLC0415
  from tf_keras.src.layers.normalization.batch_normalization_v1 import (  # noqa: PLC0415
    BatchNormalization as BatchNormalizationV1,
  )

  keras.utils.disable_interactive_logging()
  L = keras.layers
  manifest = {"library": f"tf_keras {keras.__version__}", "tensorflow": tf.__version__}
  files, models = {}, {}

  def build(bn_cls, name, nested):
    keras.utils.set_random_seed(SEED)
    inp = keras.Input((6, 6, 3), name="image")
    bn_inputs = {}
    h = L.Conv2D(4, 3, padding="same", name="conv1")(inp)
    bn_inputs["bn_frozen"] = h
    h = L.ReLU()(bn_cls(momentum=0.9, name="bn_frozen")(h))
    h = L.Conv2D(5, 3, padding="same", name="conv2")(h)
    bn_inputs["bn_conv"] = h
    h = L.ReLU()(bn_cls(momentum=0.9, name="bn_conv")(h))
    h = L.GlobalAveragePooling2D()(h)
    h = L.Dense(6, name="dense1")(h)
    bn_inputs["bn_dense"] = h
    h = L.ReLU()(bn_cls(momentum=0.9, epsilon=0.01, center=False, name="bn_dense")(h))
    head_in = h
    if nested:
      head = keras.Sequential(
        [keras.Input((6,)), L.Dense(4, name="head_dense"), bn_cls(momentum=0.8, name="bn_head")],
        name="head",
      )
      h = head(h)
    out = L.Dense(3, name="logits")(h)
    model = keras.Model(inp, out, name=name)
    stages = {k: [(model, t)] for k, t in bn_inputs.items()}
    layers = {k: model.get_layer(k) for k in bn_inputs}
    if nested:
      stages["head/bn_head"] = [(model, head_in), (head, head.get_layer("bn_head").input)]
      layers["head/bn_head"] = head.get_layer("bn_head")
    return model, stages, layers

  def train_and_freeze(model):
    x, y = _data(np)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.SGD(0.1), loss)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    model.get_layer("bn_frozen").trainable = False
    model.compile(keras.optimizers.SGD(0.1), loss)

  x_ref, _ = _data(np, n=N_REF, seed=SEED + 1)

  # V2 convnet: .h5, .keras, .weights.h5 and legacy save_weights .h5.
  model, stages, layers = build(L.BatchNormalization, "tfk_convnet", nested=True)
  train_and_freeze(model)
  model.save(FIXTURES / "tfk_convnet.h5", save_format="h5")
  model.save(FIXTURES / "tfk_convnet.keras")
  model.save_weights(FIXTURES / "tfk_convnet.weights.h5")
  model.save_weights(FIXTURES / "tfk_convnet_weights.h5", save_format="h5")
  fused = {k: bool(getattr(v, "fused", None)) for k, v in layers.items()}
  arrays, shapes = _reference(np, keras, model, stages, layers, x_ref)
  np.savez_compressed(FIXTURES / "tfk_convnet.npz", **arrays)
  models["tfk_convnet"] = {
    "layers": _summarize(np, layers, arrays, shapes),
    "fused": fused,
    "true_semantics": "keras_v2",
  }
  v2 = "keras_v2"
  files["tfk_convnet.h5"] = {"model": "tfk_convnet", "format": "h5", "semantics": v2}
  files["tfk_convnet.keras"] = {"model": "tfk_convnet", "format": "keras", "semantics": v2}
  files["tfk_convnet.weights.h5"] = {
    "model": "tfk_convnet",
    "format": "weights_h5",
    "semantics": v2,
    "config_from": "tfk_convnet.keras",
  }
  files["tfk_convnet_weights.h5"] = {
    "model": "tfk_convnet",
    "format": "h5_weights",
    "semantics": v2,
    "config_from": "tfk_convnet.h5",
  }

  # The explicit V1 class: saved exactly as the V2 class is (class name "BatchNormalization",
  # module "keras.layers", same config keys), in .h5 and .keras alike: no file can tell them apart.
  model, stages, layers = build(BatchNormalizationV1, "tfk_v1", nested=False)
  train_and_freeze(model)
  model.save(FIXTURES / "tfk_v1.h5", save_format="h5")
  model.save(FIXTURES / "tfk_v1.keras")
  arrays, shapes = _reference(np, keras, model, stages, layers, x_ref)
  np.savez_compressed(FIXTURES / "tfk_v1.npz", **arrays)
  models["tfk_v1"] = {
    "layers": _summarize(np, layers, arrays, shapes),
    "fused": {k: bool(getattr(v, "fused", None)) for k, v in layers.items()},
    "true_semantics": "keras_v1",
  }
  # What the reader must detect (what the file says), next to the truth above.
  files["tfk_v1.h5"] = {"model": "tfk_v1", "format": "h5", "semantics": "keras_v2"}
  files["tfk_v1.keras"] = {"model": "tfk_v1", "format": "keras", "semantics": "keras_v2"}
  manifest["files"], manifest["models"] = files, models
  return manifest


# ---------------------------------------------------------------------------------------------
# Keras 3
# ---------------------------------------------------------------------------------------------
def _keras3_part():
  import numpy as np  # noqa: PLC0415

  _setup_tf()
  import keras  # noqa: PLC0415

  assert keras.backend.backend() == "tensorflow", keras.backend.backend()
  L = keras.layers
  manifest = {"library": f"keras {keras.__version__}", "backend": keras.backend.backend()}
  keras.utils.set_random_seed(SEED)

  inp = keras.Input((6, 6, 3), name="image")
  bn_inputs = {}
  h = L.Conv2D(4, 3, padding="same", name="conv1")(inp)
  bn_inputs["bn_frozen"] = h
  h = L.ReLU()(L.BatchNormalization(momentum=0.9, name="bn_frozen")(h))
  h = L.Conv2D(5, 3, padding="same", name="conv2")(h)
  bn_inputs["bn_renorm"] = h
  renorm = L.BatchNormalization(
    momentum=0.9,
    renorm=True,
    renorm_clipping={"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0},
    renorm_momentum=0.9,
    name="bn_renorm",
  )
  h = L.ReLU()(renorm(h))
  # A Functional sub-model used as a layer.
  b_in = keras.Input((6, 6, 5), name="block_in")
  b_h = L.Conv2D(6, 1, name="block_conv")(b_in)
  b_bn_in = b_h
  b_h = L.ReLU()(L.BatchNormalization(momentum=0.9, name="bn_inner")(b_h))
  block = keras.Model(b_in, b_h, name="block")
  block_in = h
  h = block(h)
  h = L.GlobalAveragePooling2D()(h)
  h = L.Dense(6, name="dense1")(h)
  bn_inputs["bn_dense"] = h
  h = L.ReLU()(L.BatchNormalization(momentum=0.9, center=False, name="bn_dense")(h))
  # A Sequential sub-model used as a layer.
  head = keras.Sequential(
    [keras.Input((6,)), L.Dense(4, name="head_dense"), L.BatchNormalization(name="bn_head")],
    name="head",
  )
  head_in = h
  h = head(h)
  out = L.Dense(3, name="logits")(h)
  model = keras.Model(inp, out, name="k3_convnet")

  x, y = _data(np)
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  model.compile(keras.optimizers.SGD(0.1), loss)
  model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
  model.get_layer("bn_frozen").trainable = False
  model.compile(keras.optimizers.SGD(0.1), loss)

  model.save(FIXTURES / "k3_convnet.keras")
  model.save(FIXTURES / "k3_convnet.h5")  # legacy HDF5
  model.save_weights(FIXTURES / "k3_convnet.weights.h5")

  stages = {k: [(model, t)] for k, t in bn_inputs.items()}
  layers = {k: model.get_layer(k) for k in bn_inputs}
  stages["block/bn_inner"] = [(model, block_in), (block, b_bn_in)]
  layers["block/bn_inner"] = block.get_layer("bn_inner")
  stages["head/bn_head"] = [(model, head_in), (head, head.get_layer("bn_head").input)]
  layers["head/bn_head"] = head.get_layer("bn_head")
  x_ref, _ = _data(np, n=N_REF, seed=SEED + 1)
  arrays, shapes = _reference(np, keras, model, stages, layers, x_ref)
  np.savez_compressed(FIXTURES / "k3_convnet.npz", **arrays)
  k3 = "keras3"
  manifest["models"] = {
    "k3_convnet": {"layers": _summarize(np, layers, arrays, shapes), "true_semantics": k3}
  }
  manifest["files"] = {
    "k3_convnet.keras": {"model": "k3_convnet", "format": "keras", "semantics": k3},
    "k3_convnet.h5": {"model": "k3_convnet", "format": "h5", "semantics": k3},
    "k3_convnet.weights.h5": {
      "model": "k3_convnet",
      "format": "weights_h5",
      "semantics": k3,
      "config_from": "k3_convnet.keras",
    },
  }
  return manifest


# ---------------------------------------------------------------------------------------------
# tf_keras layer names with "/" (as keras.applications DenseNet writes: "conv1/conv")
# ---------------------------------------------------------------------------------------------
def _tf_keras_slash_part():
  import numpy as np  # noqa: PLC0415

  tf = _setup_tf()
  import tf_keras as keras  # noqa: PLC0415

  keras.utils.disable_interactive_logging()
  L = keras.layers
  manifest = {"library": f"tf_keras {keras.__version__}", "tensorflow": tf.__version__}
  keras.utils.set_random_seed(SEED)
  inp = keras.Input((6, 6, 3), name="image")
  bn_inputs = {}
  h = L.Conv2D(4, 3, padding="same", name="conv1")(inp)
  bn_inputs["conv1/bn"] = h
  h = L.ReLU(name="conv1/relu")(L.BatchNormalization(momentum=0.9, name="conv1/bn")(h))
  h = L.Conv2D(5, 3, padding="same", name="block2/conv")(h)
  bn_inputs["block2/bn"] = h
  h = L.ReLU(name="block2/relu")(L.BatchNormalization(momentum=0.9, name="block2/bn")(h))
  h = L.GlobalAveragePooling2D(name="pool")(h)
  h = L.Dense(6, name="dense1")(h)
  bn_inputs["dense1/bn"] = h
  h = L.BatchNormalization(momentum=0.8, center=False, name="dense1/bn")(h)
  out = L.Dense(3, name="logits")(L.ReLU()(h))
  model = keras.Model(inp, out, name="tfk_slash")
  x, y = _data(np)
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  model.compile(keras.optimizers.SGD(0.1), loss)
  model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
  model.get_layer("conv1/bn").trainable = False  # frozen: V1 and V2 differ in training calls
  model.compile(keras.optimizers.SGD(0.1), loss)
  model.save(FIXTURES / "tfk_slash.h5", save_format="h5")
  model.save(FIXTURES / "tfk_slash.keras")
  model.save_weights(FIXTURES / "tfk_slash.weights.h5")
  model.save_weights(FIXTURES / "tfk_slash_weights.h5", save_format="h5")
  (FIXTURES / "tfk_slash.json").write_text(model.to_json())
  stages = {k: [(model, t)] for k, t in bn_inputs.items()}
  layers = {k: model.get_layer(k) for k in bn_inputs}
  x_ref, _ = _data(np, n=N_REF, seed=SEED + 1)
  arrays, shapes = _reference(np, keras, model, stages, layers, x_ref)
  np.savez_compressed(FIXTURES / "tfk_slash.npz", **arrays)
  v2 = "keras_v2"
  manifest["models"] = {
    "tfk_slash": {
      "layers": _summarize(np, layers, arrays, shapes),
      "true_semantics": v2,
      "to_json": "tfk_slash.json",
    }
  }
  manifest["files"] = {
    "tfk_slash.h5": {"model": "tfk_slash", "format": "h5", "semantics": v2},
    "tfk_slash.keras": {"model": "tfk_slash", "format": "keras", "semantics": v2},
    # Weights-only files with the model.to_json() text as their config (its keras_version says
    # tf_keras under TF2).
    "tfk_slash.weights.h5": {
      "model": "tfk_slash",
      "format": "weights_h5",
      "semantics": v2,
      "config_from": "tfk_slash.json",
    },
    "tfk_slash_weights.h5": {
      "model": "tfk_slash",
      "format": "h5_weights",
      "semantics": v2,
      "config_from": "tfk_slash.json",
    },
  }
  return manifest


PARTS = {"tf_keras": _tf_keras_part, "keras3": _keras3_part, "tf_keras_slash": _tf_keras_slash_part}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--part", choices=sorted(PARTS))
  parser.add_argument(
    "--add",
    choices=sorted(PARTS),
    help="write only this part's files and merge them into the existing manifest",
  )
  args = parser.parse_args()
  FIXTURES.mkdir(exist_ok=True)
  if args.part:
    part = PARTS[args.part]()
    (FIXTURES / f"_part_{args.part}.json").write_text(json.dumps(_jsonable(part)))
    return
  names = [args.add] if args.add else list(PARTS)
  for name in names:
    subprocess.run([sys.executable, __file__, "--part", name], check=True)
  manifest = {"files": {}, "models": {}, "libraries": {}}
  if args.add:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
  for name in names:
    path = FIXTURES / f"_part_{name}.json"
    part = json.loads(path.read_text())
    path.unlink()
    manifest["files"].update(part.pop("files"))
    manifest["models"].update(part.pop("models"))
    manifest["libraries"][name] = part
  text = json.dumps(manifest, indent=1, sort_keys=True)
  (FIXTURES / "manifest.json").write_text(text + "\n")
  sizes = {p.name: p.stat().st_size for p in sorted(FIXTURES.iterdir())}
  print(json.dumps(sizes, indent=1), "total", sum(sizes.values()))


if __name__ == "__main__":
  main()
