"""Two processes with `jax.distributed` (CPU collectives through gloo) == one device.

The test launches `_multiprocess_worker.py` twice on 127.0.0.1, each process with two CPU
devices, so the mesh spans four devices in two processes. The processes train a few steps of a
layer that synchronizes its statistics over the whole mesh; the test compares what they report
with the same steps on one device and the concatenated batch.

The processes run in their own session under a hard timeout and are always killed, so a stuck
coordinator cannot hang CI.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import _multiprocess_worker as worker

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 120
TOLERANCE = 1e-6
WORKER = Path(worker.__file__)


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _worker_env() -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(WORKER.parents[1]), env.get("PYTHONPATH")) if p
  )
  return env


def _kill(process: subprocess.Popen) -> None:
  """Kills the process's whole session (it was started with its own)."""
  if process.poll() is None:
    try:
      os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  process.wait()


def _run_workers(out_dir: Path) -> list[Path]:
  """Starts every process, waits at most `TIMEOUT_S` seconds in total, and always kills them."""
  port = _free_port()
  outputs = [out_dir / f"process_{i}.npz" for i in range(NUM_PROCESSES)]
  logs = [out_dir / f"process_{i}.log" for i in range(NUM_PROCESSES)]
  processes = []
  try:
    for i in range(NUM_PROCESSES):
      with open(logs[i], "wb") as log:
        processes.append(
          subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port), str(outputs[i])],
            env=_worker_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
          )
        )
    deadline = time.monotonic() + TIMEOUT_S
    for process in processes:
      process.wait(timeout=max(0.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired as error:
    raise AssertionError(
      f"the {NUM_PROCESSES} processes did not finish within {TIMEOUT_S} s:\n" + _read_logs(logs)
    ) from error
  finally:
    for process in processes:
      _kill(process)
  codes = [process.returncode for process in processes]
  assert codes == [0] * NUM_PROCESSES, f"exit codes {codes}:\n{_read_logs(logs)}"
  return outputs


def _read_logs(logs: list[Path]) -> str:
  return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}" for log in logs)


def _assert_close(name: str, actual: np.ndarray, expected: np.ndarray) -> None:
  """``max |actual - expected| <= TOLERANCE * max(1, max |expected|)`` (float32 sums)."""
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  error = float(np.max(np.abs(actual - expected)))
  scale = max(1.0, float(np.max(np.abs(expected))))
  assert error <= TOLERANCE * scale, f"{name}: max difference {error:.3g} (scale {scale:.3g})"


@pytest.mark.slow
def test_two_processes_match_one_device(tmp_path):
  outputs = _run_workers(tmp_path)
  expected = worker.run_single_device()
  per_process = [dict(np.load(path)) for path in outputs]
  for results in per_process:
    assert int(results["process_count"]) == NUM_PROCESSES
    assert int(results["global_devices"]) == NUM_PROCESSES * DEVICES_PER_PROCESS
    for name in ("y", "grad_x", "gamma", "beta", "moving_mean", "moving_variance"):
      _assert_close(name, results[name], expected[name])
  # Every device of every process holds bit-identical moving statistics.
  for name in ("moving_mean", "moving_variance"):
    copies = np.concatenate([results[f"local_{name}"] for results in per_process])
    assert copies.shape[0] == NUM_PROCESSES * DEVICES_PER_PROCESS
    np.testing.assert_array_equal(copies, np.broadcast_to(copies[:1], copies.shape))
