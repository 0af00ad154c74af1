"""Data-parallel training with synchronized Keras V1 batch norm on 8 host devices.

    python examples/sharded_train.py              # jax.shard_map, statistics synced by axis_name
    python examples/sharded_train.py --mode jit   # sharded jit: no axis_name, XLA syncs them
    python examples/sharded_train.py --quick      # a few steps (smoke test)

The global batch is split over a one-axis mesh ``("data",)``. With ``--mode shard_map`` each
device runs the step on its shard and every `kbn_jax.BatchNormalization` computes the statistics
of the whole global batch with one all-gather of per-channel partials (``axis_name="data"``).
With ``--mode jit`` the same model without ``axis_name`` is jitted on a sharded batch and XLA
inserts per-channel all-reduces. Either way the moving statistics are those of the global batch
and every device holds the same copy, which the script checks at the end. The data is
scikit-learn's bundled 8x8 digits (``pip install -e ".[examples]"``), so nothing is downloaded.
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
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

AXIS = "data"
NUM_DEVICES = 8


def make_step(model: SyncedCNN, tx: optax.GradientTransformation, global_batch: int):
  """``step(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss)``.

  The loss is the sum over the local batch divided by the *global* batch size: under
  `shard_map` the gradients of the replicated parameters are summed over devices (JAX inserts
  the psum), which then gives the gradient of the global mean loss; under sharded jit the local
  batch is the global one.
  """

  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, training=True, mutable=["batch_stats"]
      )
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.sum(losses) / global_batch, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if model.axis_name is not None:
      loss = jax.lax.psum(loss, model.axis_name)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return step


def build(mode: str, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, batch: int):
  """The jitted train step for `mode` (``"shard_map"`` or ``"jit"``) and its model."""
  if mode == "jit":
    model = SyncedCNN(axis_name=None)
    return model, jax.jit(make_step(model, tx, batch))
  model = SyncedCNN(axis_name=AXIS)
  # Parameters, statistics and optimizer state replicated; images and labels split.
  specs = (P(), P(), P(), P(AXIS), P(AXIS))
  step = jax.shard_map(
    make_step(model, tx, batch), mesh=mesh, in_specs=specs, out_specs=(P(), P(), P(), P())
  )
  return model, jax.jit(step)


def assert_identical_on_every_device(batch_stats) -> None:
  """Every device's own buffer of every moving statistic holds the same bits."""
  for path, value in jax.tree.leaves_with_path(batch_stats):
    copies = [np.asarray(shard.data) for shard in value.addressable_shards]
    assert len(copies) == NUM_DEVICES, (jax.tree_util.keystr(path), len(copies))
    for copy in copies[1:]:
      np.testing.assert_array_equal(copy, copies[0], err_msg=jax.tree_util.keystr(path))


def main(argv: list[str] | None = None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=("shard_map", "jit"), default="shard_map")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--per-device-batch", type=int, default=16)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  global_batch = NUM_DEVICES * args.per_device_batch
  data = load_digits()
  tx = optax.adam(args.learning_rate)
  model, step = build(args.mode, tx, mesh, global_batch)

  variables = jax.jit(SyncedCNN().init)(jax.random.key(0), jnp.asarray(data.x_train[:global_batch]))
  params, batch_stats = variables["params"], variables["batch_stats"]
  params, batch_stats, opt_state = jax.device_put(
    (params, batch_stats, tx.init(params)), replicated
  )

  rng = np.random.default_rng(0)
  epochs, max_steps = (1, 3) if args.quick else (args.epochs, None)
  print(f"mode={args.mode}: {NUM_DEVICES} devices x {args.per_device_batch} images per step")
  for epoch in range(1, epochs + 1):
    for i, indices in enumerate(epoch_batches(len(data.x_train), global_batch, rng)[:max_steps]):
      x = jax.device_put(data.x_train[indices], split)
      y = jax.device_put(data.y_train[indices], split)
      params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y)
      print(f"epoch {epoch} step {i + 1:3d}  loss {float(loss):.4f}")

  assert_identical_on_every_device(batch_stats)
  # Inference uses the moving statistics: no collectives, any batch size, one device.
  logits = jax.jit(model.apply)({"params": params, "batch_stats": batch_stats}, data.x_test)
  accuracy = float(jnp.mean(jnp.argmax(logits, axis=-1) == jnp.asarray(data.y_test)))
  print(
    f"moving statistics identical on all {NUM_DEVICES} devices; test accuracy {accuracy:.3f} "
    f"({time.perf_counter() - start:.1f} s)"
  )
  return accuracy


if __name__ == "__main__":
  main()
