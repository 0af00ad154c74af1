"""The layer's training kernels now against those of an earlier commit, in one interleaved run.

`kbn_jax/_fast_train.py` holds the closed-form training kernels (`batch_moments`,
`normalize_batch`). This script loads that file from a git revision (by default the newest
commit whose kernels are a ``jax.custom_vjp``) next to the working tree's, runs the *same*
`kbn_jax.functional.batch_normalization` with either set swapped in, and reports, per shape:

* the training step (forward + input/gamma/beta cotangents + statistics update), timed
  interleaved (medians, ratio current / previous);
* the activation-sized reads / writes of the compiled step (`bench_contenders.activation_traffic`);
* the activation-sized residuals that reverse mode saves between the forward and the backward
  pass (``jax.ad_checkpoint.print_saved_residuals``): ideally only the input.

Usage::

  python benchmarks/bench_revision.py                  # previous = newest custom_vjp commit
  python benchmarks/bench_revision.py --rev HEAD~1 --shapes nhwc_64x32x32x64
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import re
import subprocess
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_contenders as bc  # noqa: E402
import jax  # noqa: E402
import jax.ad_checkpoint  # noqa: E402
from _timing import Contender, format_seconds, time_interleaved  # noqa: E402

from kbn_jax import _batch_norm, _fast_train, functional  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KERNELS = "kbn_jax/_fast_train.py"
DEFAULT_SHAPES = ("nhwc_64x32x32x64", "nhwc_32x56x56x128", "nhwc_8x112x112x64", "dense_4096x512")


def _git(*args: str) -> str:
  return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def newest_vjp_revision(limit: int = 30) -> str:
  """The newest commit whose training kernels are a `jax.custom_vjp`."""
  for commit in _git("log", f"-{limit}", "--format=%h", "--", KERNELS).split():
    if "jax.custom_vjp(" in _git("show", f"{commit}:{KERNELS}"):
      return commit
  raise SystemExit(f"no commit among the last {limit} touching {KERNELS} uses jax.custom_vjp")


def load_kernels(revision: str) -> types.ModuleType:
  """`kbn_jax/_fast_train.py` at `revision`, importable next to today's.

  Before the pure-function refactor its helpers lived in ``kbn_jax.functional``, now in
  ``kbn_jax._math``; the import is redirected there.
  """
  source = _git("show", f"{revision}:{KERNELS}")
  source = source.replace(
    "from kbn_jax import functional\n", "from kbn_jax import _math as functional\n"
  )
  module = types.ModuleType(f"kbn_jax_fast_train_{revision}")
  module.__file__ = f"{revision}:{KERNELS}"
  exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102
  return module


@contextlib.contextmanager
def kernels(module: types.ModuleType):
  """Traces `kbn_jax.functional.batch_normalization` with `module`'s training kernels."""
  saved = _batch_norm._fast_train
  _batch_norm._fast_train = module
  try:
    yield
  finally:
    _batch_norm._fast_train = saved


def train_step(config: bc.Config, module: types.ModuleType):
  """``(jitted step, args)``: forward + vjp(x, params) + new statistics, with `module`'s kernels."""
  bn_config = functional.BatchNormConfig(axis=config.axis, momentum=bc.MOMENTUM, epsilon=bc.EPSILON)
  x, ct = bc.inputs(config.shape)
  params, stats = functional.init_variables(bn_config, jax.random.key(0), config.shape)

  def forward(x, params, stats):
    with kernels(module):
      return functional.batch_normalization(x, params, stats, bn_config, training=True)

  def step(params, stats, x, ct):
    y, vjp, new_stats = jax.vjp(lambda x, p: forward(x, p, stats), x, params, has_aux=True)
    return y, vjp(ct), new_stats

  return step, forward, (params, stats, x, ct)


def saved_residuals(forward, args, size: int) -> list[str]:
  """The activation-sized residuals reverse mode keeps (shapes and where they come from)."""
  params, stats, x, _ = args
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    jax.ad_checkpoint.print_saved_residuals(lambda x, p: forward(x, p, stats)[0], x, params)
  big = []
  for line in buffer.getvalue().splitlines():
    match = re.match(r"\s*\w+\[([\d,]*)\]", line)
    if match and math.prod(int(d) for d in match.group(1).split(",") if d) >= size:
      big.append(line.strip())
  return big


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rev", help="git revision of the previous kernels (default: newest vjp)")
  parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--target-s", type=float, default=0.05)
  args = parser.parse_args(argv)
  revision = args.rev or newest_vjp_revision()
  previous = load_kernels(revision)
  names = {c.name: c for c in bc.CONFIGS}
  current_name, previous_name = "current (working tree)", f"previous ({revision})"
  print(f"kernels: current = working tree, previous = {revision}:{KERNELS}")
  print(f"jax.devices(): {jax.devices()}")
  for shape_name in args.shapes.split(","):
    config = names[shape_name]
    size = math.prod(config.shape)
    contenders, rows = [], {}
    for name, module in ((current_name, _fast_train), (previous_name, previous)):
      step, forward, step_args = train_step(config, module)
      compiled = jax.jit(step)
      hlo = jax.jit(step).lower(*step_args).compile().as_text()
      rows[name] = (
        bc.activation_traffic(hlo, size),
        saved_residuals(forward, step_args, size),
      )
      contenders.append(Contender(name, lambda c=compiled, a=step_args: c(*a)))
    timings = time_interleaved(contenders, repeats=args.repeats, target_s=args.target_s)
    ratio = timings[current_name].median / timings[previous_name].median
    print(f"\n{shape_name}: train step current / previous = {ratio:.3f}")
    for name in (current_name, previous_name):
      (reads, writes), residuals = rows[name]
      print(
        f"  {name:28s} median {format_seconds(timings[name].median):>9s} "
        f"(min {format_seconds(timings[name].low)}); HLO activation traffic {reads}r+{writes}w; "
        f"activation-sized residuals: {len(residuals)}"
      )
      for line in residuals:
        print(f"      {line}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
