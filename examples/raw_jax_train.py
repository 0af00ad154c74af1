"""Train an MLP with Keras V1 batch normalization in raw JAX: no Flax, no optax.

    python examples/raw_jax_train.py             # 10 epochs
    python examples/raw_jax_train.py --quick     # two steps (smoke test)

The layer is `kbn_jax.functional.batch_normalization`, a pure function: the parameters
(``gamma``/``beta``) and the moving statistics are plain dicts of arrays, created by
`kbn_jax.functional.init_variables`, and each training call returns the new statistics, which the
jitted train step hands back with the new parameters. The model is ``(dense -> batch norm ->
relu) x 2 -> dense`` on the flattened 8x8 digits (scikit-learn's bundled copy, so nothing is
downloaded), trained with SGD with momentum written out in a few lines. The same two calls serve
Equinox or Haiku modules: keep ``params`` as trainable leaves and ``stats`` as state.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kbn_jax import functional

NUM_CLASSES = 10
# One configuration object per layer kind: validated once, hashable, shared by both layers.
BN = functional.BatchNormConfig(momentum=0.9)


def load_digits(test_fraction: float = 0.25, seed: int = 0):
  """The 1797 digits as flat float32 vectors in [0, 1] and int32 labels, split stratified
  (the split of ``examples/_common.py``)."""
  from sklearn.datasets import load_digits as sklearn_digits  # noqa: PLC0415 (optional extra)
  from sklearn.model_selection import train_test_split  # noqa: PLC0415

  data = sklearn_digits()
  images = (data.images / 16.0).astype(np.float32).reshape(len(data.images), -1)
  labels = data.target.astype(np.int32)
  return train_test_split(
    images, labels, test_size=test_fraction, random_state=seed, stratify=labels
  )


def init(key: jax.Array, features: tuple[int, ...], in_features: int):
  """Weights of the MLP and its batch-norm variables, as plain nested dicts."""
  params, stats = {}, {}
  sizes = (in_features, *features)
  keys = jax.random.split(key, 2 * len(features) + 1)
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    # No bias: batch norm's beta is the offset.
    scale = np.sqrt(2.0 / fan_in)
    params[f"dense{i}"] = scale * jax.random.normal(keys[2 * i], (fan_in, fan_out), jnp.float32)
    params[f"bn{i}"], stats[f"bn{i}"] = functional.init_variables(BN, keys[2 * i + 1], (1, fan_out))
  head_scale = np.sqrt(1.0 / sizes[-1])
  params["head"] = {
    "kernel": head_scale * jax.random.normal(keys[-1], (sizes[-1], NUM_CLASSES), jnp.float32),
    "bias": jnp.zeros((NUM_CLASSES,), jnp.float32),
  }
  return params, stats


def forward(params, stats, x, *, training: bool):
  """Logits and the new statistics (unchanged in inference)."""
  new_stats = {}
  for i in range(sum(name.startswith("dense") for name in params)):
    x = x @ params[f"dense{i}"]
    x, new_stats[f"bn{i}"] = functional.batch_normalization(
      x, params[f"bn{i}"], stats[f"bn{i}"], BN, training=training
    )
    x = jax.nn.relu(x)
  return x @ params["head"]["kernel"] + params["head"]["bias"], new_stats


def cross_entropy(logits, labels):
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


@jax.jit
def train_step(params, stats, velocity, x, y, learning_rate, momentum):
  """One SGD-with-momentum step; returns the new parameters, statistics, velocity and loss."""

  def loss_fn(params):
    logits, new_stats = forward(params, stats, x, training=True)
    return cross_entropy(logits, y), new_stats

  (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, grads)
  params = jax.tree.map(lambda p, v: p - learning_rate * v, params, velocity)
  return params, new_stats, velocity, loss


@jax.jit
def accuracy(params, stats, x, y):
  """Inference-mode accuracy: the moving statistics normalize, nothing is updated."""
  logits, _ = forward(params, stats, x, training=False)
  return jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=0.05)
  parser.add_argument("--momentum", type=float, default=0.9)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="two steps only (smoke test)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
  args = parse_args(argv)
  start = time.perf_counter()
  x_train, x_test, y_train, y_test = load_digits()
  epochs = 1 if args.quick else args.epochs
  params, stats = init(jax.random.key(args.seed), (128, 128), x_train.shape[1])
  velocity = jax.tree.map(jnp.zeros_like, params)
  rng = np.random.default_rng(args.seed)
  steps = len(x_train) // args.batch_size
  print(
    f"{len(x_train)} training and {len(x_test)} test images, batch {args.batch_size}, "
    f"{epochs} epochs"
  )
  lr, momentum = jnp.float32(args.learning_rate), jnp.float32(args.momentum)
  test_accuracy = float("nan")
  for epoch in range(1, epochs + 1):
    order = rng.permutation(len(x_train))[: steps * args.batch_size]
    batches = order.reshape(steps, args.batch_size)[: 2 if args.quick else None]
    for indices in batches:
      params, stats, velocity, loss = train_step(
        params, stats, velocity, x_train[indices], y_train[indices], lr, momentum
      )
    test_accuracy = float(accuracy(params, stats, x_test, y_test))
    print(f"epoch {epoch}: loss {float(loss):.3f}, test accuracy {test_accuracy:.2%}")
  seconds = time.perf_counter() - start
  print(
    f"test accuracy (inference with the moving statistics): {test_accuracy:.2%} in {seconds:.1f} s"
  )
  # Read by the smoke test: the raw-JAX path needs neither Flax nor optax.
  loaded = {name: name in sys.modules for name in ("flax", "optax")}
  print(f"imported: flax={loaded['flax']} optax={loaded['optax']}")
  return test_accuracy


if __name__ == "__main__":
  main()
