"""Move a trained tf_keras model with V1 BatchNormalization to Flax, then fine-tune it.

    python examples/keras_v1_port.py           # trains the Keras model first if TensorFlow is there
    python examples/keras_v1_port.py --quick   # fewer steps (smoke test)

1. Keras: a tiny model ``Dense -> BatchNormalization (V1) -> ReLU -> Dense`` trained on three
   Gaussian blobs. Without TensorFlow the committed fixture
   ``tests/oracles/keras_models/fixtures/port_mlp.{json,npz}`` (the same model, trained by
   ``tests/oracles/keras_models/generate.py``) stands in.
2. Port: the layer config goes through ``BatchNormalization.from_keras_config``, its
   ``get_weights()`` through ``keras_compat.variables_from_keras``; Dense kernels copy over as they
   are (Keras and Flax both store ``(in, out)``).
3. Check: Flax predictions (moving statistics) and a training-mode call (batch statistics) equal
   Keras's.
4. Fine-tune the classifier with the batch-norm layer frozen (Keras's ``trainable=False``): optax
   ``adamw`` through ``kbn_jax.training.keras_optimizer`` leaves gamma, beta and the moving
   statistics exactly as they were.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kbn_jax
from kbn_jax import keras_compat, training

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "oracles" / "keras_models" / "fixtures"
CENTERS = np.array([[2.0, 0, 0, 1], [0, 2.0, 0, -1], [0, 0, 2.0, 0]])


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Three Gaussian blobs in 4-D: float32 points and int32 labels."""
  rs = np.random.RandomState(seed)
  labels = rs.randint(0, 3, size=n)
  x = CENTERS[labels] + rs.standard_normal((n, 4))
  return x.astype(np.float32), labels.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# 1. The Keras side
