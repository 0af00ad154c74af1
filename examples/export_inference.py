"""Serve a trained model: fold batch norm into the convolutions, then export it with jax.export.

    python examples/export_inference.py                  # train, fold, export, reload, check
    python examples/export_inference.py --out cnn.bin    # also write the serialized artifact

1. Train the digits CNN of ``train_digits.py`` (Keras V1 batch norm) for a few epochs.
2. Fold each trained `kbn_jax.BatchNormalization` (its inference map ``x * a + b`` from the moving
   statistics) into the kernel and bias of the convolution before it, with
   `kbn_jax.folding.fold_batch_norm`; the folded network has no normalization layer left. Check that
   it computes the same logits as the unfolded model in inference.
3. Export the jitted folded inference function with `jax.export` for any batch size (a symbolic
   batch dimension), serialize it to bytes (StableHLO with the weights inside), deserialize it
   and call it; check its outputs against the in-process model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _common import CNN, Trainer, batch_norm_layer, fit, load_digits

from kbn_jax import folding


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--out", type=Path, default=None, help="write the serialized export here")
  parser.add_argument("--quick", action="store_true", help="two training steps (smoke test)")
  return parser.parse_args(argv)


def fold_cnn(model: CNN, variables: dict[str, Any]) -> dict[str, Any]:
  """Parameters of ``CNN(bn="none")`` equal in inference to `model` with `variables`."""
  params, batch_stats = variables["params"], variables["batch_stats"]
  layer = batch_norm_layer(model)  # the configuration of every batch norm of `model`
  folded = {"head": params["head"]}
  for i in range(len(model.features)):
    bn_variables = {"params": params[f"bn{i}"], "batch_stats": batch_stats[f"bn{i}"]}
    folded[f"conv{i}"] = folding.fold_batch_norm(params[f"conv{i}"], layer, bn_variables)
  return folded


def check_close(name: str, actual: jax.Array, expected: jax.Array, tolerance: float) -> None:
  """Prints how far `actual` is from `expected`; exits with an error beyond `tolerance`."""
  error = float(jnp.max(jnp.abs(actual - expected)))
  scale = float(jnp.max(jnp.abs(expected)))
  same_class = float(jnp.mean(jnp.argmax(actual, -1) == jnp.argmax(expected, -1)))
  print(
    f"{name}: max |difference| {error:.2e} (logits up to {scale:.1f}), same class {same_class:.0%}"
  )
  if error > tolerance * max(scale, 1.0):
    raise SystemExit(f"{name}: outputs differ by {error:.3g}, more than {tolerance:.0e} relative")


def export_and_reload(infer, sample: jax.Array, out: Path | None) -> jax.export.Exported:
  """Exports `infer` for any batch size, serializes it, and deserializes the bytes."""
  batch = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((*batch, *sample.shape[1:]), sample.dtype)
  blob = jax.export.export(infer)(spec).serialize()
  if out is not None:
    out.write_bytes(blob)
    print(f"wrote {out}")
  restored = jax.export.deserialize(blob)
  print(
    f"exported {len(blob) / 1024:.0f} KiB of serialized StableHLO for {restored.platforms}: "
    f"{restored.in_avals[0].str_short()} -> {restored.out_avals[0].str_short()}"
  )
  return restored


def median_seconds(fn, calls: int) -> float:
  """Median wall time of ``fn()`` after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  data = load_digits()
  model = CNN(bn="keras_v1")
  state, test_accuracy = fit(
    Trainer(model),
    data,
    epochs=1 if args.quick else args.epochs,
    batch_size=args.batch_size,
    max_steps_per_epoch=2 if args.quick else None,
  )
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  print(f"trained model: test accuracy {test_accuracy:.2%}")

  # Fold: each conv -> batch norm pair becomes one conv with a bias.
  folded_model = CNN(bn="none", features=model.features)
  folded_params = fold_cnn(model, variables)
  x_test = jnp.asarray(data.x_test)
  unfolded = jax.jit(model.apply)
  infer = jax.jit(lambda x: folded_model.apply({"params": folded_params}, x))
  folded_logits = infer(x_test)
  check_close("folded vs unfolded", folded_logits, unfolded(variables, x_test), tolerance=1e-4)

  restored = export_and_reload(infer, x_test, args.out)
  exported_logits = restored.call(x_test)
  check_close("exported vs in-process", exported_logits, folded_logits, tolerance=1e-6)
  one = restored.call(x_test[:1])  # any batch size, no re-export
  accuracy = float(np.mean(np.argmax(exported_logits, -1) == data.y_test))
  print(f"exported model: test accuracy {accuracy:.2%}; a batch of 1 gives {one.shape}")

  calls = 3 if args.quick else 200
  timings = {
    "unfolded (jit)": lambda: unfolded(variables, x_test),
    "folded (jit)": lambda: infer(x_test),
    "exported": lambda: restored.call(x_test),
  }
  print(f"inference time for {len(x_test)} images, median of {calls} calls:")
  for name, fn in timings.items():
    print(f"  {name:<15} {median_seconds(fn, calls) * 1e3:.2f} ms")


if __name__ == "__main__":
  main()
