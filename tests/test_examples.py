"""Smoke test: every example script runs to completion in its ``--quick`` mode.

Each ``examples/*.py`` not starting with ``_`` is discovered by glob, so a new example is covered
without editing this file; every example must accept ``--quick`` (a few steps) and exit with 0.
The scripts run as subprocesses, all started at once (most of their time is single-threaded XLA
compilation, so they overlap well), each in its own temporary working directory so that nothing
is written to the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(p for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_"))
# A hang guard, not a timing assertion: a --quick run takes seconds.
TIMEOUT_S = 300


class _Run:
  """One example started in the background, its combined output going to a log file."""

  def __init__(self, script: Path, workdir: Path, extra_args: tuple[str, ...] = ()):
    self.script = script
    self.log_path = workdir / "output.log"
    self._log = self.log_path.open("w")
    env = dict(os.environ, MPLBACKEND="Agg")
    self.process = subprocess.Popen(
      [sys.executable, str(script), "--quick", *extra_args],
      cwd=workdir,
      env=env,
      stdin=subprocess.DEVNULL,
      stdout=self._log,
      stderr=subprocess.STDOUT,
    )

  def wait(self) -> int | None:
    """The exit code, or None if it ran past the timeout (then it is killed)."""
    try:
      return self.process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      self.stop()
      return None
    finally:
      self._log.close()

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.kill()
    self.process.wait()
    self._log.close()

  def output_tail(self, chars: int = 6000) -> str:
    return self.log_path.read_text(errors="replace")[-chars:]


def _needed_runs(items) -> set[str]:
  """The runs the selected tests of this module wait for (the default tier needs one)."""
  needed = set()
  for item in items:
    module = getattr(item, "module", None)  # doctest items have none
    if module is None or module.__name__ != __name__:
      continue
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if "script" in params:
      script = params["script"]
      needed.add(script.name if isinstance(script, Path) else script)
    if "api" in params:
      needed.add(f"train_digits.py --api {params['api']}")
    if item.originalname == "test_raw_jax_example_imports_neither_flax_nor_optax":
      needed.add("raw_jax_train.py")
  return needed


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
  """Starts, all at once, only the example runs that the selected tests wait for."""
  needed = _needed_runs(request.session.items)
  started = {p.name: _Run(p, tmp_path_factory.mktemp(p.stem)) for p in EXAMPLES if p.name in needed}
  digits = EXAMPLES_DIR / "train_digits.py"
  for api in ("nnx", "equinox", "haiku"):
    if f"train_digits.py --api {api}" in needed:
      started[f"train_digits.py --api {api}"] = _Run(
        digits, tmp_path_factory.mktemp(f"train_digits_{api}"), ("--api", api)
      )
  yield started
  for run in started.values():
    run.stop()


def test_examples_are_discovered():
  assert "train_digits.py" in {p.name for p in EXAMPLES}


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_quick(script, runs):
  run = runs[script.name]
  code = run.wait()
  assert code is not None, f"{script.name} --quick did not finish within {TIMEOUT_S} s"
  assert code == 0, f"{script.name} --quick exited with {code}; output:\n{run.output_tail()}"


def test_raw_jax_example_imports_neither_flax_nor_optax(runs):
  """The raw-JAX example trains through `kbn_jax.functional` alone."""
  run = runs["raw_jax_train.py"]
  code = run.wait()
  output = run.output_tail()
  assert code == 0, f"raw_jax_train.py --quick exited with {code}; output:\n{output}"
  assert "imported: flax=False optax=False" in output.splitlines(), output
  assert "test accuracy" in output


@pytest.mark.slow
@pytest.mark.parametrize("api", ["nnx", "equinox", "haiku"])
def test_digits_example_trains_in_every_library(runs, api):
  """The same CNN in Flax NNX, Equinox and Haiku with their kbn_jax layer."""
  run = runs[f"train_digits.py --api {api}"]
  code = run.wait()
  output = run.output_tail()
  assert code == 0, f"train_digits.py --quick --api {api} exited with {code}; output:\n{output}"
  assert f"({api})" in output and "test accuracy" in output, output


@pytest.mark.slow
@pytest.mark.parametrize(
  ("script", "expected"),
  [
    ("port_keras_model.py", "mobilenet_v2_tf_keras.h5: 52 batch norms, semantics keras_v2"),
    ("port_torch_model.py", "resnet18_w8.npz: 20 batch norms, semantics torch"),
  ],
)
def test_whole_model_ports_report_their_match(script, expected, runs):
  """Each port checks itself against the library's recorded logits."""
  run = runs[script]
  code = run.wait()
  output = run.output_tail()
  assert code == 0, f"{script} --quick exited with {code}; output:\n{output}"
  assert expected in output.splitlines(), output
  assert "largest relative difference from" in output, output
