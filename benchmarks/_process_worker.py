"""One contender's training steps, timed in this (fresh) process; prints one JSON line.

Run by `bench_processes.py`, never imported by it: the TensorFlow contender runs under an
interpreter that may have no JAX (and the JAX one needs no TensorFlow), so this file imports
only NumPy at the top. Inputs are NumPy-seeded, identical for every contender::

  python benchmarks/_process_worker.py kbn_jax nhwc_64x32x32x64=64,32,32,64:-1 ...

Prints ``{"config name": median seconds per training step, ...}``. ``KBN_TUNE_MALLOC=1`` calls
`kbn_jax.cpu.tune_malloc()` first (A/B tests of a code change: `bench_revision.py`). The
training step is the same as `bench_contenders`'s ``train_step``: forward + cotangents of the
input, gamma and beta for a fixed output cotangent + the moving-statistics update.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np

EPSILON = 1e-3
MOMENTUM = 0.99


def inputs(shape):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(shape, np.float32) * 2.0 + 0.5).astype(np.float32)
  ct = rng.standard_normal(shape, np.float32)
  return x, ct


def median_seconds(run, block, repeats, target_s, warmup=2):
  """Warm-up, calibrate calls per sample to about `target_s`, then the median of `repeats`."""
  for _ in range(warmup):
    block(run())

  def sample(number):
    start = time.perf_counter()
    out = None
    for _ in range(number):
      out = run()
    block(out)
    return (time.perf_counter() - start) / number

  per_call = min(sample(1), sample(1))
  number = max(1, min(1000, round(target_s / max(per_call, 1e-7))))
  return statistics.median(sample(number) for _ in range(repeats))


def kbn_jax_step(shape, axis):
  import jax  # noqa: PLC0415

  import kbn_jax  # noqa: PLC0415

  module = kbn_jax.BatchNormalization(axis=axis, momentum=MOMENTUM, epsilon=EPSILON)
  x, ct = (jax.device_put(a) for a in inputs(shape))
  variables = module.init(jax.random.key(0), x, training=False)
  params, stats = variables["params"], variables["batch_stats"]

  @jax.jit
  def step(params, stats, x, ct):
    def forward(x, params):
      return module.apply(
        {"params": params, "batch_stats": stats}, x, training=True, mutable=["batch_stats"]
      )

    y, vjp, updates = jax.vjp(forward, x, params, has_aux=True)
    return y, vjp(ct), updates

  return (lambda: step(params, stats, x, ct)), jax.block_until_ready


def tf_keras_step(shape, axis):
  import tensorflow as tf  # noqa: PLC0415
  from tf_keras.src.layers.normalization.batch_normalization_v1 import (  # noqa: PLC0415
    BatchNormalization,
  )

  layer = BatchNormalization(axis=axis, momentum=MOMENTUM, epsilon=EPSILON)
  x_np, ct_np = inputs(shape)
  x, ct = tf.constant(x_np), tf.constant(ct_np)
  layer.build(x.shape)
  if not layer.fused:
    raise SystemExit(f"tf_keras V1 does not fuse shape {shape} axis {axis}")

  @tf.function
  def step(x, ct):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
    return y, tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=ct)

  def block(out):
    out[0].numpy()

  return (lambda: step(x, ct)), block


def affine_step(shape, axis):
  """``jax.jit(lambda x: x * 2 + 1)``: one read and one fresh output buffer per call, the
  allocator's cost in isolation."""
  import jax  # noqa: PLC0415

  x = jax.device_put(inputs(shape)[0])
  f = jax.jit(lambda x: x * 2 + 1)
  return (lambda: f(x)), jax.block_until_ready


STEPS = {"kbn_jax": kbn_jax_step, "x*2+1": affine_step, "tf_keras": tf_keras_step}


def main(argv):
  contender, repeats, target_s, *configs = argv
  if os.environ.get("KBN_TUNE_MALLOC") == "1":  # the in-process route, before JAX allocates
    import kbn_jax.cpu  # noqa: PLC0415

    if not kbn_jax.cpu.tune_malloc():
      raise SystemExit("kbn_jax.cpu.tune_malloc() did not apply")
  results = {"pid": os.getpid()}
  for spec in configs:
    name, rest = spec.split("=")
    dims, axis = rest.split(":")
    shape = tuple(int(d) for d in dims.split(","))
    run, block = STEPS[contender](shape, int(axis))
    results[name] = median_seconds(run, block, int(repeats), float(target_s))
  print(json.dumps(results), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main(sys.argv[1:]))
