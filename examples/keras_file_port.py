"""Load every batch-norm layer of saved TF2 tf_keras and Keras 3 models, and check them.

    python examples/keras_file_port.py                     # the committed tf_keras / Keras 3 files
    python examples/keras_file_port.py --file model.keras  # your own file (.h5 or .keras)
    python examples/keras_file_port.py --quick             # the same (it is quick)

`kbn_jax.keras_compat.load_batch_norms` reads a legacy ``.h5`` or a ``.keras`` file without
executing anything from it, finds every BatchNormalization layer (nested models included,
keyed ``"outer/inner"``) and gives each the semantics the file says it was saved with: a
tf_keras file from TF2 is Keras's V2 layer (``semantics="keras_v2"``), a Keras 3 file
``"keras3"``. Both run a frozen layer (``trainable=False``) in inference mode even in a training
call, unlike the V1 layer, so a port that ignored this would train differently.

For the committed files (``tests/oracles/keras_files/fixtures``, written by tf_keras 2.21 and Keras
3.15.1), each layer is run on the input Keras recorded for it, and its training output, updated
statistics and inference output are compared with Keras's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kbn_jax import keras_compat

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "oracles" / "keras_files" / "fixtures"
COMMITTED = ("tfk_convnet.h5", "k3_convnet.keras")


def largest_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual.reshape(expected.shape) - expected)))


def check_against_keras(path: Path, layers) -> float:
  """Runs each layer on Keras's recorded input; returns the largest difference from Keras."""
  model = json.loads((FIXTURES / "manifest.json").read_text())["files"][path.name]["model"]
  with np.load(FIXTURES / f"{model}.npz") as data:
    reference = dict(data)
  worst = 0.0
  for name, (layer, variables) in layers.items():
    x = jnp.asarray(reference[f"{name}/x"])
    y, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
    after = keras_compat.keras_weights_from_variables(layer, {**variables, **updates}, x.shape)
    errors = [largest_error(y, reference[f"{name}/y_train"])]
    errors += [largest_error(w, reference[f"{name}/w_after/{i}"]) for i, w in enumerate(after)]
    errors.append(largest_error(layer.apply(variables, x), reference[f"{name}/y_infer"]))
    worst = max(worst, *errors)
  return worst


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--file", type=Path, action="append", help="a .h5 or .keras model file")
  parser.add_argument("--quick", action="store_true", help="accepted for the smoke tests")
  args = parser.parse_args(argv)
  for path in args.file or [FIXTURES / name for name in COMMITTED]:
    layers = keras_compat.load_batch_norms(path)
    print(f"{path.name}:")
    for name, (layer, _) in layers.items():
      frozen = "  frozen: inference in training calls too" if not layer.trainable else ""
      print(f"  {name:14s} semantics={layer.semantics:9s} axis={layer.axis!r}{frozen}")
    if path.parent == FIXTURES:
      print(
        f"  largest difference from Keras's own numbers: {check_against_keras(path, layers):.1e}"
      )


if __name__ == "__main__":
  main()
