"""Benchmark kbn_jax against Flax, Keras 3 (JAX), tf_keras V1 and the ``x * a + b`` floor.

Usage::

  KERAS_BACKEND=jax python benchmarks/run.py            # everything (a few minutes on 2 cores)
  python benchmarks/run.py --quick                      # 3 configurations, fewer repeats
  python benchmarks/run.py --shapes nhwc_64x32x32x64,dense_256x1024
  python benchmarks/run.py --output /tmp/results.md     # default: benchmarks/results.md

All contenders of one configuration and workload are timed interleaved in this one process (see
`_timing.py`); the tables report medians and ratios of medians. Keras 3 is included when
``KERAS_BACKEND=jax`` is set before the run and ``keras`` 3 is installed; tf_keras when it is
importable.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

# Keras reads its backend at import time; the harness wants JAX unless told otherwise.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_contenders as bc  # noqa: E402
import jax  # noqa: E402
from _timing import format_seconds, time_compile, time_interleaved  # noqa: E402

HERE = Path(__file__).resolve().parent
QUICK = ("nhwc_64x32x32x64", "dense_256x1024", "renorm_64x32x32x64")
TITLES = {
  "infer": "Inference",
  "train_fwd": "Training forward (with the statistics update)",
  "train_step": "Training step: forward + backward (grads of input, gamma, beta) + update",
  "compile": "Compile time of the training step",
}
OURS = bc.OURS


def main(argv=None) -> int:
  args = _parse(argv)
  configs = _select(args)
  repeats = 3 if args.quick else args.repeats
  results = {}  # (config, workload) -> {name: Timing}; (config, "traffic") -> {name: (r, w)}
  print(_header())
  for config in configs:
    for workload in bc.WORKLOADS:
      contenders, compiles = bc.contenders(config, workload)
      timings = time_interleaved(contenders, repeats=repeats, target_s=args.target_s)
      results[config.name, workload] = timings
      _print_row(config.name, workload, timings)
      if workload == "train_step" and not args.no_compile:
        results[config.name, "compile"] = _compile_times(compiles, 1 if args.quick else 3)
        _print_row(config.name, "compile", results[config.name, "compile"])
        results[config.name, "traffic"] = _traffic(compiles, math.prod(config.shape))
        print(f"{config.name:22s} traffic    {_traffic_cells(results[config.name, 'traffic'])}")
  report = _report(results, configs, args)
  Path(args.output).write_text(report)
  print(f"\nwrote {args.output}")
  return 0


def _compile_times(compiles, repeats):
  """Compile time of each contender's training step (the floor's is not a contender's)."""
  return {
    name: time_compile(build, repeats=repeats)
    for name, build in compiles.items()
    if name != bc.FLOOR
  }


def _traffic(compiles, size):
  """(reads, writes) of activation-sized arrays in each compiled training step."""
  return {
    name: bc.activation_traffic(build()().as_text(), size) for name, build in compiles.items()
  }


def _traffic_cells(traffic):
  return "  ".join(f"{name}={reads}r+{writes}w" for name, (reads, writes) in traffic.items())


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="3 configurations, 3 repeats")
  parser.add_argument("--shapes", help="comma-separated configuration names (see --list)")
  parser.add_argument("--list", action="store_true", help="list configuration names and exit")
  parser.add_argument("--repeats", type=int, default=7, help="samples per contender")
  parser.add_argument("--target-s", type=float, default=0.03, help="length of one sample")
  parser.add_argument(
    "--no-compile", action="store_true", help="skip compile times and HLO traffic counts"
  )
  parser.add_argument("--output", default=str(HERE / "results.md"))
  args = parser.parse_args(argv)
  if args.list:
    for config in bc.CONFIGS:
      print(config.name)
    raise SystemExit(0)
  return args


def _select(args):
  names = {c.name: c for c in bc.CONFIGS}
  wanted = args.shapes.split(",") if args.shapes else (QUICK if args.quick else list(names))
  unknown = [n for n in wanted if n not in names]
  if unknown:
    raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(names)}")
  return [names[n] for n in wanted]


def _print_row(config, workload, timings):
  base = timings.get(OURS)
  cells = []
  for name, timing in timings.items():
    ratio = f" ({timing.median / base.median:.2f}x)" if base else ""
    cells.append(f"{name}={format_seconds(timing.median)}{ratio}")
  print(f"{config:22s} {workload:10s} " + "  ".join(cells), flush=True)


# --------------------------------------------------------------------------------------------
# Markdown report


def _header() -> str:
  return (
    f"CPU: {_cpu_model()} ({os.cpu_count()} cores); devices: {jax.devices()}\n"
    f"versions: {_versions()}"
  )


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _versions() -> str:
  names = ("jax", "jaxlib", "flax", "keras", "tensorflow", "tf_keras", "numpy")
  found = []
  for name in names:
    try:
      found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      continue
  return ", ".join(found) + f", python {platform.python_version()}"


