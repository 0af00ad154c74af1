"""One process of the two-process synchronized batch-norm run of `test_multiprocess.py`.

Run as a script, it joins a `jax.distributed` cluster on 127.0.0.1 (CPU collectives through
gloo), builds a mesh over every device of every process, trains a few steps of a layer with
``axis_name="data"`` under `jax.shard_map`, and writes what it saw to an ``.npz`` file. Imported,
it provides the same training step on one device (`run_single_device`), the reference the test
compares against. The launcher sets ``XLA_FLAGS`` (host device count) and ``JAX_PLATFORMS``.

Usage::

  python tests/_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kbn_jax

AXIS = "data"
STEPS = 3
BATCH = 16
# NHWC, so the layer takes the fused path and the Bessel factor must use the global count.
INPUT_SHAPE = (BATCH, 2, 3, 4)
LEARNING_RATE = 0.1


def make_layer(axis_name: str | None) -> kbn_jax.BatchNormalization:
  """The layer under test; `axis_name` None gives the single-device reference."""
  return kbn_jax.BatchNormalization(momentum=0.8, epsilon=1e-3, axis_name=axis_name)


def make_data() -> tuple[np.ndarray, np.ndarray]:
  """Inputs and output cotangents for every step, identical in every process."""
  rng = np.random.default_rng(1234)
  xs = rng.normal(2.0, 3.0, (STEPS,) + INPUT_SHAPE).astype(np.float32)
  cotangents = rng.normal(0.0, 1.0, (STEPS,) + INPUT_SHAPE).astype(np.float32)
  return xs, cotangents


def init_variables() -> dict:
  """Initial variables, with non-trivial gamma and beta."""
  variables = make_layer(None).init(jax.random.key(0), np.zeros(INPUT_SHAPE, np.float32))
  channels = INPUT_SHAPE[-1]
  params = {
    "gamma": jnp.linspace(0.5, 1.5, channels, dtype=jnp.float32),
    "beta": jnp.linspace(-1.0, 1.0, channels, dtype=jnp.float32),
  }
  return {"params": params, "batch_stats": variables["batch_stats"]}


def make_train_step(layer: kbn_jax.BatchNormalization):
  """One SGD step on ``loss = sum(y * cotangent)``; returns outputs and the new state.

  Returns:
    ``step(variables, x, cotangent) -> (new_variables, y, grad_x)``.
  """

  def step(variables, x, cotangent):
    def loss(params, x):
      y, updates = layer.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        training=True,
        mutable=["batch_stats"],
      )
      return jnp.sum(y * cotangent), (y, updates["batch_stats"])

    grads, (y, batch_stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    grad_params, grad_x = grads
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, variables["params"], grad_params)
    return {"params": params, "batch_stats": batch_stats}, y, grad_x

  return step


def run_single_device() -> dict[str, np.ndarray]:
  """The reference: the same steps on one device with the whole batch."""
  step = jax.jit(make_train_step(make_layer(None)))
  results, _ = _train(step, init_variables(), *make_data(), to_numpy=np.asarray)
  return results


def _train(step, variables, xs, cotangents, to_numpy):
  """Runs `STEPS` steps.

  Returns:
    ``(results, variables)``: outputs and input gradients of each step and the final state as
    NumPy arrays, and the final variables as they are.
  """
  ys, grads = [], []
  for x, cotangent in zip(xs, cotangents, strict=True):
    variables, y, grad_x = step(variables, x, cotangent)
    ys.append(to_numpy(y))
    grads.append(to_numpy(grad_x))
  results = {"y": np.stack(ys), "grad_x": np.stack(grads)}
  for collection in ("params", "batch_stats"):
    for name, value in variables[collection].items():
      results[name] = to_numpy(value)
  return results, variables


def main(process_id: int, num_processes: int, port: int, out_path: str) -> None:
  """Joins the cluster, trains with synchronized statistics and writes the results."""
  from jax.experimental import multihost_utils  # noqa: PLC0415 (only the script needs it)

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,
  )
  try:
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
    batch = NamedSharding(mesh, P(AXIS))
    step = jax.jit(
      jax.shard_map(
        make_train_step(make_layer(AXIS)),
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(AXIS)),
        out_specs=(P(), P(AXIS), P(AXIS)),
      )
    )
    xs, cotangents = make_data()

    def global_array(value, sharding):
      return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    variables = jax.tree.map(
      lambda v: global_array(np.asarray(v), NamedSharding(mesh, P())), init_variables()
    )
    x_global = [global_array(x, batch) for x in xs]
    c_global = [global_array(c, batch) for c in cotangents]

    def to_numpy(value):
      return np.asarray(multihost_utils.process_allgather(value, tiled=True))

    results, variables = _train(step, variables, x_global, c_global, to_numpy)
    # Each local device's own copy of the moving statistics, to check they are bit-identical.
    for name, value in variables["batch_stats"].items():
      results[f"local_{name}"] = np.stack([np.asarray(s.data) for s in value.addressable_shards])
    results["process_count"] = np.asarray(jax.process_count())
    results["global_devices"] = np.asarray(jax.device_count())
    np.savez(out_path, **results)
  finally:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
