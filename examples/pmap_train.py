"""Data-parallel training with synchronized Keras V1 batch norm under `jax.pmap`, 8 host devices.

    python examples/pmap_train.py           # a few epochs on the 8x8 digits
    python examples/pmap_train.py --quick   # a few steps (smoke test)

`jax.pmap` is in maintenance mode (JAX runs it through `shard_map`); new code should prefer
``examples/sharded_train.py``. This script shows the classic pmap recipe still works: every
device holds its own copy of the parameters and moving statistics (a leading device axis), the
batch gets a leading device axis, and `kbn_jax.BatchNormalization(axis_name="batch")` makes the
batch statistics those of the whole global batch. Gradients are averaged with ``pmean`` as
usual. At the end the script checks that every device's moving statistics are bit-identical.
"""

from __future__ import annotations

import os

# The host platform must be split into 8 devices before JAX starts.
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import SyncedCNN, epoch_batches, load_digits  # noqa: E402

AXIS = "batch"
NUM_DEVICES = 8


def make_step(model: SyncedCNN, tx: optax.GradientTransformation):
  """The per-device step; gradients and loss are averaged over the pmap axis."""

  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, training=True, mutable=["batch_stats"]
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads, loss = jax.lax.pmean((grads, loss), AXIS)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return step


def replicate(tree):
  """One copy per device: a leading axis of size `NUM_DEVICES`."""
  return jax.tree.map(lambda a: np.broadcast_to(a, (NUM_DEVICES,) + np.shape(a)), tree)


def assert_identical_on_every_device(batch_stats) -> None:
  """Row ``d`` of every statistic is device ``d``'s copy: all rows hold the same bits."""
  for path, value in jax.tree.leaves_with_path(batch_stats):
    value = np.asarray(value)
    assert value.shape[0] == NUM_DEVICES, (jax.tree_util.keystr(path), value.shape)
    np.testing.assert_array_equal(
      value, np.broadcast_to(value[:1], value.shape), err_msg=jax.tree_util.keystr(path)
    )


def main(argv: list[str] | None = None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--per-device-batch", type=int, default=16)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  assert jax.local_device_count() == NUM_DEVICES, jax.devices()
  global_batch = NUM_DEVICES * args.per_device_batch
  data = load_digits()
  model, tx = SyncedCNN(axis_name=AXIS), optax.adam(args.learning_rate)
  step = jax.pmap(make_step(model, tx), axis_name=AXIS)

  # `init` skips the collectives, so it runs outside pmap on one device's batch.
  variables = jax.jit(model.init)(jax.random.key(0), data.x_train[: args.per_device_batch])
  params, batch_stats = variables["params"], variables["batch_stats"]
  params, batch_stats, opt_state = replicate((params, batch_stats, tx.init(params)))

  def per_device(a):
    return a.reshape((NUM_DEVICES, args.per_device_batch) + a.shape[1:])

  rng = np.random.default_rng(0)
  epochs, max_steps = (1, 3) if args.quick else (args.epochs, None)
  print(f"pmap: {NUM_DEVICES} devices x {args.per_device_batch} images per step")
  for epoch in range(1, epochs + 1):
    for i, indices in enumerate(epoch_batches(len(data.x_train), global_batch, rng)[:max_steps]):
      x, y = per_device(data.x_train[indices]), per_device(data.y_train[indices])
      params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y)
      print(f"epoch {epoch} step {i + 1:3d}  loss {float(loss[0]):.4f}")

  assert_identical_on_every_device(batch_stats)
  # Inference on one device with device 0's copy (moving statistics, no collectives).
  first = jax.tree.map(lambda a: a[0], {"params": params, "batch_stats": batch_stats})
  logits = jax.jit(model.apply)(first, data.x_test)
  accuracy = float(jnp.mean(jnp.argmax(logits, axis=-1) == jnp.asarray(data.y_test)))
  print(
    f"moving statistics identical on all {NUM_DEVICES} devices; test accuracy {accuracy:.3f} "
    f"({time.perf_counter() - start:.1f} s)"
  )
  return accuracy


if __name__ == "__main__":
  main()
