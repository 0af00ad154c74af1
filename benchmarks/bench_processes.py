"""kbn_jax against tf_keras's fused V1 kernel, each in a fresh process, in both malloc settings.

The process's allocator matters on CPU (see `kbn_jax.cpu`): with glibc's defaults every
multi-megabyte XLA buffer is a fresh ``mmap`` that page-faults on first touch, while TensorFlow
pools its memory. So each contender runs in its own fresh process (`_process_worker.py`) under
each allocator setting:

* ``default``: glibc's defaults;
* ``tuned``: ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296
  MALLOC_ARENA_MAX=1`` (what `kbn_jax.cpu.tune_malloc_env` returns);
* ``mallopt`` (JAX contenders only, on request): `kbn_jax.cpu.tune_malloc()` called first
  thing in the process instead of the environment variables;
* ``preload`` (on request, ``--preload /path/to/libjemalloc.so``): another allocator loaded
  with ``LD_PRELOAD`` (jemalloc, tcmalloc, mimalloc), glibc's thresholds untouched.

Besides kbn_jax's training step and TF's, the JAX process also times ``jax.jit(lambda x: x * 2 +
1)`` on the same inputs (``x*2+1``): the allocator's cost in isolation (the 32x56x56x128 input
is 51 MB).

TensorFlow runs with oneDNN on (``TF_ENABLE_ONEDNN_OPTS=1``; without it TF's fused kernel is
about 3x slower on the AMD CPU this was written on). Processes are started round-robin
(rotating order each round), so a slow phase of a shared machine hits every contender; each
process reports per-shape medians and the table gives the median over rounds.

The TensorFlow contender needs an interpreter with ``tensorflow`` and ``tf_keras`` (not JAX):
``--tf-python``, else ``$KBN_TF_PYTHON``, else this interpreter if it can import tf_keras.

Usage::

  python benchmarks/bench_processes.py --tf-python /path/to/tf-venv/bin/python [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_process_worker.py"
REPO = HERE.parent
TUNED_ENV = {
  "MALLOC_MMAP_THRESHOLD_": "4294967296",
  "MALLOC_TRIM_THRESHOLD_": "4294967296",
  "MALLOC_ARENA_MAX": "1",
}
ALLOCATORS = ("default", "tuned")
MALLOPT = "mallopt"
PRELOAD = "preload"
# The configurations where tf_keras's V1 layer uses its fused kernel (rank 4, axis 1 or 3).
FUSED_CONFIGS = {
  "nhwc_64x32x32x64": ((64, 32, 32, 64), -1),
  "nhwc_32x56x56x128": ((32, 56, 56, 128), -1),
  "nhwc_8x112x112x64": ((8, 112, 112, 64), -1),
  "nchw_64x64x32x32": ((64, 64, 32, 32), 1),
}
KBN = "kbn_jax"
AFFINE = "x*2+1"
TF = "tf_keras"


def tf_python(explicit: str | None = None) -> str | None:
  """The interpreter for the TensorFlow contender, or None if there is none."""
  for candidate in (explicit, os.environ.get("KBN_TF_PYTHON")):
    if candidate:
      return candidate
  if importlib.util.find_spec("tf_keras") is not None:
    return sys.executable
  return None


def _environment(contender: str, allocator: str, preload: str | None = None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in TUNED_ENV}
  env.pop("KBN_TUNE_MALLOC", None)
  env.pop("LD_PRELOAD", None)
  if allocator == "tuned":
    env.update(TUNED_ENV)
  elif allocator == MALLOPT:
    env["KBN_TUNE_MALLOC"] = "1"
  elif allocator == PRELOAD:
    env["LD_PRELOAD"] = str(preload)
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  if contender == TF:
    env["TF_ENABLE_ONEDNN_OPTS"] = "1"
  else:
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  return env


def _worker(
  python: str, contender: str, allocator: str, configs, repeats, target_s, preload=None
) -> dict:
  specs = [f"{name}={','.join(map(str, shape))}:{axis}" for name, (shape, axis) in configs.items()]
  done = subprocess.run(
    [python, str(WORKER), contender, str(repeats), str(target_s), *specs],
    env=_environment(contender, allocator, preload),
    cwd=REPO,
    capture_output=True,
    text=True,
    check=False,
  )
  if done.returncode:
    raise RuntimeError(f"{contender} ({allocator}) failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def run(
  *,
  tf_interpreter: str | None,
  configs=None,
  rounds: int = 3,
  repeats: int = 7,
  target_s: float = 0.05,
  allocators=ALLOCATORS,
  preload: str | None = None,
  log=print,
) -> dict[tuple[str, str], dict[str, float]]:
  """Runs every (contender, allocator) process `rounds` times, round-robin.

  Returns:
    ``{(contender, allocator): {config name: median seconds over rounds}}``; the TensorFlow
    contender is absent without an interpreter.
  """
  configs = FUSED_CONFIGS if configs is None else configs
  pythons = {KBN: sys.executable, AFFINE: sys.executable}
  if tf_interpreter:
    pythons[TF] = tf_interpreter
  jobs = [(c, a) for c in pythons for a in allocators if not (c == TF and a == MALLOPT)]
  if PRELOAD in allocators and not preload:
    raise ValueError("the `preload` allocator needs `preload`, the path of an allocator library")
  samples = {job: [] for job in jobs}
  for round_index in range(rounds):
    shift = round_index % len(jobs)
    for contender, allocator in jobs[shift:] + jobs[:shift]:
      result = _worker(
        pythons[contender], contender, allocator, configs, repeats, target_s, preload
      )
      samples[contender, allocator].append(result)
      log(
        f"  round {round_index + 1}/{rounds} {contender:9s} {allocator:8s} "
        + "  ".join(f"{n}={result[n] * 1e3:.2f}ms" for n in configs)
      )
  return {
    job: {name: statistics.median(s[name] for s in runs) for name in configs}
    for job, runs in samples.items()
  }


def markdown(medians, configs=None, rounds=3, preload=None) -> list[str]:
  """A Markdown section: per configuration and allocator, the medians and TF / kbn_jax."""
  configs = FUSED_CONFIGS if configs is None else configs
  has_tf = any(c == TF for c, _ in medians)
  lines = [
    "## Training step against tf_keras's fused kernel, fresh processes, both allocators",
    "",
    "Each contender in its own fresh process (`benchmarks/bench_processes.py`), started "
    f"round-robin, {rounds} processes per contender and allocator; medians over the processes "
    "of each process's median. `default`: glibc's malloc as is; `tuned`: "
    "`MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_ARENA_MAX=1` "
    "(the environment "
    "route; `kbn_jax.cpu.tune_malloc()` is the in-process one). `x*2+1`: "
    "`jax.jit(lambda x: x * 2 + 1)` on the same input, the allocator's cost alone. TensorFlow: "
    "tf_keras V1 `BatchNormalization`"
    " (fused kernel), `TF_ENABLE_ONEDNN_OPTS=1`. Ratio = TF time / kbn_jax time (above 1: "
    "kbn_jax faster).",
    "",
  ]
  if not has_tf:
    lines += ["TensorFlow with tf_keras was not available; only kbn_jax was timed.", ""]
  allocators = [a for a in (*ALLOCATORS, PRELOAD) if (KBN, a) in medians]
  if PRELOAD in allocators:
    lines += [f"`preload`: `LD_PRELOAD={preload}`.", ""]
  header = ["configuration"]
  header += [f"{c} {a}" for c in (AFFINE, KBN) for a in allocators]
  if has_tf:
    header += [f"TF {a}" for a in allocators]
    header += [f"TF/kbn {a}" for a in allocators] + ["best TF / best kbn"]
  lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for name in configs:
    row = [name]
    row += [f"{medians[c, a][name] * 1e3:.2f} ms" for c in (AFFINE, KBN) for a in allocators]
    if has_tf:
      row += [f"{medians[TF, a][name] * 1e3:.2f} ms" for a in allocators]
      row += [f"{medians[TF, a][name] / medians[KBN, a][name]:.2f}" for a in allocators]
      best_tf = min(medians[TF, a][name] for a in allocators)
      best_kbn = min(medians[KBN, a][name] for a in allocators)
      row.append(f"{best_tf / best_kbn:.2f}")
    lines.append("| " + " | ".join(row) + " |")
  return [*lines, ""]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tf-python", help="interpreter with tensorflow and tf_keras")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--target-s", type=float, default=0.05)
  parser.add_argument("--shapes", help="comma-separated subset of " + ",".join(FUSED_CONFIGS))
  parser.add_argument(
    "--mallopt", action="store_true", help="also time the JAX processes with tune_malloc()"
  )
  parser.add_argument("--preload", help="an allocator library to time under LD_PRELOAD too")
  args = parser.parse_args(argv)
  configs = FUSED_CONFIGS
  if args.shapes:
    configs = {n: FUSED_CONFIGS[n] for n in args.shapes.split(",")}
  medians = run(
    tf_interpreter=tf_python(args.tf_python),
    configs=configs,
    rounds=args.rounds,
    repeats=args.repeats,
    target_s=args.target_s,
    allocators=(*ALLOCATORS, *[MALLOPT] * args.mallopt, *[PRELOAD] * bool(args.preload)),
    preload=args.preload,
  )
  print("\n".join(markdown(medians, configs, args.rounds, args.preload)))
  if args.mallopt:
    for contender in (AFFINE, KBN):
      print(
        f"{contender} tune_malloc() / env tuned: "
        + "  ".join(
          f"{n}={medians[contender, MALLOPT][n] / medians[contender, 'tuned'][n]:.2f}"
          for n in configs
        )
      )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