# ---------------------------------------------------------------------------------------------
def train_keras_model(epochs: int) -> dict:
  """Trains the tf_keras model and returns what the port needs (TensorFlow required)."""
  import tf_keras  # noqa: PLC0415 (optional)
  from tf_keras.src.layers.normalization.batch_normalization_v1 import (  # noqa: PLC0415
    BatchNormalization,
  )

  tf_keras.utils.set_random_seed(0)
  layers = tf_keras.layers
  inputs = layers.Input((4,))
  x = layers.Dense(16, name="dense")(inputs)
  x = BatchNormalization(momentum=0.9, name="bn")(x)
  outputs = layers.Dense(3, name="logits")(layers.ReLU()(x))
  model = tf_keras.Model(inputs, outputs)
  model.compile(
    optimizer=tf_keras.optimizers.SGD(0.1),
    loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  x_train, y_train = blobs(96, 0)
  model.fit(x_train, y_train, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
  x_test, _ = blobs(8, 1)
  port = {
    "source": f"tf_keras {tf_keras.__version__}, trained for {epochs} epochs",
    "bn_config": model.get_layer("bn").get_config(),
    "weights": {n: model.get_layer(n).get_weights() for n in ("dense", "bn", "logits")},
    "x": x_test,
    "y_infer": model(x_test, training=False).numpy(),
  }
  port["y_train"] = model(x_test, training=True).numpy()  # (this call moves Keras's statistics)
  return port


def load_fixture() -> dict:
  """The same model, trained by the fixture generator (no TensorFlow needed)."""
  record = json.loads((FIXTURE / "port_mlp.json").read_text())
  with np.load(FIXTURE / "port_mlp.npz") as arrays:
    arrays = dict(arrays)
  weights = {}
  for name in ("dense", "bn", "logits"):
    weights[name] = [
      arrays[f"{name}/{i}"] for i in range(len(record["layers"][name]["weight_names"]))
    ]
  return {
    "source": f"committed fixture (tf_keras {record['tf_keras_version']})",
    "bn_config": record["layers"]["bn"]["config"],
    "weights": weights,
    "x": arrays["x_infer"],
    "y_infer": arrays["y_infer"],
    "y_train": arrays["y_train"],
  }


# ---------------------------------------------------------------------------------------------
# 2. The Flax side
# ---------------------------------------------------------------------------------------------
class PortedMLP(nn.Module):
  """The Keras model in Flax; `bn` is the ported layer (its variables live under ``"bn"``)."""

  bn: kbn_jax.BatchNormalization

  @nn.compact
  def __call__(self, x, training: bool = False):
    x = nn.Dense(16, name="dense")(x)
    x = nn.relu(self.bn(x, training=training))
    return nn.Dense(3, name="logits")(x)


def port(keras: dict) -> tuple[PortedMLP, dict]:
  """Builds the Flax model and its variables from the Keras config and weights."""
  bn = kbn_jax.BatchNormalization.from_keras_config(keras["bn_config"])
  bn_variables = keras_compat.variables_from_keras(bn, keras["weights"]["bn"], (None, 16))
  params = {"bn": bn_variables["params"]}
  for name in ("dense", "logits"):
    kernel, bias = keras["weights"][name]
    params[name] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
  return PortedMLP(bn), {"params": params, "batch_stats": {"bn": bn_variables["batch_stats"]}}


# ---------------------------------------------------------------------------------------------
# 4. Fine-tuning with the batch-norm layer frozen
# ---------------------------------------------------------------------------------------------
def fine_tune(model: PortedMLP, variables: dict, steps: int) -> dict:
  """Trains with the BN layer frozen; returns the new variables."""
  frozen = dataclasses.replace(model, bn=dataclasses.replace(model.bn, trainable=False))
  x_train, y_train = blobs(64, 2)
  sites = training.find_batch_norms(frozen, x_train[:8])
  tx = training.keras_optimizer(optax.adamw(1e-2, weight_decay=1e-2), sites)
  params, opt_state = variables["params"], tx.init(variables["params"])

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(params):
      # V1 frozen layer: batch statistics in training calls, moving statistics never updated.
      logits = frozen.apply({**variables, "params": params}, x, training=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(steps):
    batch = slice(16 * (i % 4), 16 * (i % 4 + 1))
    params, opt_state, loss = step(params, opt_state, x_train[batch], y_train[batch])
  print(f"fine-tuned {steps} steps, last loss {float(loss):.4f}")
  return {**variables, "params": params}


def main(argv: list[str] | None = None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
  args = parser.parse_args(argv)

  if importlib.util.find_spec("tf_keras") is not None:
    keras = train_keras_model(epochs=1 if args.quick else 5)
  else:
    print("TensorFlow/tf_keras not installed: using the committed Keras fixture instead.")
    keras = load_fixture()
  print(f"Keras model: {keras['source']}")

  model, variables = port(keras)
  x = jnp.asarray(keras["x"])
  y_infer = model.apply(variables, x)
  y_train, _ = model.apply(variables, x, training=True, mutable=["batch_stats"])
  error = max(
    float(np.max(np.abs(np.asarray(y_infer) - keras["y_infer"]))),
    float(np.max(np.abs(np.asarray(y_train) - keras["y_train"]))),
  )
  print(f"max |flax - keras| over inference and training outputs: {error:.2e}")
  if error > 1e-5:
    raise SystemExit("The ported model does not reproduce Keras's outputs.")

  tuned = fine_tune(model, variables, steps=2 if args.quick else 40)
  frozen_before = (variables["batch_stats"], variables["params"]["bn"])
  frozen_after = (tuned["batch_stats"], tuned["params"]["bn"])
  assert jax.tree.all(jax.tree.map(np.array_equal, frozen_after, frozen_before))
  x_test, y_test = blobs(256, 3)
  accuracy = float(np.mean(np.argmax(model.apply(tuned, x_test), axis=-1) == y_test))
  print(f"gamma, beta and moving statistics unchanged by fine-tuning; test accuracy {accuracy:.3f}")
  return error


if __name__ == "__main__":
  main()
