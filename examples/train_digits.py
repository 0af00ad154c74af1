"""Train a small CNN with Keras V1 batch normalization on the 8x8 digits, in Flax and optax.

    python examples/train_digits.py                 # Keras V1 batch norm (default)
    python examples/train_digits.py --bn renorm     # batch renormalization with clipping warm-up
    python examples/train_digits.py --bn ghost      # ghost batches of 8
    python examples/train_digits.py --bn none       # no normalization, for comparison
    python examples/train_digits.py --api nnx       # the same CNN in Flax NNX
    python examples/train_digits.py --api equinox   # ... in Equinox (per example, under vmap)
    python examples/train_digits.py --api haiku     # ... in Haiku (hk.transform_with_state)

The model (``examples/_common.py``) is ``(conv -> kbn_jax.BatchNormalization -> relu) x 2 ->
dense``. The jitted train step calls it with ``training=True`` and
``mutable=["batch_stats"]``, which returns the updated moving statistics; the test accuracy is
measured in inference, with the moving statistics. With ``--api nnx`` the model is written in
Flax NNX (``examples/_nnx_model.py``) with `kbn_jax.nnx.BatchNormalization`, trained with
``nnx.Optimizer`` and ``nnx.jit``, the mode set by ``model.train()`` / ``model.eval()``. With
``--api equinox`` (``examples/_equinox_model.py``) the model takes one channels-first image and
is vmapped with an ``axis_name``, the statistics in an ``eqx.nn.State``, inference by
``eqx.nn.inference_mode`` (ghost batches need the batch: not offered there); with ``--api haiku``
(``examples/_haiku_model.py``) it is a function of ``is_training`` in
``hk.transform_with_state``. The data is scikit-learn's bundled digits, so nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

from _common import BN_CHOICES, CNN, Trainer, fit, load_digits, renorm_warmup

import kbn_jax.cpu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--bn", choices=BN_CHOICES, default="keras_v1", help="normalization")
  parser.add_argument(
    "--api", choices=("linen", "nnx", "equinox", "haiku"), default="linen", help="JAX library"
  )
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="two steps only (smoke test)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
  args = parse_args(argv)
  start = time.perf_counter()
  data = load_digits()
  epochs = 1 if args.quick else args.epochs
  print(
    f"bn={args.bn} ({args.api}): {len(data.x_train)} training and {len(data.x_test)} test images, "
    f"batch {args.batch_size}, {epochs} epochs"
  )
  # Batch renorm's warm-up of the clipping bounds, as traced values (no recompilation).
  schedule = functools.partial(renorm_warmup, hold_steps=20)
  if args.api == "nnx":
    from _nnx_model import NnxTrainer  # noqa: PLC0415 (loads flax.nnx only when asked)

    trainer = NnxTrainer(args.bn, args.learning_rate, schedule)
  elif args.api == "equinox":
    from _equinox_model import EquinoxTrainer  # noqa: PLC0415 (optional extra)

    trainer = EquinoxTrainer(args.bn, args.learning_rate, schedule)
  elif args.api == "haiku":
    from _haiku_model import HaikuTrainer  # noqa: PLC0415 (optional extra)

    trainer = HaikuTrainer(args.bn, args.learning_rate, schedule)
  else:
    trainer = Trainer(CNN(bn=args.bn), learning_rate=args.learning_rate, clipping_schedule=schedule)
  _, test_accuracy = fit(
    trainer,
    data,
    epochs=epochs,
    batch_size=args.batch_size,
    seed=args.seed,
    max_steps_per_epoch=2 if args.quick else None,
  )
  seconds = time.perf_counter() - start
  how = "" if args.bn == "none" else ", inference with the moving statistics"
  print(f"test accuracy (bn={args.bn}{how}): {test_accuracy:.2%} in {seconds:.1f} s")
  return test_accuracy


if __name__ == "__main__":
  if platform.system() == "Linux":
    # The first step of CPU training (docs/performance.md): XLA's buffers stay in glibc's heap.
    kbn_jax.cpu.tune_malloc()
  main()
