"""The layer now against the layer at an earlier commit, in one interleaved run.

The whole `kbn_jax` package of a git revision is loaded next to the working tree's under its
own name (``kbn_jax_<rev>``), whatever its file layout, and the *same*
`functional.batch_normalization` training step of each is reported, per shape:

* the training step (forward + input/gamma/beta cotangents + statistics update), timed
  interleaved (medians, ratio current / previous);
* the activation-sized reads / writes of the compiled step (`bench_contenders.activation_traffic`);
* the activation-sized residuals that reverse mode saves between the forward and the backward
  pass (``jax.ad_checkpoint.print_saved_residuals``): ideally only the input.

Usage::

  python benchmarks/bench_revision.py                  # previous = before the layout move
  python benchmarks/bench_revision.py --rev HEAD~1 --shapes nhwc_64x32x32x64
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_contenders as bc  # noqa: E402
import jax  # noqa: E402
import jax.ad_checkpoint  # noqa: E402
from _timing import Contender, format_seconds, time_interleaved  # noqa: E402

from kbn_jax import functional  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The last layout before the move to _moments/_normalize: the default comparison.
PRE_LAYOUT_FILE = "kbn_jax/_fast_train.py"
DEFAULT_SHAPES = ("nhwc_64x32x32x64", "nhwc_32x56x56x128", "nhwc_8x112x112x64", "dense_4096x512")


def _git(*args: str) -> str:
  return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def pre_layout_revision() -> str:
  """The newest commit that still has `PRE_LAYOUT_FILE` (the parent of its removal)."""
  removal = _git("rev-list", "-1", "HEAD", "--", PRE_LAYOUT_FILE).strip()
  if not removal:
    raise SystemExit(f"no commit touches {PRE_LAYOUT_FILE}; pass --rev")
  if PRE_LAYOUT_FILE in _git("ls-tree", "-r", "--name-only", removal, "kbn_jax"):
    return _git("rev-parse", "--short", removal).strip()
  return _git("rev-parse", "--short", f"{removal}~1").strip()


def load_revision(revision: str) -> types.ModuleType:
  """`kbn_jax.functional` of `revision`, imported as ``kbn_jax_<rev>.functional``."""
  name = f"kbn_jax_{revision.replace('~', '_').replace('^', '_')}"
  root = Path(tempfile.mkdtemp(prefix="kbn_revision_"))
  for path in _git("ls-tree", "-r", "--name-only", revision, "kbn_jax").split():
    if path.endswith(".py"):
      target = root / name / Path(path).relative_to("kbn_jax")
      target.parent.mkdir(parents=True, exist_ok=True)
      source = _git("show", f"{revision}:{path}")
      target.write_text(re.sub(r"\bkbn_jax\b", name, source))
  sys.path.insert(0, str(root))
  return importlib.import_module(f"{name}.functional")


def train_step(config: bc.Config, functional_module: types.ModuleType):
  """``(step, forward, args)``: forward + vjp(x, params) + new statistics of one revision."""
  bn_config = functional_module.BatchNormConfig(
    axis=config.axis, momentum=bc.MOMENTUM, epsilon=bc.EPSILON
  )
  x, ct = bc.inputs(config.shape)
  params, stats = functional_module.init_variables(bn_config, jax.random.key(0), config.shape)

  def forward(x, params, stats):
    return functional_module.batch_normalization(x, params, stats, bn_config, training=True)

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
  parser.add_argument(
    "--rev", help="git revision to compare with (default: before the layout move)"
  )
  parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--target-s", type=float, default=0.05)
  args = parser.parse_args(argv)
  revision = args.rev or pre_layout_revision()
  previous = load_revision(revision)
  names = {c.name: c for c in bc.CONFIGS}
  current_name, previous_name = "current (working tree)", f"previous ({revision})"
  print(f"layer: current = working tree, previous = kbn_jax at {revision}")
  print(f"jax.devices(): {jax.devices()}")
  for shape_name in args.shapes.split(","):
    config = names[shape_name]
    size = math.prod(config.shape)
    contenders, rows = [], {}
    for name, module in ((current_name, functional), (previous_name, previous)):
      step, forward, step_args = train_step(config, module)
      compiled = jax.jit(step)
      hlo = jax.jit(step).lower(*step_args).compile().as_text()
      rows[name] = (
        bc.activation_traffic(hlo, size),  # the path taken when one pass holds
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
