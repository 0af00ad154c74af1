"""Shared, numpy-only helpers of the framework-parity fixture generators.

Not imported by tests: tests only need ``cases.py`` and the committed fixtures.
The input generator follows ``tests/oracles/keras_parity/generate.py::make_arrays``
(same RandomState draw order for the arrays both share), extended with the
``random_init`` start values.
"""

from __future__ import annotations

import importlib.util
import io
import json
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"


def load_cases(semantics: str) -> list[dict]:
  spec = importlib.util.spec_from_file_location("framework_parity_cases", HERE / "cases.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return [c for c in module.CASES if c["semantics"] == semantics]


def select(cases: list[dict], argv: list[str]) -> list[dict]:
  if not argv:
    return cases
  unknown = set(argv) - {c["name"] for c in cases}
  if unknown:
    raise SystemExit(f"unknown cases: {sorted(unknown)}; known: {[c['name'] for c in cases]}")
  return [c for c in cases if c["name"] in argv]


def feature_axis(case: dict) -> int:
  """The normalized feature axis (torch: always 1)."""
  rank = len(case["input_shape"])
  if case["semantics"] == "torch":
    return 1
  axis = case["config"].get("axis", -1)
  if isinstance(axis, (list, tuple)):
    assert len(axis) == 1, axis
    axis = axis[0]
  return axis + rank if axis < 0 else axis


def make_arrays(case: dict) -> dict[str, np.ndarray]:
  """All numpy inputs of a case: x_k, dy_k, x_infer, mask, init_* start values."""
  rs = np.random.RandomState(case["seed"])
  shape = tuple(case["input_shape"])
  in_dtype = np.dtype(case["input_dtype"])
  offset = float(case.get("input_offset", 0.0))
  infer_batch = int(case.get("infer_batch", shape[0]))

  # A fixed location / spread per non-batch position, so that statistics
  # differ along every axis (catches wrong reduction axes).
  loc_field = rs.uniform(-1.0, 1.0, size=shape[1:])
  scale_field = rs.uniform(0.5, 2.0, size=shape[1:])

  def sample(k, batch):
    base = rs.standard_normal((batch,) + shape[1:])
    step_scale = 1.0 + 0.5 * k if case["drift"] else 1.0
    step_loc = 0.75 * k if case["drift"] else 0.0
    return (base * scale_field * step_scale + loc_field + step_loc + offset).astype(in_dtype)

  out: dict[str, np.ndarray] = {}
  for k in range(case["steps"]):
    out[f"x_{k}"] = sample(k, shape[0])
    out[f"dy_{k}"] = rs.standard_normal(shape).astype(np.float32)
  out["x_infer"] = sample(case["steps"] - 1, infer_batch)

  if case["mask"]:
    mask = (rs.uniform(size=shape[:2]) > 0.3).astype(np.float32)
    mask[1, :] = 0.0  # one fully padded sequence
    mask[0, :] = 1.0  # and one full one
    out["mask"] = mask

  if case.get("random_init"):
    c = shape[feature_axis(case)]
    out["init_gamma"] = rs.uniform(0.5, 1.5, size=c).astype(np.float32)
    out["init_beta"] = rs.uniform(-0.5, 0.5, size=c).astype(np.float32)
    out["init_moving_mean"] = rs.uniform(-0.5, 0.5, size=c).astype(np.float32)
    out["init_moving_variance"] = rs.uniform(0.5, 2.0, size=c).astype(np.float32)
    out["init_renorm_mean"] = rs.uniform(-0.5, 0.5, size=c).astype(np.float32)
    out["init_renorm_stddev"] = rs.uniform(0.7, 1.5, size=c).astype(np.float32)
  return out


def jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.floating):
    return float(obj)
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  return str(obj)


def save_npz(path: Path, arrays: dict) -> None:
  """Like ``np.savez_compressed`` (``np.load`` reads it), but byte-for-byte
  deterministic: fixed zip timestamps and sorted member order."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for key in sorted(arrays):
      info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      info.external_attr = 0o644 << 16
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.asanyarray(arrays[key]), allow_pickle=False)
      zf.writestr(info, buf.getvalue())


def write_fixture(stem: str, arrays: dict, meta: dict) -> None:
  FIXTURES.mkdir(exist_ok=True)
  save_npz(FIXTURES / f"{stem}.npz", arrays)
  (FIXTURES / f"{stem}.json").write_text(
    json.dumps(jsonable(meta), indent=1, sort_keys=True) + "\n"
  )


def write_json(name: str, obj) -> None:
  FIXTURES.mkdir(exist_ok=True)
  (FIXTURES / name).write_text(json.dumps(jsonable(obj), indent=1, sort_keys=True) + "\n")
