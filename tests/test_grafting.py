"""Grafting loaded batch norms into a user's own Flax model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kbn_jax
import kbn_jax.nnx
from kbn_jax import keras_compat, torch_compat


def _loaded(sizes, semantics="keras_v2", momentum=0.9):
  """``{name: (module, variables)}`` as load_batch_norms returns it, with random values."""
  rng = np.random.default_rng(0)
  loaded = {}
  for name, size in sizes.items():
    module = kbn_jax.BatchNormalization(momentum=momentum, semantics=semantics)
    variables = {
      "params": {"gamma": rng.uniform(0.5, 2, size), "beta": rng.normal(size=size)},
      "batch_stats": {
        "moving_mean": rng.normal(size=size),
        "moving_variance": rng.uniform(0.5, 2, size),
      },
    }
    loaded[name] = (module, jax.tree.map(jnp.float32, variables))
  return loaded


class Block(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, training=False):
    x = nn.Dense(self.features, name="dense")(x)
    return kbn_jax.BatchNormalization(momentum=0.9, semantics="keras_v2", name="bn")(x, training)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, training=False):
    x = kbn_jax.BatchNormalization(momentum=0.9, semantics="keras_v2", name="bn_in")(x, training)
    x = Block(4, name="block1")(x, training)
    return Block(2, name="block2")(x, training)


X = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)


def _init():
  return Net().init(jax.random.key(0), X)


def test_linen_graft_places_every_layer_and_keeps_the_rest():
  loaded = _loaded({"bn_in": 3, "b1": 4, "block2/bn": 2})
  variables = _init()
  grafted = keras_compat.graft_batch_norms(loaded, variables, names={"b1": "block1/bn"})
  for name, path in (
    ("bn_in", ("bn_in",)),
    ("b1", ("block1", "bn")),
    ("block2/bn", ("block2", "bn")),
  ):
    for collection, values in loaded[name][1].items():
      node = grafted[collection]
      for key in path:
        node = node[key]
      jax.tree.map(np.testing.assert_array_equal, node, values)
  kernel = grafted["params"]["block1"]["dense"]["kernel"]
  np.testing.assert_array_equal(kernel, variables["params"]["block1"]["dense"]["kernel"])
  np.testing.assert_array_equal(variables["batch_stats"]["bn_in"]["moving_mean"], 0.0)  # a copy
  # Invariant: the grafted model is the loaded layers composed with the model's own Dense.
  expected = X
  for name, dense in (("bn_in", "block1"), ("b1", "block2"), ("block2/bn", None)):
    module, values = loaded[name]
    expected = module.apply(values, expected)
    if dense:
      params = grafted["params"][dense]["dense"]
      expected = expected @ params["kernel"] + params["bias"][None]
  np.testing.assert_allclose(Net().apply(grafted, X), expected, rtol=1e-6, atol=1e-6)


def test_errors_name_every_problem_at_once():
  loaded = _loaded({"bn_in": 3, "block1/bn": 5, "stray": 4})
  with pytest.raises(ValueError) as error:
    keras_compat.graft_batch_norms(loaded, _init(), names={"ghost": "x"})
  message = str(error.value)
  assert "3 loaded, 3 places" in message
  assert "`names` keys that were not loaded: ['ghost']" in message
  assert "no place: 'stray' (looked for 'stray')" in message
  assert "places that got no batch norm: ['block2/bn']" in message
  assert "'block1/bn' -> 'block1/bn': params {'beta': (5,), 'gamma': (5,)} from the file" in message


def test_two_layers_on_one_place_and_center_false_are_refused():
  loaded = _loaded({"a": 3, "b": 3})
  with pytest.raises(ValueError, match=r"more than one batch norm: \['bn_in'\]"):
    keras_compat.graft_batch_norms(
      loaded, _init(), names={"a": "bn_in", "b": "bn_in"}, default_path=str
    )
  loaded = _loaded({"bn_in": 3, "block1/bn": 4, "block2/bn": 2})
  del loaded["bn_in"][1]["params"]["beta"]  # a center=False layer of the file
  with pytest.raises(ValueError, match=r"'bn_in' -> 'bn_in': params \{'gamma': \(3,\)\} from"):
    keras_compat.graft_batch_norms(loaded, _init())


def test_target_must_be_variables_or_nnx():
  with pytest.raises(TypeError, match="`target` must be linen variables"):
    keras_compat.graft_batch_norms({}, Net())


class NnxNet(nnx.Module):
  def __init__(self, momentum=0.9):
    bn = lambda n: kbn_jax.nnx.BatchNormalization(  # noqa: E731
      n, axis=1, momentum=momentum, epsilon=1e-5, semantics="torch", rngs=nnx.Rngs(0)
    )
    self.bn1 = bn(3)
    self.layer1 = nnx.List([nnx.Dict(bn1=bn(4)), nnx.Dict(bn1=bn(4))])


def _torch_state():
  rng = np.random.default_rng(2)
  state = {}
  for name, size in (("bn1", 3), ("layer1.0.bn1", 4), ("layer1.1.bn1", 4)):
    state[f"{name}.weight"] = rng.uniform(0.5, 2, size).astype(np.float32)
    state[f"{name}.bias"] = rng.normal(size=size).astype(np.float32)
    state[f"{name}.running_mean"] = rng.normal(size=size).astype(np.float32)
    state[f"{name}.running_var"] = rng.uniform(0.5, 2, size).astype(np.float32)
    state[f"{name}.num_batches_tracked"] = np.array(7 + size)
  return state


def test_nnx_graft_by_torch_names_sets_every_value():
  state = _torch_state()
  loaded = torch_compat.load_batch_norms(state, momentum=0.1, eps=1e-5)
  model = torch_compat.graft_batch_norms(loaded, NnxNet())
  np.testing.assert_array_equal(
    model.layer1[1]["bn1"].moving_mean.get_value(), state["layer1.1.bn1.running_mean"]
  )
  np.testing.assert_array_equal(model.bn1.gamma.get_value(), state["bn1.weight"])
  assert int(model.layer1[0]["bn1"].num_batches_tracked.get_value()) == 11


def test_nnx_graft_refuses_other_settings():
  loaded = torch_compat.load_batch_norms(_torch_state(), momentum=0.01, eps=1e-3)
  with pytest.raises(ValueError, match=r"'bn1' -> 'bn1': momentum 0\.99 \(file\) vs 0\.9, epsilon"):
    torch_compat.graft_batch_norms(loaded, NnxNet())


def test_loaded_modules_inside_a_compact_model():
  """The documented recipe: ``module.clone(parent=self, name=...)`` inside ``@nn.compact``."""
  loaded = _loaded({"bn_in": 3})
  module, values = loaded["bn_in"]

  class Wrapper(nn.Module):
    @nn.compact
    def __call__(self, x, training=False):
      return module.clone(parent=self, name="bn_in")(x, training)

  variables = {
    "params": {"bn_in": values["params"]},
    "batch_stats": {"bn_in": values["batch_stats"]},
  }
  expected = module.apply(values, X)
  np.testing.assert_array_equal(Wrapper().apply(variables, X), expected)