def _report(results, configs, args) -> str:
  lines = [
    "# kbn_jax benchmark results",
    "",
    f"Generated by `python benchmarks/run.py{' --quick' if args.quick else ''}` on "
    f"{datetime.date.today().isoformat()}.",
    "",
    f"- CPU: {_cpu_model()} ({os.cpu_count()} cores visible)",
    f"- JAX devices: {', '.join(str(d) for d in jax.devices())}",
    f"- Versions: {_versions()}",
    f"- Timing: warm-up (compilation) first, then {3 if args.quick else args.repeats} "
    "interleaved samples per contender of about "
    f"{args.target_s * 1e3:.0f} ms each; medians. Ratios are medians divided by the median of "
    f"`{OURS}` (the layer as committed) in the same interleaved group (below 1: faster than "
    f"`{OURS}`). `{bc.PLAIN}` is the same layer without renorm or ghost batches.",
    "- float32 inputs; momentum 0.99, epsilon 1e-3 everywhere; renorm clipping "
    f"{bc.RENORM_CLIPPING}; ghost batches of 16.",
    "",
  ]
  for workload in (*bc.WORKLOADS, "compile"):
    lines += _timing_table(
      TITLES[workload], [(c, results.get((c.name, workload))) for c in configs]
    )
  lines += _traffic_table([(c, results.get((c.name, "traffic"))) for c in configs])
  lines += _targets(results, configs)
  return "\n".join(lines) + "\n"


def _columns(rows):
  names = []
  for _, cells in rows:
    names += [n for n in cells if n not in names]
  return names


def _table(title, rows, cell, note=()):
  """A Markdown section: one row per configuration, one column per contender."""
  rows = [(c, r) for c, r in rows if r]
  if not rows:
    return []
  names = _columns(rows)
  lines = [f"## {title}", "", *note]
  lines.append("| configuration | " + " | ".join(f"`{n}`" for n in names) + " |")
  lines.append("|---" * (len(names) + 1) + "|")
  for config, cells in rows:
    row = [cell(cells, name) if name in cells else "n/a" for name in names]
    lines.append(f"| {config.name} | " + " | ".join(row) + " |")
  return [*lines, ""]


def _timing_table(title, rows):
  def cell(timings, name):
    text = format_seconds(timings[name].median)
    base = timings.get(OURS)
    return f"{text} ({timings[name].median / base.median:.2f}x)" if base else text

  return _table(title, rows, cell)


def _traffic_table(rows):
  note = (
    "Reads / writes of activation-sized arrays by the kernels of the compiled training step "
    "(the top-level instructions of this backend's optimized HLO; bitcasts are free), counted "
    "by `bench_contenders.activation_traffic`. The floor reads once and writes once.",
    "",
  )
  return _table(
    "Activation traffic of the training step (HLO)",
    rows,
    lambda traffic, name: f"{traffic[name][0]} / {traffic[name][1]}",
    note,
  )


def _median_ratio(results, config, workload, numerator, denominators):
  """Median of `numerator` over the fastest median of `denominators`; None if any is missing."""
  timings = results.get((config.name, workload), {})
  present = [timings[d].median for d in denominators if d in timings]
  if numerator not in timings or not present:
    return None
  return timings[numerator].median / min(present)


def _checks(results, config):
  """Yields ``(target, ratio, holds)`` for one configuration, from the medians."""

  def ratio(workload, numerator, *denominators):
    return _median_ratio(results, config, workload, numerator, denominators)

  if config.variant:
    for workload in bc.WORKLOADS:
      r = ratio(workload, OURS, bc.PLAIN)
      yield f"{workload}: `{OURS}` / `{bc.PLAIN}` <= 1.2", r, r is not None and r <= 1.2
  else:
    for rival, goal in (("flax", 2.0), ("flax (two-pass)", 2.0)):
      r = ratio("train_step", rival, OURS)
      yield f"train step: `{rival}` / `{OURS}` >= {goal}", r, r is not None and r >= goal
    step = results.get((config.name, "train_step"), {})
    tf_keras = "tf_keras V1 (fused)" if "tf_keras V1 (fused)" in step else "tf_keras V1"
    for rival in ("keras3 (jax)", tf_keras):
      r = ratio("train_step", rival, OURS)
      yield f"train step: `{rival}` / `{OURS}` > 1", r, r is not None and r > 1.0
    r = ratio("train_fwd", OURS, "flax", "flax (two-pass)")
    yield f"train fwd: `{OURS}` / fastest flax <= 1.0", r, r is not None and r <= 1.0
    r = ratio("compile", OURS, "flax")
    if r is not None:
      yield f"compile: `{OURS}` / `flax` <= 1.0", r, r <= 1.0
  r = ratio("infer", OURS, bc.FLOOR)
  yield f"infer: `{OURS}` / `{bc.FLOOR}` <= 1.05", r, r is not None and r <= 1.05


def _targets(results, configs):
  """The issue's targets, each as a ratio of medians and a verdict ("not measured" fails)."""
  checks = [(config.name, *check) for config in configs for check in _checks(results, config)]
  held = sum(ok for *_, ok in checks)
  lines = [
    "## Targets",
    "",
    f"{held} of {len(checks)} hold.",
    "",
    "| configuration | target | measured | holds |",
    "|---|---|---|---|",
  ]
  for name, target, value, ok in checks:
    measured = "not measured" if value is None else f"{value:.2f}"
    lines.append(f"| {name} | {target} | {measured} | {'yes' if ok else '**no**'} |")
  return [*lines, ""]


if __name__ == "__main__":
  raise SystemExit(main())
