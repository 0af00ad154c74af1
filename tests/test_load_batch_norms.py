"""`keras_compat.load_batch_norms` on real tf_keras and Keras 3 files.

Each file's layers are loaded with the semantics the file says, then run on the input Keras saw:
the training-mode output (a frozen layer shows its library's semantics), the statistics after
that call, and the inference output must equal what Keras recorded, at 1e-5. No TensorFlow.
"""

import json
import pathlib
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from kbn_jax import keras_compat

FIXTURES = pathlib.Path(__file__).parent / "oracles" / "keras_files" / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
MODEL_FILES = sorted(
  name for name, entry in MANIFEST["files"].items() if entry["format"] in ("h5", "keras")
)
WEIGHTS_ONLY = sorted(name for name, entry in MANIFEST["files"].items() if "config_from" in entry)


def _close(actual, expected, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  actual = actual.reshape(expected.shape)
  error = np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1.0))
  assert error <= 1e-5, f"{what}: off by {error:.3g}"


def _check_layers(layers, model):
  with np.load(FIXTURES / f"{model}.npz") as data:
    reference = dict(data)
  assert sorted(layers) == sorted(MANIFEST["models"][model]["layers"])
  for name, (module, variables) in layers.items():
    x = jnp.asarray(reference[f"{name}/x"])
    y, updates = module.apply(variables, x, training=True, mutable=["batch_stats"])
    _close(y, reference[f"{name}/y_train"], f"{model}:{name} training output")
    after = {**variables, **updates}
    weights = keras_compat.keras_weights_from_variables(module, after, x.shape)
    for i, value in enumerate(weights):
      _close(value, reference[f"{name}/w_after/{i}"], f"{model}:{name} weight {i} after")
    y_infer = module.apply(variables, x, training=False)
    _close(y_infer, reference[f"{name}/y_infer"], f"{model}:{name} inference")


@pytest.mark.parametrize("file", MODEL_FILES)
def test_every_layer_reproduces_keras(file):
  entry = MANIFEST["files"][file]
  # The explicit V1 class saves exactly like V2: nothing in the file can tell them apart.
  truth = {"semantics": "keras_v1"} if entry["model"] == "tfk_v1" else {}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no warning: every file here says what it is
    layers = keras_compat.load_batch_norms(FIXTURES / file, **truth)
  semantics = {module.semantics for module, _ in layers.values()}
  assert semantics == {truth.get("semantics", entry["semantics"])}
  _check_layers(layers, entry["model"])


@pytest.mark.parametrize("file", WEIGHTS_ONLY)
def test_weights_only_files_load_with_their_config(file):
  entry = MANIFEST["files"][file]
  with pytest.raises(ValueError, match="no model config"):
    keras_compat.load_batch_norms(FIXTURES / file)
  layers = keras_compat.load_batch_norms(
    FIXTURES / file, config_path=FIXTURES / entry["config_from"]
  )
  _check_layers(layers, entry["model"])


def test_v1_reading_of_a_v2_file_differs_on_the_frozen_layer():
  """The test above can fail: read as V1, the frozen layer's training output is not Keras's."""
  layers = keras_compat.load_batch_norms(FIXTURES / "tfk_convnet.h5", semantics="keras_v1")
  with pytest.raises(AssertionError, match="bn_frozen training output"):
    _check_layers(layers, "tfk_convnet")


def test_bare_frozen_config_warns_and_semantics_silences():
  config = {"class_name": "BatchNormalization", "config": {"axis": -1, "trainable": False}}
  with pytest.warns(UserWarning, match="semantics='keras_v2'"):
    module = keras_compat.from_keras_config(config)
  assert module.semantics == "keras_v1"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert keras_compat.from_keras_config(config, semantics="keras_v2").semantics == "keras_v2"
    keras3 = {**config, "config": {**config["config"], "synchronized": False}}
    assert keras_compat.from_keras_config(keras3).semantics == "keras3"


def test_layer_readers_read_every_format():
  weights = keras_compat.load_layer_weights(FIXTURES / "k3_convnet.keras", "bn_dense")
  layers = keras_compat.load_batch_norms(FIXTURES / "k3_convnet.keras")
  expected = keras_compat.keras_weights_from_variables(*layers["bn_dense"])
  for value, reference in zip(weights, expected, strict=True):
    np.testing.assert_array_equal(value, reference)
  config = keras_compat.load_layer_config(FIXTURES / "tfk_convnet.keras", "bn_conv")
  assert config["config"]["name"] == "bn_conv"
  # Any layer: the convolution kernel and bias, from the legacy .h5 as from the .keras zip.
  for name in ("tfk_convnet.h5", "tfk_convnet.keras"):
    kernel, bias = keras_compat.load_layer_weights(FIXTURES / name, "conv2")
    assert kernel.shape == (3, 3, 4, 5) and bias.shape == (5,)


def test_old_reader_names_warn_and_still_work():
  with pytest.warns(DeprecationWarning, match=r"load_keras_h5_weights.*use.*load_layer_weights"):
    old = keras_compat.load_keras_h5_weights(FIXTURES / "tfk_convnet.h5", "bn_conv")
  new = keras_compat.load_layer_weights(FIXTURES / "tfk_convnet.h5", "bn_conv")
  for a, b in zip(old, new, strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.warns(DeprecationWarning, match=r"load_keras_h5_config.*use.*load_layer_config"):
    config = keras_compat.load_keras_h5_config(FIXTURES / "tfk_convnet.h5", "bn_conv")
  assert config == keras_compat.load_layer_config(FIXTURES / "tfk_convnet.h5", "bn_conv")


def test_not_a_model_file(tmp_path):
  path = tmp_path / "m.keras"
  path.write_bytes(b"PK\x03\x04 this is no zip")
  with pytest.raises(ValueError, match="m.keras"):
    keras_compat.load_batch_norms(path)


def test_layer_weights_of_a_weights_only_file_take_its_config():
  path = FIXTURES / "tfk_convnet.weights.h5"  # tf_keras records no layer names in this layout
  with pytest.raises(KeyError, match="config_path="):
    keras_compat.load_layer_weights(path, "bn_dense")
  weights = keras_compat.load_layer_weights(
    path, "bn_dense", config_path=FIXTURES / "tfk_convnet.keras"
  )
  expected = keras_compat.load_layer_weights(FIXTURES / "tfk_convnet.keras", "bn_dense")
  for value, reference in zip(weights, expected, strict=True):
    np.testing.assert_array_equal(value, reference)
