"""Whole-model ports against the real libraries, replayed without TF or torch.

The fixtures in ``tests/oracles/model_ports`` were written by tf_keras 2.21, Keras 3.15.1 and torch
2.13
(``generate_keras.py``, ``generate_torch.py``): a keras.applications MobileNetV2 and a
torchvision-named ResNet-18, each trained a few steps, with logits and statistics recorded. The
ports are the examples' own code (``examples/port_keras_model.py``, ``port_torch_model.py``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kbn_jax import keras_compat, torch_compat

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "oracles" / "model_ports"
KERAS_FILES = {"mobilenet_v2_tf_keras.h5": "keras_v2", "mobilenet_v2_keras3.keras": "keras3"}


def _example(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses (the linen Module) look their module up
  spec.loader.exec_module(module)
  return module


keras_port = _example("port_keras_model")
torch_port = _example("port_torch_model")


def _reference(name):
  with np.load(FIXTURES / name) as data:
    return dict(data)


def _torch_state():
  return _reference("resnet18_w8.npz")


@pytest.mark.parametrize(("name", "semantics"), KERAS_FILES.items())
def test_every_keras_batch_norm_finds_its_place(name, semantics):
  batch_norms = keras_compat.load_batch_norms(FIXTURES / name)
  meta = json.loads((FIXTURES / name).with_suffix(".json").read_text())
  assert len(batch_norms) == meta["batch_norms"] == 52
  assert {m.semantics for m, _ in batch_norms.values()} == {semantics}
  model = keras_port.MobileNetV2(semantics=semantics)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  grafted = keras_compat.graft_batch_norms(batch_norms, dict(shapes))
  for layer, (_, variables) in batch_norms.items():
    for collection, values in variables.items():
      for key, value in values.items():
        np.testing.assert_array_equal(grafted[collection][layer][key], value)


def test_every_torch_batch_norm_finds_its_place():
  state = _torch_state()
  loaded = torch_compat.load_batch_norms(state, momentum=0.1, eps=1e-5)
  assert len(loaded) == json.loads((FIXTURES / "resnet18_w8.json").read_text())["batch_norms"]
  model = nnx.eval_shape(lambda: torch_port.ResNet18(rngs=nnx.Rngs(0)))
  torch_compat.graft_batch_norms(loaded, model)
  bn = model.layer2[0].downsample[1]
  np.testing.assert_array_equal(
    bn.moving_variance.get_value(), state["layer2.0.downsample.1.running_var"]
  )
  assert int(bn.num_batches_tracked.get_value()) == int(
    state["layer2.0.downsample.1.num_batches_tracked"]
  )


def test_torch_defaults_are_refused_when_the_model_says_otherwise():
  """A model built with MobileNetV3's settings does not take a state dict loaded at defaults."""
  with pytest.warns(UserWarning, match="20 batch norms loaded with PyTorch's defaults"):
    loaded = torch_compat.load_batch_norms(_torch_state())
  model = nnx.eval_shape(lambda: torch_port.ResNet18(rngs=nnx.Rngs(0)))
  model.bn1 = nnx.eval_shape(
    lambda: torch_port.kbn_jax.nnx.BatchNormalization(
      8, momentum=0.99, epsilon=1e-3, semantics="torch", rngs=nnx.Rngs(0)
    )
  )
  with pytest.raises(ValueError, match=r"'bn1' -> 'bn1': momentum 0\.9 \(file\) vs 0\.99, epsilon"):
    torch_compat.graft_batch_norms(loaded, model)


@pytest.mark.slow
@pytest.mark.parametrize("name", KERAS_FILES)
def test_keras_mobilenet_v2_matches_keras(name):
  model, variables = keras_port.port(FIXTURES / name)
  reference = _reference(Path(name).with_suffix(".npz"))
  errors = keras_port.check_against_keras(model, variables, reference)
  # measured: inference 5.5e-9, training 2.1e-5 (batch statistics of a 1x1 map, batch 8),
  # statistics 6.0e-8 (relative to 1 + |value|)
  assert errors["inference"] < 1e-6 and errors["statistics"] < 1e-6, errors
  assert errors["training"] < 1e-4, errors
  if name.endswith(".h5"):  # the fixture tells the semantics apart: V2's fused Bessel step
    wrong = keras_port.check_against_keras(model.clone(semantics="keras3"), variables, reference)
    assert wrong["statistics"] > 1e-5, wrong  # 2.4e-4 (momentum 0.999 damps it 1000-fold)


@pytest.mark.slow
def test_torch_resnet18_matches_torch():
  model = torch_port.port(_torch_state())
  errors = torch_port.check_against_torch(model, _reference("resnet18_w8_ref.npz"))
  # measured: eval 8.5e-8, train 3.4e-6, statistics 5.9e-8 (relative to 1 + |value|)
  assert errors["eval"] < 1e-6 and errors["statistics"] < 1e-6, errors
  assert errors["train"] < 1e-5, errors
