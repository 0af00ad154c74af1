"""Prints ``to_keras_config()`` of every `cases.EXPORT_CASES` module as one JSON line.

Run by `generate.py` with an interpreter that has kbn_jax (not TensorFlow) installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import kbn_jax

HERE = Path(__file__).resolve().parent


def main():
  spec = importlib.util.spec_from_file_location("keras_models_cases", HERE / "cases.py")
  cases = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cases)
  out = {
    case["name"]: kbn_jax.BatchNormalization(**case["kwargs"]).to_keras_config()
    for case in cases.EXPORT_CASES
  }
  print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
  main()
