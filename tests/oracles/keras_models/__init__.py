"""Fixtures from real tf_keras models (see README.md); loading them needs no TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.oracles.keras_models import cases as cases

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load(name: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Returns ``(<name>.json, <name>.npz)`` of a fixture."""
  record = json.loads((FIXTURES / f"{name}.json").read_text())
  with np.load(FIXTURES / f"{name}.npz") as arrays:
    return record, dict(arrays)


def weights(arrays: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
  """The arrays ``<prefix>0``, ``<prefix>1``, ... in order."""
  out = []
  while f"{prefix}{len(out)}" in arrays:
    out.append(arrays[f"{prefix}{len(out)}"])
  return out


KERAS_EPSILON = 1e-7  # tf_keras backend.epsilon(), used by the norm constraints


def numpy_constraint(config: dict, w: np.ndarray) -> np.ndarray:
  """Keras's constraint formulas (``tf_keras/constraints.py``) in float64, for a config dict."""
  name, c = config["class_name"], config.get("config", {})
  w = np.asarray(w, np.float64)
  if name == "NonNeg":
    return w * (w >= 0)
  axis = c.get("axis", 0)
  axis = tuple(axis) if isinstance(axis, (list, tuple)) else axis
  norms = np.sqrt(np.sum(w**2, axis=axis, keepdims=True))
  if name == "UnitNorm":
    return w / (KERAS_EPSILON + norms)
  if name == "MaxNorm":
    desired = np.clip(norms, 0, c.get("max_value", 2.0))
  elif name == "MinMaxNorm":
    rate = c.get("rate", 1.0)
    desired = rate * np.clip(norms, c.get("min_value", 0.0), c.get("max_value", 1.0))
    desired = desired + (1 - rate) * norms
  else:
    raise ValueError(f"no reference for {name}")
  return w * (desired / (KERAS_EPSILON + norms))
