"""Batch renormalization vs batch norm with tiny or non-i.i.d. minibatches (Ioffe, 2017).

    python examples/small_batch_renorm.py               # MLP; writes docs/small_batch_renorm.png
    python examples/small_batch_renorm.py --model cnn   # the CNN of train_digits.py (slower)

Batch norm normalizes with the statistics of the minibatch in training but with the moving
statistics in inference. With very small minibatches, or minibatches that are not i.i.d. samples
of the data, the two differ, the network learns to depend on the minibatch, and its inference
accuracy suffers. Batch renormalization corrects the training output by
``r = sigma_B / sigma, d = (mu_B - mu) / sigma`` (clipped, without gradient) so that training sees
what inference will see.

This script trains a network on the 8x8 digits with Keras V1 batch norm and with batch
renormalization, with three kinds of minibatches: i.i.d. minibatches of 32 (the reference),
i.i.d. minibatches of 4, and minibatches of 16 that hold 8 images of each of only 2 classes.
Every variant is trained with several seeds, seed ``i`` starting from the same initial weights
everywhere; its test accuracy in inference is recorded along the way, a plot is saved and a table
of the final accuracies is printed. Renorm uses the paper's warm-up of the clipping bounds
(``rmax`` from 1 to 3, ``dmax`` from 0 to 5), passed to the layer as traced values computed from
the step count inside the jitted train step, so the step compiles once per minibatch shape.

The default network is an MLP, with batch norm after dense layers, whose statistics come from
the minibatch alone; after a convolution they also average over the 64 (or 16) positions of
every image, which makes them much less sensitive to the minibatch (``--model cnn``).

Reference: Ioffe, 2017. Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models. https://arxiv.org/abs/1702.03275
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from _common import CNN, MLP, Digits, Trainer, load_digits, renorm_warmup

DEFAULT_PLOT = Path(__file__).resolve().parents[1] / "docs" / "small_batch_renorm.png"
MODELS = {"mlp": MLP, "cnn": CNN}
VARIANTS = {"batch norm (Keras V1)": "keras_v1", "batch renorm": "renorm"}


class Regime(NamedTuple):
  """How minibatches are drawn: i.i.d. (``classes_per_batch=None``: uniform, without
  replacement within a batch) or from a few random classes with equal shares."""

  batch_size: int
  classes_per_batch: int | None = None

  @property
  def label(self) -> str:
    if self.classes_per_batch is None:
      return f"i.i.d. minibatches of {self.batch_size}"
    return f"minibatches of {self.batch_size} from {self.classes_per_batch} classes"


REGIMES = (Regime(32), Regime(4), Regime(16, classes_per_batch=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--eval-every", type=int, default=100)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument("--hold-steps", type=int, default=None, help="default: steps / 30")
  parser.add_argument("--out", type=Path, default=None, help=f"plot path (default {DEFAULT_PLOT})")
  parser.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.eval_every, args.seeds = 4, 2, 2
    args.out = args.out or Path(tempfile.gettempdir()) / "small_batch_renorm_quick.png"
  args.out = args.out or DEFAULT_PLOT
  args.hold_steps = args.hold_steps or max(1, args.steps // 30)
  return args


def regimes(args: argparse.Namespace) -> tuple[Regime, ...]:
  """The regimes to run; ``--quick`` gives them one batch size so that they share a program."""
  if args.quick:
    return tuple(regime._replace(batch_size=4) for regime in REGIMES)
  return REGIMES


def sample_batches(
  labels: np.ndarray, regime: Regime, steps: int, rng: np.random.Generator
) -> np.ndarray:
  """Training indices ``(steps, batch_size)`` drawn as `regime` says."""
  if regime.classes_per_batch is None:
    return np.stack(
      [rng.choice(len(labels), regime.batch_size, replace=False) for _ in range(steps)]
    )
  by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
  per_class = regime.batch_size // regime.classes_per_batch
  batches = []
  for _ in range(steps):
    classes = rng.choice(len(by_class), regime.classes_per_batch, replace=False)
    batch = np.concatenate([rng.choice(by_class[c], per_class, replace=False) for c in classes])
    batches.append(rng.permutation(batch))
  return np.stack(batches)


def sample_indices(data: Digits, args: argparse.Namespace) -> dict[Regime, np.ndarray]:
  """Training indices ``(seeds, steps, batch)`` for every regime."""
  rng = np.random.default_rng(0)
  return {
    regime: np.stack(
      [sample_batches(data.y_train, regime, args.steps, rng) for _ in range(args.seeds)]
    )
    for regime in regimes(args)
  }


def train_curve(trainer: Trainer, data: Digits, seed: int, indices: np.ndarray, eval_every: int):
  """Trains one model on ``indices`` ``(steps, batch)``; returns the test accuracy (inference,
  moving statistics) after every `eval_every` steps."""
  state = trainer.init(seed, data.x_train[:1])
  curve = []
  for step, batch in enumerate(indices, start=1):
    state, _ = trainer.step(state, data.x_train[batch], data.y_train[batch])
    if step % eval_every == 0:
      curve.append(trainer.evaluate(state, data.x_test, data.y_test))
  return np.asarray(curve)


def train_all(data: Digits, args: argparse.Namespace) -> dict[str, dict[str, np.ndarray]]:
  """Test accuracies ``(seeds, evaluations)`` by regime label and variant name.

  Seed ``i`` starts from the same initial weights in every regime and variant.
  """
  indices = sample_indices(data, args)
  results = {regime.label: {} for regime in indices}
  schedule = functools.partial(renorm_warmup, hold_steps=args.hold_steps)
  start = time.perf_counter()
  for name, bn in VARIANTS.items():
    model = MODELS[args.model](bn=bn)
    trainer = Trainer(model, learning_rate=args.learning_rate, clipping_schedule=schedule)
    for regime, regime_indices in indices.items():
      curves = [
        train_curve(trainer, data, seed, seed_indices, args.eval_every)
        for seed, seed_indices in enumerate(regime_indices)
      ]
      results[regime.label][name] = np.stack(curves)
      print(f"trained {name}, {regime.label} ({time.perf_counter() - start:.0f} s)")
  return results


def print_table(all_results: dict[str, dict[str, np.ndarray]], seeds: int) -> None:
  print(f"\nfinal test accuracy, {seeds} seeds (inference, with the moving statistics)")
  print(f"{'minibatches':<34} {'variant':<22} {'mean':>7} {'std':>6} {'min':>7} {'max':>7}")
  for regime, results in all_results.items():
    for name, accuracies in results.items():
      final = 100 * accuracies[:, -1]
      print(
        f"{regime:<34} {name:<22} {final.mean():6.2f}% {final.std():5.2f} "
        f"{final.min():6.2f}% {final.max():6.2f}%"
      )


def plot(all_results: dict[str, dict[str, np.ndarray]], args: argparse.Namespace) -> None:
  import matplotlib  # noqa: PLC0415 (optional extra)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  count = len(all_results)
  fig, axes = plt.subplots(1, count, figsize=(4.6 * count, 4), sharey=True, squeeze=False)
  steps = args.eval_every * np.arange(1, args.steps // args.eval_every + 1)
  for ax, (regime, results) in zip(axes[0], all_results.items(), strict=True):
    for name, accuracies in results.items():
      (line,) = ax.plot(steps, 100 * accuracies.mean(0), label=name)
      ax.fill_between(
        steps, 100 * accuracies.min(0), 100 * accuracies.max(0), color=line.get_color(), alpha=0.2
      )
    ax.set_title(regime)
    ax.set_xlabel("training step")
    ax.set_ylim(80, 100)
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel(f"test accuracy, % (mean; band: min-max of {args.seeds} seeds)")
  axes[0, 0].legend(loc="lower right")
  fig.suptitle(f"8x8 digits, {args.model.upper()}: inference accuracy of BN vs batch renorm")
  fig.tight_layout()
  args.out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.out, dpi=100)
  plt.close(fig)
  print(f"plot saved to {args.out}")


def main(argv: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
  args = parse_args(argv)
  start = time.perf_counter()
  data = load_digits()
  print(
    f"{args.model}: {args.steps} steps, {args.seeds} seeds, Adam {args.learning_rate}; renorm "
    f"clipping warm-up: rmax 1->3 over steps {args.hold_steps}-{8 * args.hold_steps}, "
    f"dmax 0->5 over steps {args.hold_steps}-{5 * args.hold_steps}"
  )
  all_results = train_all(data, args)
  print_table(all_results, args.seeds)
  plot(all_results, args)
  print(f"total {time.perf_counter() - start:.1f} s")
  return all_results


if __name__ == "__main__":
  main()
