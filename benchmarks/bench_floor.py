"""Inference against its floor, ``x * a + b``, with enough rounds to be stable on a shared machine.

Inference folds the moving statistics, gamma and beta into one scale and shift, so its floor is
the bare multiply-add with those two vectors given. For every benchmark shape this times, in one
interleaved group (`_timing.time_interleaved`: each round runs every contender once, in a
rotating order), the linen Module, the pure function, the NNX layer on its split state under
`jax.jit` and the floor, and reports each median over the floor's median, with the spread of
the per-round ratios (a round's contender time over the same round's floor time), so a slow
phase of the machine hits both sides of each ratio alike.

Usage::

  python benchmarks/bench_floor.py                       # every configuration, 41 rounds
  python benchmarks/bench_floor.py --shapes dense_256x1024,dense_1024x1024 --rounds 61
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_contenders as bc  # noqa: E402
from _timing import time_interleaved  # noqa: E402

import kbn_jax.cpu  # noqa: E402

CONTENDERS = (bc.OURS, bc.FUNCTIONAL, bc.NNX)


def measure(config: bc.Config, rounds: int, target_s: float) -> dict[str, tuple[float, ...]]:
  """``{contender: (median ratio, 25th, 75th percentile of per-round ratios)}`` to the floor."""
  builders = (
    bc.kbn_jax_contender,
    bc.functional_contender,
    bc.kbn_nnx_contender,
    bc.floor_contender,
  )
  contenders = [build(config, "infer")[0] for build in builders]
  timings = time_interleaved([c for c in contenders if c], repeats=rounds, target_s=target_s)
  floor = timings[bc.FLOOR]
  result = {}
  for name in CONTENDERS:
    if name not in timings:
      continue
    ratios = sorted(a / b for a, b in zip(timings[name].values, floor.values, strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    result[name] = (timings[name].median / floor.median, quartiles[0], quartiles[2])
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", help="comma-separated configuration names")
  parser.add_argument("--rounds", type=int, default=41)
  parser.add_argument("--target-s", type=float, default=0.03)
  args = parser.parse_args(argv)
  kbn_jax.cpu.tune_malloc()
  configs = [c for c in bc.CONFIGS if not c.variant]
  if args.shapes:
    configs = [c for c in bc.CONFIGS if c.name in args.shapes.split(",")]
  print(f"inference / x*a+b, {args.rounds} interleaved rounds: median (per-round quartiles)")
  print("| configuration | " + " | ".join(f"`{n}`" for n in CONTENDERS) + " |")
  print("|---" * (len(CONTENDERS) + 1) + "|")
  for config in configs:
    result = measure(config, args.rounds, args.target_s)
    cells = [
      f"{result[n][0]:.3f} ({result[n][1]:.2f}-{result[n][2]:.2f})" if n in result else "n/a"
      for n in CONTENDERS
    ]
    print(f"| {config.name} | " + " | ".join(cells) + " |", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
