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


def main(argv=None) -> int:
  args = _parse(argv)
  configs = _select(args)
  proposed = not bc.layers_use_fast_path()
  ours = "kbn_jax+fast" if proposed else "kbn_jax"
  repeats = 3 if args.quick else args.repeats
  results = {}  # (config, workload) -> {name: Timing}
  print(_header())
  for config in configs:
    for workload in bc.WORKLOADS:
      contenders, compiles = bc.contenders(
        config, workload, with_proposed=proposed, plain_refs=True
      )
      timings = time_interleaved(contenders, repeats=repeats, target_s=args.target_s)
      results[config.name, workload] = timings
      _print_row(config.name, workload, timings, ours)
      if workload == "train_step" and not args.no_compile:
        compile_times = {
          name: time_compile(build, repeats=1 if args.quick else 3)
          for name, build in compiles.items()
        }
        results[config.name, "compile"] = compile_times
        _print_row(config.name, "compile", compile_times, ours)
  report = _report(results, configs, ours, args)
  Path(args.output).write_text(report)
  print(f"\nwrote {args.output}")
  return 0


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="3 configurations, 3 repeats")
  parser.add_argument("--shapes", help="comma-separated configuration names (see --list)")
  parser.add_argument("--list", action="store_true", help="list configuration names and exit")
  parser.add_argument("--repeats", type=int, default=7, help="samples per contender")
  parser.add_argument("--target-s", type=float, default=0.03, help="length of one sample")
  parser.add_argument("--no-compile", action="store_true", help="skip compile-time timing")
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


def _print_row(config, workload, timings, ours):
  base = timings.get(ours)
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


def _report(results, configs, ours, args) -> str:
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
    f"`{ours}` in the same interleaved group (below 1: faster than `{ours}`).",
    "- float32 inputs; momentum 0.99, epsilon 1e-3 everywhere; renorm clipping "
    f"{bc.RENORM_CLIPPING}; ghost batches of 16.",
    "",
  ]
  if ours == "kbn_jax+fast":
    lines += [
      "`kbn_jax+fast` is kbn_jax.BatchNormalization with the proposed `_train` that calls "
      "`kbn_jax._fast_train.normalize_batch` (closed-form backward); `kbn_jax` is the layer as "
      "committed.",
      "",
    ]
  for workload in (*bc.WORKLOADS, "compile"):
    rows = [(c, results.get((c.name, workload))) for c in configs]
    rows = [(c, r) for c, r in rows if r]
    if not rows:
      continue
    names = []
    for _, timings in rows:
      names += [n for n in timings if n not in names]
    lines += [f"## {TITLES[workload]}", ""]
    lines.append("| configuration | " + " | ".join(f"`{n}`" for n in names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for config, timings in rows:
      base = timings.get(ours)
      cells = []
      for name in names:
        timing = timings.get(name)
        if timing is None:
          cells.append("n/a")
        elif base is None:
          cells.append(format_seconds(timing.median))
        else:
          cells.append(f"{format_seconds(timing.median)} ({timing.median / base.median:.2f}x)")
      lines.append(f"| {config.name} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += _targets(results, configs, ours)
  return "\n".join(lines) + "\n"


def _targets(results, configs, ours):
  """The issue's targets, each as measured ratio and verdict."""
  checks = []

  def ratio(config, workload, numerator, denominator):
    timings = results.get((config.name, workload), {})
    if numerator in timings and denominator in timings:
      return timings[numerator].median / timings[denominator].median
    return None

  for config in configs:
    if not config.variant:
      for rival, goal in (
        ("flax", 2.0),
        ("flax (two-pass)", 2.0),
        ("keras3 (jax)", 1.0),
        ("tf_keras V1 (fused)", 1.0),
        ("tf_keras V1", 1.0),
      ):
        r = ratio(config, "train_step", rival, ours)
        if r is not None:
          checks.append((config.name, f"step: `{rival}` / `{ours}` >= {goal}", r, r >= goal))
      r = ratio(config, "train_fwd", ours, "flax")
      if r is not None:
        checks.append((config.name, f"train fwd: `{ours}` / `flax` <= 1.0", r, r <= 1.0))
      r = ratio(config, "compile", ours, "flax")
      if r is not None:
        checks.append((config.name, f"compile: `{ours}` / `flax` <= 1.0", r, r <= 1.0))
    else:
      plain = f"{ours} (plain BN)"
      for workload in bc.WORKLOADS:
        r = ratio(config, workload, ours, plain)
        if r is not None:
          checks.append((config.name, f"{workload}: variant / plain <= 1.2", r, r <= 1.2))
    r = ratio(config, "infer", ours, "x*a+b (floor)")
    if r is not None:
      checks.append((config.name, f"infer: `{ours}` / floor <= 1.05", r, r <= 1.05))
  lines = ["## Targets", "", "| configuration | target | measured | holds |", "|---|---|---|---|"]
  for name, target, value, ok in checks:
    lines.append(f"| {name} | {target} | {value:.2f} | {'yes' if ok else '**no**'} |")
  return [*lines, ""]


if __name__ == "__main__":
  raise SystemExit(main())
