"""Generate the whole-model fixtures of keras.applications MobileNetV2 (issue 20).

A MobileNetV2 (alpha 0.35, 32x32 input, 5 classes, ``weights=None``, logits) is trained a few
SGD steps on random data and saved; then one batch is recorded: the logits in inference and in
training mode, and every batch norm's moving statistics after that training-mode call. Run from
the repository root in the oracle environment (TensorFlow 2.21, tf_keras 2.21, Keras 3.15)::

    python tests/oracles/model_ports/generate_keras.py tf_keras  # mobilenet_v2_tf_keras.*
    python tests/oracles/model_ports/generate_keras.py keras3    # mobilenet_v2_keras3.*
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = Path(__file__).resolve().parent
SHAPE, CLASSES, ALPHA, BATCH, TRAIN_STEPS, SEED = (32, 32, 3), 5, 0.35, 8, 3, 20


def main(flavour: str) -> int:
  if flavour == "tf_keras":
    import tf_keras as keras

    suffix, version = ".h5", keras.__version__
  elif flavour == "keras3":
    import keras

    suffix, version = ".keras", keras.__version__
  else:
    raise SystemExit("usage: generate_keras.py tf_keras|keras3")
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  keras.utils.set_random_seed(SEED)
  model = keras.applications.MobileNetV2(
    input_shape=SHAPE, alpha=ALPHA, weights=None, classes=CLASSES, classifier_activation=None
  )
  rng = np.random.default_rng(SEED)
  train_x = rng.normal(size=(TRAIN_STEPS * BATCH, *SHAPE)).astype(np.float32)
  train_y = rng.integers(0, CLASSES, TRAIN_STEPS * BATCH)
  model.compile(
    optimizer=keras.optimizers.SGD(0.05),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  model.fit(train_x, train_y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
  path = HERE / f"mobilenet_v2_{flavour}{suffix}"
  if flavour == "tf_keras":
    model.save(path, include_optimizer=False)  # SGD's slots would double the file
  else:
    model.save(path)

  x = (rng.normal(size=(BATCH, *SHAPE)) * 2 + 0.5).astype(np.float32)
  out = {"x": x, "logits_infer": model(x, training=False).numpy()}
  out["logits_train"] = model(x, training=True).numpy()  # also moves the moving statistics
  batch_norms = [layer for layer in model.layers if "BatchNormalization" in type(layer).__name__]
  for layer in batch_norms:
    out[f"moving_mean/{layer.name}"] = layer.moving_mean.numpy()
    out[f"moving_variance/{layer.name}"] = layer.moving_variance.numpy()
  np.savez_compressed(HERE / f"mobilenet_v2_{flavour}.npz", **out)
  meta = {
    "model": f"keras.applications.MobileNetV2(input_shape={SHAPE}, alpha={ALPHA}, "
    f"weights=None, classes={CLASSES}, classifier_activation=None)",
    "training": f"SGD(0.05), {TRAIN_STEPS} steps of batch {BATCH} on random data, seed {SEED}",
    "recorded": "logits of x in inference mode, then in training mode; moving statistics "
    "after that training-mode call",
    "file": path.name,
    "batch_norms": len(batch_norms),
    "tensorflow_version": tf.__version__,
    "keras_version": version,
  }
  (HERE / f"mobilenet_v2_{flavour}.json").write_text(json.dumps(meta, indent=1) + "\n")
  print(path.name, path.stat().st_size, "bytes,", len(batch_norms), "batch norms")
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
