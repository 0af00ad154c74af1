"""Plain wall-clock timing for JAX (and TensorFlow) callables: warm-up, interleaving, medians.

Every contender is a zero-argument callable that runs one step and returns its outputs; a
`block` function waits for them (``jax.block_until_ready`` by default). Contenders of one
workload are timed *interleaved*: each repetition runs every contender once, in a rotating
order, so a slow phase of a shared machine hits all of them alike and the ratios of the medians
stay meaningful even when absolute times drift.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Contender:
  """One timed implementation of a workload.

  Attributes:
    name: row label.
    run: zero-argument callable running one step.
    block: waits until `run`'s outputs are computed.
  """

  name: str
  run: Callable[[], Any]
  block: Callable[[Any], Any] = jax.block_until_ready


@dataclasses.dataclass(frozen=True)
class Timing:
  """Median seconds per call and the spread of the samples."""

  median: float
  low: float
  high: float
  samples: int
  values: tuple[float, ...] = ()  # the samples in round order (interleaved timings)


def _time_calls(contender: Contender, number: int) -> float:
  """Seconds per call of `number` back-to-back calls (only the last one is waited on, which is
  enough because JAX dispatches in order on one device)."""
  start = time.perf_counter()
  out = None
  for _ in range(number):
    out = contender.run()
  contender.block(out)
  return (time.perf_counter() - start) / number


def calibrate(contender: Contender, target_s: float) -> int:
  """Calls per sample so that one sample takes about `target_s` seconds (at least 1)."""
  per_call = _time_calls(contender, 1)
  per_call = min(per_call, _time_calls(contender, 1))
  return max(1, min(1000, round(target_s / max(per_call, 1e-7))))


def time_interleaved(
  contenders: Sequence[Contender],
  *,
  repeats: int = 7,
  warmup: int = 2,
  target_s: float = 0.02,
) -> dict[str, Timing]:
  """Times `contenders` against each other.

  Each contender is first run `warmup` times (compilation happens there), then `repeats`
  rounds run every contender for one sample of about `target_s` seconds, rotating the order
  each round.

  Args:
    contenders: the implementations to compare; names must be unique.
    repeats: samples per contender.
    warmup: untimed calls per contender before timing.
    target_s: approximate length of one sample.

  Returns:
    Timing per contender name.
  """
  names = [c.name for c in contenders]
  if len(set(names)) != len(names):
    raise ValueError(f"contender names must be unique, got {names}")
  for contender in contenders:
    for _ in range(warmup):
      contender.block(contender.run())
  numbers = {c.name: calibrate(c, target_s) for c in contenders}
  samples: dict[str, list[float]] = {name: [] for name in names}
  for round_index in range(repeats):
    shift = round_index % len(contenders)
    for contender in contenders[shift:] + contenders[:shift]:
      samples[contender.name].append(_time_calls(contender, numbers[contender.name]))
  return {
    name: Timing(statistics.median(s), min(s), max(s), len(s), tuple(s))
    for name, s in samples.items()
  }


def time_compile(build: Callable[[], Callable[[], Any]], *, repeats: int = 3) -> Timing:
  """Median seconds to trace, lower and compile a fresh jitted function.

  Args:
    build: returns a zero-argument callable that traces, lowers and compiles a *new* function
      object each time (so no in-memory cache is hit) and returns the compiled executable.
    repeats: number of fresh compilations.

  Returns:
    The timing of one compilation.
  """
  samples = []
  for _ in range(repeats):
    compile_once = build()
    start = time.perf_counter()
    compile_once()
    samples.append(time.perf_counter() - start)
  return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


def format_seconds(seconds: float) -> str:
  """Human-readable duration with three significant digits."""
  for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
    if seconds >= scale:
      return f"{seconds / scale:.3g} {unit}"
  return f"{seconds / 1e-9:.3g} ns"
