"""Model-level benchmark: a small conv net's training step with kbn_jax, Flax, and no BN.

An 8-layer conv net, each layer ``conv 3x3 (32 channels, SAME) -> batch norm -> relu``, then a
global average pool and a dense layer to 10 classes, on a batch of 64 images of 32x32x3
(activations 64x32x32x32). One training step = softmax cross-entropy loss, gradients of every
parameter, an ``optax.sgd`` update (momentum 0.9) and the new batch statistics, under
`jax.jit`. The convolution has a bias only without normalization.

Per normalization (kbn_jax's linen Module, ``flax.linen.BatchNorm``, none) it reports the step
time (interleaved, medians, ratios) and the compiled step's temporary memory
(``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``): the design's bar
is that kbn_jax needs no more than the network without normalization.

Usage::

  python benchmarks/bench_model.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _timing import Contender, format_seconds, time_interleaved  # noqa: E402

import kbn_jax  # noqa: E402

NORMS = ("kbn_jax", "flax", "no BN")
BATCH, SIZE, IN_CHANNELS, CHANNELS, LAYERS, CLASSES = 64, 32, 3, 32, 8, 10
MOMENTUM, EPSILON = 0.99, 1e-3
MIB = 2**20


class ConvNet(nn.Module):
  """``LAYERS`` x (conv 3x3 -> norm -> relu), global average pool, dense."""

  norm: str

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(LAYERS):
      x = nn.Conv(CHANNELS, (3, 3), padding="SAME", use_bias=self.norm == "no BN")(x)
      if self.norm == "kbn_jax":
        x = kbn_jax.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON)(x, training=train)
      elif self.norm == "flax":
        x = nn.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, use_running_average=not train)(x)
      x = nn.relu(x)
    return nn.Dense(CLASSES)(jnp.mean(x, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class ModelResult:
  """One normalization's compiled step and its memory."""

  name: str
  contender: Contender
  temp_bytes: int
  argument_bytes: int
  output_bytes: int


def build(norm: str) -> ModelResult:
  """The jitted training step of the net with `norm`, its arguments and its memory analysis."""
  model = ConvNet(norm)
  images = jax.random.normal(jax.random.key(0), (BATCH, SIZE, SIZE, IN_CHANNELS), jnp.float32)
  labels = jax.random.randint(jax.random.key(1), (BATCH,), 0, CLASSES)
  variables = model.init(jax.random.key(2), images, train=False)
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  tx = optax.sgd(0.01, momentum=0.9)
  opt_state = tx.init(params)

  def step(params, opt_state, stats, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
        {"params": params, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates.get("batch_stats", {})

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_stats, loss

  args = (params, opt_state, stats, images, labels)
  compiled = jax.jit(step).lower(*args).compile()
  memory = compiled.memory_analysis()
  contender = Contender(norm, lambda: compiled(*args))
  return ModelResult(
    norm,
    contender,
    memory.temp_size_in_bytes,
    memory.argument_size_in_bytes,
    memory.output_size_in_bytes,
  )


def run(repeats: int = 7, target_s: float = 0.2) -> tuple[dict, dict[str, ModelResult]]:
  """Times the three steps interleaved; returns ``(timings, results)`` keyed by `NORMS`."""
  results = {norm: build(norm) for norm in NORMS}
  timings = time_interleaved(
    [r.contender for r in results.values()], repeats=repeats, target_s=target_s
  )
  return timings, results


def markdown(timings, results) -> list[str]:
  """A Markdown section for `benchmarks/results.md`."""
  base = timings["kbn_jax"].median
  no_bn = results["no BN"].temp_bytes
  lines = [
    "## Model: 8-layer conv net training step",
    "",
    f"{LAYERS} x (conv 3x3, {CHANNELS} channels -> norm -> relu), average pool, dense to "
    f"{CLASSES}; batch {BATCH} of {SIZE}x{SIZE}x{IN_CHANNELS} (activations "
    f"{BATCH}x{SIZE}x{SIZE}x{CHANNELS}); loss, gradients, `optax.sgd` (momentum 0.9) update and "
    "batch statistics under `jax.jit`. Time: interleaved medians, ratio to `kbn_jax`. Temporary "
    "memory: `jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes`.",
    "",
    "| normalization | step time | ratio | temp memory | temp bytes | vs no BN |",
    "|---|---|---|---|---|---|",
  ]
  for norm in NORMS:
    t, r = timings[norm].median, results[norm]
    lines.append(
      f"| `{norm}` | {format_seconds(t)} | {t / base:.2f}x | {r.temp_bytes / MIB:.1f} MiB | "
      f"{r.temp_bytes:,} | {r.temp_bytes - no_bn:+,} B |"
    )
  return [*lines, ""]


def summary(timings, results) -> str:
  base = timings["kbn_jax"].median
  return "\n".join(
    f"model {norm:8s} step {format_seconds(timings[norm].median):>9s} "
    f"({timings[norm].median / base:.2f}x kbn_jax)  temp {results[norm].temp_bytes / MIB:.1f} MiB"
    f" ({results[norm].temp_bytes:,} B)"
    for norm in NORMS
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--target-s", type=float, default=0.2)
  args = parser.parse_args(argv)
  timings, results = run(args.repeats, args.target_s)
  print(summary(timings, results))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
