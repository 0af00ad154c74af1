"""Keras config and weight import/export (`kbn_jax.keras_compat`) against real tf_keras fixtures.

Expected values come from `tests/oracles/keras_models/fixtures` (written by `generate.py` from
tf_keras
2.21, see its README); nothing here needs TensorFlow.
"""

from __future__ import annotations

import copy
import sys

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

import kbn_jax
from kbn_jax import _keras_config, _variables, keras_compat, training
from kbn_jax._config import canonicalize_axis
from tests.oracles import keras_models

# These fixtures were written by Keras's V1 class, which V1 reading is right for; a frozen V1
# config cannot say so, hence the warning (tested in tests/test_load_batch_norms.py).
pytestmark = pytest.mark.filterwarnings("ignore:This Keras config has trainable=False")

CONFIG_CASES = [case["name"] for case in keras_models.cases.CONFIG_CASES]
EXPORT_CASES = [case["name"] for case in keras_models.cases.EXPORT_CASES]
FORMATS = (
  "config_unbuilt",
  "config_built",
  "layer_serialized",
  "layer_legacy",
  "keras_2_12",
  "config_tf1_unbuilt",
  "config_tf1_built",
)


@pytest.fixture(scope="module")
def configs():
  return keras_models.load("configs")


@pytest.fixture(scope="module")
def exported():
  return keras_models.load("exported")


def _strip_new_keys(value):
  """Keras 2.6-2.12's legacy format: Keras >= 2.13's serialized objects minus the new keys."""
  if isinstance(value, dict):
    return {
      k: _strip_new_keys(v)
      for k, v in value.items()
      if k not in ("module", "registered_name", "build_config")
    }
  return value


def _config(record, fmt):
  if fmt == "keras_2_12":
    return _strip_new_keys(record["config_built"])
  return copy.deepcopy(record[fmt])


def _tolerance(dtype):
  return (
    {"rtol": 1e-3, "atol": 1e-3} if np.dtype(dtype).itemsize == 2 else {"rtol": 1e-5, "atol": 1e-5}
  )


def _summary(module, rank):
  """The Keras-visible configuration of `module`, with `axis` resolved for inputs of `rank`."""
  fields = {f: getattr(module, f) for f in _keras_config._LAYER_ARGS if f not in ("axis", "fused")}
  axes = _variables.normalize_axes(canonicalize_axis(module.axis), rank)
  return fields, tuple(sorted(axes)), module.fused in (None, True), jnp.dtype(module.param_dtype)


def _jit_apply(module):
  """``module.apply`` under jit (much faster than op-by-op here); `training` is static."""
  apply = jax.jit(module.apply, static_argnames=("training", "mutable"))

  def call(variables, x, training=False, mutable=False):
    return apply(variables, x, training=training, mutable=tuple(mutable) if mutable else False)

  return call


def _run_keras_case(module, record, arrays, prefix):
  """Loads Keras's initial weights into `module`, replays one training and one inference call."""
  shape = record["case"]["input_shape"]
  w0 = keras_models.weights(arrays, f"{prefix}/w0_")
  variables = keras_compat.variables_from_keras(module, w0, shape)
  apply = _jit_apply(module)
  y, updates = apply(
    variables, arrays[f"{prefix}/x_train"], training=True, mutable=["batch_stats", "losses"]
  )
  variables = {**variables, "batch_stats": updates["batch_stats"]}
  w1 = keras_compat.keras_weights_from_variables(module, variables, shape)
  y_infer = apply(variables, arrays[f"{prefix}/x_infer"])
  return y, w1, y_infer, updates.get("losses", {})


# ---------------------------------------------------------------------------------------------
# Config import: behaviour equals the Keras layer the config came from
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIG_CASES)
def test_config_import_reproduces_keras_layer(configs, name):
  record, arrays = configs[0]["cases"][name], configs[1]
  module = kbn_jax.BatchNormalization.from_keras_config(record["config_built"])
  y, w1, y_infer, losses = _run_keras_case(module, record, arrays, name)
  tol = _tolerance(arrays[f"{name}/y_train"].dtype)
  assert y.dtype == arrays[f"{name}/y_train"].dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), arrays[f"{name}/y_train"], **tol)
  for i, w in enumerate(w1):
    np.testing.assert_allclose(w, arrays[f"{name}/w1_{i}"], rtol=1e-6, atol=1e-6)
    assert w.shape == arrays[f"{name}/w1_{i}"].shape
  np.testing.assert_allclose(np.asarray(y_infer, np.float32), arrays[f"{name}/y_infer"], **tol)
  # Keras's layer.losses lists gamma's penalty, then beta's.
  sown = [
    training.regularization_loss(losses[n])
    for n in ("gamma_regularizer", "beta_regularizer")
    if n in losses
  ]
  np.testing.assert_allclose(np.asarray(sown), np.asarray(record["losses"]), rtol=1e-6)


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_every_config_format_gives_the_same_layer(configs, name):
  record = configs[0]["cases"][name]
  rank = len(record["case"]["input_shape"])
  expected = _summary(keras_compat.from_keras_config(record["config_built"]), rank)
  for fmt in FORMATS:
    if record.get(fmt) is None and fmt != "keras_2_12":
      continue  # no TF1 graph-mode config for mixed precision
    module = keras_compat.from_keras_config(_config(record, fmt))
    assert _summary(module, rank) == expected, fmt
    hash(module)  # serialized objects are stored frozen: the Module stays hashable


def test_tf1_config_without_dtype_promotes_like_flax(configs):
  record = configs[0]["cases"]["default"]
  assert record["config_tf1_unbuilt"]["dtype"] is None
  assert keras_compat.from_keras_config(record["config_tf1_unbuilt"]).dtype is None
  assert keras_compat.from_keras_config(record["config_built"]).dtype == jnp.float32


def test_config_attributes(configs):
  cases = configs[0]["cases"]
  mixed = keras_compat.from_keras_config(cases["mixed_float16"]["config_built"])
  assert (mixed.dtype, mixed.param_dtype) == (jnp.float16, jnp.float32)
  assert keras_compat.from_keras_config(cases["frozen"]["config_built"]).trainable is False
  reg = keras_compat.from_keras_config(cases["regularized"]["config_built"])
  assert reg.gamma_regularizer == FrozenDict(
    {"class_name": "L2", "config": {"l2": 0.009999999776482582}}
  )
  assert reg.name is None
  named = keras_compat.from_keras_config(cases["regularized"]["config_built"], keep_name=True)
  assert named.name == cases["regularized"]["config_built"]["name"]
  renorm = keras_compat.from_keras_config(cases["renorm"]["config_built"])
  assert renorm.renorm_clipping == FrozenDict({"rmax": 1.5, "rmin": 0.5, "dmax": 0.5})


def test_overrides():
  module = keras_compat.from_keras_config({"axis": -1}, axis_name="batch", dtype=None)
  assert (module.axis_name, module.dtype) == ("batch", None)
  with pytest.raises(TypeError, match=r"Unknown overrides \['nope'\]"):
    keras_compat.from_keras_config({}, nope=1)


# ---------------------------------------------------------------------------------------------
# The ghost-batch shifted axis (spec §6.1)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  ("config", "kwargs", "expected"),
  [
    ({"axis": -1, "virtual_batch_size": 2}, {}, -1),  # an int: saved before build
    ({"axis": [-1], "virtual_batch_size": 2}, {}, (-1,)),  # negative: before build
    ({"axis": (2,), "virtual_batch_size": 2}, {}, (1,)),  # tuples are lists (Flax freezes)
    ({"axis": [1, 3], "virtual_batch_size": 2}, {}, (1, 3)),  # 1 is never a shifted entry
    ({"axis": [2], "virtual_batch_size": 2}, {}, (1,)),  # all entries >= 2: taken as built
    ({"axis": [2], "virtual_batch_size": 2}, {"axis_saved_after_build": False}, (2,)),
    ({"axis": [3], "virtual_batch_size": 2, "batch_input_shape": [None, 2, 3]}, {}, (2,)),
    ({"axis": [2, 3], "virtual_batch_size": 2}, {}, (1, 2)),
    ({"axis": [2]}, {}, (2,)),  # no ghost batch: never shifted
  ],
)
def test_ghost_batch_axis_quirk(config, kwargs, expected):
  assert keras_compat.from_keras_config(config, **kwargs).axis == expected


def test_ghost_batch_axis_from_build_config(configs):
  record = configs[0]["cases"]["ghost_conv"]  # axis=1 on rank 4, saved as [2]
  serialized = record["layer_serialized"]
  assert serialized["config"]["axis"] == [2] and "build_config" in serialized
  assert keras_compat.from_keras_config(serialized).axis == (1,)
  unbuilt = keras_compat.from_keras_config(record["config_unbuilt"])
  assert unbuilt.axis == 1


def test_ghost_batch_axis_errors():
  with pytest.raises(ValueError, match=r"cannot be Keras's post-build \(shifted\)"):
    keras_compat.from_keras_config(
      {"axis": [1], "virtual_batch_size": 2}, axis_saved_after_build=True
    )
  with pytest.raises(ValueError, match="needs a `virtual_batch_size`"):
    keras_compat.from_keras_config({"axis": [2]}, axis_saved_after_build=True)


# ---------------------------------------------------------------------------------------------
# dtypes and serialized objects
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  ("dtype", "expected"),
  [
    (None, (None, jnp.float32)),
    ("float32", (jnp.float32, jnp.float32)),
    ("float16", (jnp.float16, jnp.float32)),
    ("bfloat16", (jnp.bfloat16, jnp.float32)),
    ("mixed_float16", (jnp.float16, jnp.float32)),
    ("mixed_bfloat16", (jnp.bfloat16, jnp.float32)),
    ("float64", (jnp.float64, jnp.float64)),
    ({"class_name": "Policy", "config": {"name": "mixed_float16"}}, (jnp.float16, jnp.float32)),
    (
      {
        "module": "keras.mixed_precision",
        "class_name": "Policy",
        "config": {"name": "mixed_bfloat16"},
        "registered_name": None,
      },
      (jnp.bfloat16, jnp.float32),
    ),
    ({"class_name": "Policy", "config": {"name": "_infer"}}, (None, jnp.float32)),
  ],
)
def test_dtype_from_keras(dtype, expected):
  module = keras_compat.from_keras_config({"dtype": dtype})
  assert (module.dtype, module.param_dtype) == expected


@pytest.mark.parametrize(
  "dtype", ["int32", "mixed_float32", {"class_name": "Policy", "config": {}}]
)
def test_dtype_from_keras_rejects(dtype):
  with pytest.raises(ValueError, match="Keras `dtype`=.* is not supported"):
    keras_compat.from_keras_config({"dtype": dtype})


def test_tf1_initializer_configs_are_canonicalized():
  module = keras_compat.from_keras_config(
    {
      "gamma_initializer": {
        "class_name": "VarianceScaling",
        "config": {"scale": 1.0, "mode": "fan_in", "distribution": "normal", "dtype": "float32"},
      },
      "beta_initializer": {
        "class_name": "RandomUniform",
        "config": {"minval": 0.0, "maxval": None, "seed": None, "dtype": "float32"},
      },
      "moving_variance_initializer": {
        "class_name": "Constant",
        "config": {"value": 2.0, "dtype": "float32", "verify_shape": False},
      },
    }
  )
  gamma = module.gamma_initializer["config"]
  assert gamma["distribution"] == "truncated_normal" and "dtype" not in gamma
  assert module.beta_initializer["config"]["maxval"] == 1.0
  # TF1's (and Keras's) "normal" is a truncated normal: no draw beyond 2 stddev.
  x = jnp.zeros((2, 4000), jnp.float32)
  variables = jax.jit(module.init)(jax.random.key(0), x)
  limit = 2 * np.sqrt(1.0 / 4000) / 0.87962566103423978
  assert np.max(np.abs(variables["params"]["gamma"])) <= limit
  beta = np.asarray(variables["params"]["beta"])
  assert beta.min() >= 0.0 and beta.max() <= 1.0 and beta.max() > 0.9
  np.testing.assert_array_equal(variables["batch_stats"]["moving_variance"], 2.0)


# ---------------------------------------------------------------------------------------------
# Config export: Keras accepted it (the fixture), and the rebuilt Keras layer behaves like ours
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXPORT_CASES)
def test_exported_config_is_what_keras_accepted(exported, name):
  record = exported[0]["cases"][name]
  module = kbn_jax.BatchNormalization(**record["case"]["kwargs"])
  # The fixture holds the config tf_keras's V1 from_config accepted; regenerate it (generate.py)
  # whenever to_keras_config changes.
  assert module.to_keras_config() == record["exported"]
  assert record["keras_trainable"] == module.trainable


@pytest.mark.parametrize("name", EXPORT_CASES)
def test_keras_layer_from_exported_config_behaves_like_module(exported, name):
  record, arrays = exported[0]["cases"][name], exported[1]
  module = kbn_jax.BatchNormalization(**record["case"]["kwargs"])
  shape = record["case"]["input_shape"]
  # Deterministic initializers: the Keras layer built from our config starts where we start.
  ours = module.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))
  theirs = keras_models.weights(arrays, f"{name}/w0_")
  for a, b in zip(
    keras_compat.keras_weights_from_variables(module, ours, shape), theirs, strict=True
  ):
    np.testing.assert_array_equal(a, b)
  y, w1, y_infer, _ = _run_keras_case(module, record, arrays, name)
  tol = _tolerance(arrays[f"{name}/y_train"].dtype)
  np.testing.assert_allclose(np.asarray(y, np.float32), arrays[f"{name}/y_train"], **tol)
  for i, w in enumerate(w1):
    np.testing.assert_allclose(w, arrays[f"{name}/w1_{i}"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y_infer, np.float32), arrays[f"{name}/y_infer"], **tol)
  # And Keras's own config of that layer (after build: shifted ghost axes) imports back.
  # Keras's own config of that layer imports back (after build: the shifted ghost axis); its
  # get_config() never writes `fused`, so fused=False comes back as fused (as in Keras).
  again = keras_compat.from_keras_config(record["keras_config_built"])
  y_again, *_ = _run_keras_case(again, record, arrays, name)
  np.testing.assert_allclose(y_again, y, rtol=1e-6, atol=1e-6)
  rank = len(shape)
  for fmt in ("keras_config_unbuilt", "layer_serialized"):
    assert _summary(keras_compat.from_keras_config(record[fmt]), rank) == _summary(again, rank)


def test_to_keras_config_writes_ghost_axis_as_int_and_drops_jax_settings():
  config = kbn_jax.BatchNormalization(
    axis=[2], virtual_batch_size=4, axis_name="batch", momentum=1
  ).to_keras_config()
  assert config["axis"] == 2 and config["virtual_batch_size"] == 4
  assert "axis_name" not in config and config["momentum"] == 1.0
  assert "renorm" not in config and "fused" not in config


def test_to_keras_config_round_trips_through_from_keras_config():
  module = kbn_jax.BatchNormalization(
    axis=(1, 3),
    renorm=True,
    renorm_clipping={"rmax": 2.0},
    gamma_constraint={"class_name": "MaxNorm", "config": {"max_value": 2.0, "axis": [1, 3]}},
    dtype=jnp.bfloat16,
  )
  back = keras_compat.from_keras_config(module.to_keras_config())
  assert back.axis == (1, 3) and back.renorm_clipping == {"rmax": 2.0}
  assert back.gamma_constraint["config"]["axis"] == (1, 3)
  assert (back.dtype, back.param_dtype) == (jnp.bfloat16, jnp.float32)


def test_to_keras_config_rejects_what_keras_cannot_hold():
  with pytest.raises(ValueError, match="`gamma_regularizer`=.* is a callable"):
    kbn_jax.BatchNormalization(gamma_regularizer=lambda w: jnp.sum(w)).to_keras_config()
  with pytest.raises(ValueError, match="has no Keras equivalent"):
    kbn_jax.BatchNormalization(param_dtype=jnp.bfloat16).to_keras_config()
  with pytest.warns(UserWarning, match="`adjustment` is not serializable"):
    config = kbn_jax.BatchNormalization(adjustment=lambda s: (1.0, 0.0)).to_keras_config()
  assert "adjustment" not in config


def test_from_keras_config_errors():
  with pytest.raises(TypeError, match=r"Unknown keys \['bogus'\]"):
    keras_compat.from_keras_config({"axis": -1, "bogus": 1})
  with pytest.raises(ValueError, match="not a Keras BatchNormalization"):
    keras_compat.from_keras_config({"class_name": "Dense", "config": {}})
  with pytest.raises(ValueError, match="synchronized=True"):
    keras_compat.from_keras_config({"synchronized": True})
  assert keras_compat.from_keras_config({"synchronized": True}, axis_name="d").axis_name == "d"
  assert keras_compat.from_keras_config({"synchronized": False}).axis_name is None
  with pytest.raises(ValueError, match="`adjustment` cannot come from a config"):
    keras_compat.from_keras_config({"adjustment": "something"})
  with pytest.raises(TypeError, match="must be a Keras config dict"):
    keras_compat.from_keras_config([("axis", -1)])
  with pytest.raises(ValueError, match="Unknown regularizer for `gamma_regularizer`"):
    keras_compat.from_keras_config({"gamma_regularizer": {"class_name": "Orthogonal"}})


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIG_CASES)
def test_weights_round_trip_and_match_init_structure(configs, name):
  record, arrays = configs[0]["cases"][name], configs[1]
  module = keras_compat.from_keras_config(record["config_built"])
  shape = record["case"]["input_shape"]
  w0 = keras_models.weights(arrays, f"{name}/w0_")
  variables = keras_compat.variables_from_keras(module, w0, shape)
  init = jax.eval_shape(
    module.init, jax.random.key(0), jnp.zeros(shape, arrays[f"{name}/x_train"].dtype)
  )
  assert jax.tree.map(lambda v: (v.shape, v.dtype), variables) == jax.tree.map(
    lambda v: (v.shape, v.dtype), init
  )
  back = keras_compat.keras_weights_from_variables(module, variables, shape)
  assert [w.shape for w in back] == [w.shape for w in w0]
  for a, b in zip(back, w0, strict=True):
    np.testing.assert_array_equal(a, b)
  by_name = dict(zip(record["weight_names"], w0, strict=True))
  variables_by_name = keras_compat.variables_from_keras(module, by_name, shape)
  assert jax.tree.all(jax.tree.map(np.array_equal, variables_by_name, variables))


@pytest.mark.parametrize(
  ("kwargs", "shape", "expected"),
  [
    ({}, (None, 5), (5,)),
    ({"axis": 1}, (2, 3, 4, 4), (3,)),
    ({"axis": [1, 3]}, (None, 3, 2, 5), (1, 3, 1, 5)),
    ({"axis": [-1, 1]}, (None, 4, 3), (1, 4, 3)),
    ({"virtual_batch_size": 2}, (None, 3), (1, 1, 3)),
    ({"virtual_batch_size": 2, "axis": 1}, (8, 3, 5, 5), (1, 1, 3, 1, 1)),
    ({"virtual_batch_size": 2, "axis": [1, 4]}, (8, 3, 2, 2, 4), (1, 1, 3, 1, 1, 4)),
  ],
)
def test_keras_param_shape_matches_spec(kwargs, shape, expected):
  # Shapes of spec §2, step 6.
  assert keras_compat.keras_param_shape(kbn_jax.BatchNormalization(**kwargs), shape) == expected


def test_feature_shaped_weights_are_accepted():
  module = kbn_jax.BatchNormalization(axis=[1, 3], center=False)
  weights = [np.full((3, 5), 2.0), np.zeros((3, 5)), np.ones((1, 3, 1, 5))]
  variables = keras_compat.variables_from_keras(module, weights, (None, 3, 2, 5))
  assert variables["params"]["gamma"].shape == (3, 5)
  assert variables["params"]["gamma"].dtype == jnp.float32  # float64 arrays are cast


def test_no_params_collection_without_gamma_and_beta():
  module = kbn_jax.BatchNormalization(center=False, scale=False)
  variables = keras_compat.variables_from_keras(module, [np.zeros(2), np.ones(2)], (None, 2))
  assert set(variables) == {"batch_stats"}
  init = module.init(jax.random.key(0), jnp.zeros((1, 2)))
  assert set(init) == set(variables)


def test_weight_errors():
  module = kbn_jax.BatchNormalization()
  with pytest.raises(ValueError, match=r"has 3 arrays but this layer has 4: \['gamma'"):
    keras_compat.variables_from_keras(module, [np.ones(3)] * 3, (None, 3))
  with pytest.raises(ValueError, match=r"`gamma` has shape \(4,\).* Keras's shape is \(3,\)"):
    keras_compat.variables_from_keras(module, [np.ones(4)] * 4, (None, 3))
  with pytest.raises(ValueError, match=r"missing \['moving_variance'\], unexpected \['x'\]"):
    keras_compat.variables_from_keras(
      module,
      {"gamma": 1, "beta": 1, "moving_mean": 1, "x": 1},
      (None, 3),
    )
  with pytest.raises(ValueError, match="Input has undefined `axis` dimension"):
    keras_compat.variables_from_keras(module, [np.ones(3)] * 4, (4, None))
  ghost = kbn_jax.BatchNormalization(virtual_batch_size=2)
  variables = ghost.init(jax.random.key(0), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="pass `input_shape`"):
    keras_compat.keras_weights_from_variables(ghost, variables)
  with pytest.raises(ValueError, match="not the whole model's"):
    keras_compat.keras_weights_from_variables(module, {"params": {}})


# ---------------------------------------------------------------------------------------------
# HDF5 files and whole models
# ---------------------------------------------------------------------------------------------
class _ConvNet(nn.Module):
  bn_configs: dict

  @nn.compact
  def __call__(self, x, training=False):
    def bn(name):
      return keras_compat.from_keras_config(self.bn_configs[name], keep_name=True)

    x = nn.Conv(4, (3, 3), padding="SAME", name="conv1")(x)
    x = nn.relu(bn("bn1")(x, training))
    x = nn.Conv(5, (3, 3), strides=2, padding="SAME", name="conv2")(x)
    x = nn.relu(bn("bn2")(x, training))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(6, name="dense1")(x)
    x = nn.relu(bn("bn3")(x, training))
    return nn.Dense(3, name="logits")(x)


class _RenormMLP(nn.Module):
  bn_configs: dict

  @nn.compact
  def __call__(self, x, training=False):
    x = nn.Dense(8, name="dense")(x)
    x = keras_compat.from_keras_config(self.bn_configs["bn"], keep_name=True)(x, training)
    return nn.Dense(2, name="out")(nn.relu(x))


class _MultiAxis(nn.Module):
  bn_configs: dict

  @nn.compact
  def __call__(self, x, training=False):
    x = keras_compat.from_keras_config(self.bn_configs["bn_multi"], keep_name=True)(x, training)
    x = nn.Conv(4, (1, 1), padding="VALID", name="conv")(x)
    x = keras_compat.from_keras_config(self.bn_configs["bn_ghost"], keep_name=True)(x, training)
    return nn.Dense(2, name="out")(x.reshape(x.shape[0], -1))


MODELS = {"convnet": _ConvNet, "renorm_mlp": _RenormMLP, "multi_axis": _MultiAxis}
# The input shape each BN layer sees (batch dimension None).
BN_INPUTS = {
  "convnet": {"bn1": (None, 6, 6, 4), "bn2": (None, 3, 3, 5), "bn3": (None, 6)},
  "renorm_mlp": {"bn": (None, 8)},
  "multi_axis": {"bn_multi": (None, 4, 5, 3), "bn_ghost": (None, 4, 5, 4)},
}


def _model_from_h5(name, path, configs_from):
  """The Flax twin of a Keras model, its variables read from the Keras HDF5 file."""
  record, _ = keras_models.load(name)
  bn_inputs = BN_INPUTS[name]
  if configs_from == "h5":
    bn_configs = {bn: keras_compat.load_layer_config(path, bn) for bn in bn_inputs}
  else:
    bn_configs = {bn: record["layers"][bn]["config"] for bn in bn_inputs}
  params, batch_stats = {}, {}
  for layer in record["layers"]:
    weights = keras_compat.load_layer_weights(path, layer)
    if layer in bn_inputs:
      module = keras_compat.from_keras_config(bn_configs[layer])
      variables = keras_compat.variables_from_keras(module, weights, bn_inputs[layer])
      params[layer] = variables.get("params", {})
      batch_stats[layer] = variables["batch_stats"]
    else:
      params[layer] = {"kernel": jnp.asarray(weights[0]), "bias": jnp.asarray(weights[1])}
  return MODELS[name](bn_configs), {"params": params, "batch_stats": batch_stats}


@pytest.mark.parametrize(
  ("name", "file", "configs_from"),
  [
    ("convnet", "convnet.h5", "h5"),
    ("convnet", "convnet_weights.h5", "json"),
    ("renorm_mlp", "renorm_mlp.h5", "h5"),
    ("multi_axis", "multi_axis.h5", "h5"),
  ],
)
def test_flax_twin_reproduces_keras_model(name, file, configs_from):
  record, arrays = keras_models.load(name)
  model, variables = _model_from_h5(name, keras_models.FIXTURES / file, configs_from)
  apply = _jit_apply(model)
  y = apply(variables, arrays["x_infer"])
  np.testing.assert_allclose(y, arrays["y_infer"], rtol=1e-5, atol=1e-5)
  # One training call: batch statistics (fused, renorm, ghost) and the updated moving statistics.
  y, updates = apply(variables, arrays["x_infer"], training=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, arrays["y_train"], rtol=1e-5, atol=1e-5)
  for bn, shape in BN_INPUTS[name].items():
    module = keras_compat.from_keras_config(record["layers"][bn]["config"])
    layer_vars = {"params": variables["params"][bn], "batch_stats": updates["batch_stats"][bn]}
    after = keras_compat.keras_weights_from_variables(module, layer_vars, shape)
    for i, w in enumerate(after):
      np.testing.assert_allclose(w, arrays[f"{bn}/after_train/{i}"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("file", ["convnet.h5", "convnet_weights.h5"])
def test_h5_weights_equal_get_weights(file):
  record, arrays = keras_models.load("convnet")
  for layer in record["layers"]:
    weights = keras_compat.load_layer_weights(keras_models.FIXTURES / file, layer)
    expected = keras_models.weights(arrays, f"{layer}/")
    assert len(weights) == len(expected)
    for a, b in zip(weights, expected, strict=True):
      np.testing.assert_array_equal(a, b)


def test_h5_renorm_weights_come_in_keras_order():
  weights = keras_compat.load_layer_weights(keras_models.FIXTURES / "renorm_mlp.h5", "bn")
  _, arrays = keras_models.load("renorm_mlp")
  assert len(weights) == 7
  for a, b in zip(weights, keras_models.weights(arrays, "bn/"), strict=True):
    np.testing.assert_array_equal(a, b)


def test_h5_frozen_layer_order_and_nested_layers(tmp_path):
  path = tmp_path / "nested.h5"
  values = {n: np.full(3, i, np.float32) for i, n in enumerate(keras_compat.KERAS_WEIGHT_ORDER[:4])}
  # A frozen Keras layer lists non-trainable weights first; a nested model prefixes names.
  names = [
    "inner/bn/moving_mean:0",
    "inner/bn/moving_variance:0",
    "inner/bn/gamma:0",
    "inner/bn/beta:0",
  ]
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [b"inner"]
    group = f.create_group("inner")
    group.attrs["weight_names"] = [n.encode() for n in names]
    for n in names:
      group[n] = values[n.split("/")[-1][:-2]]
  weights = keras_compat.load_layer_weights(path, "bn")
  for i, w in enumerate(weights):
    np.testing.assert_array_equal(w, np.full(3, i))
  with pytest.raises(KeyError, match=r"no layer named 'nope'.*\['inner'\]"):
    keras_compat.load_layer_weights(path, "nope")
  with pytest.raises(KeyError, match="holds no model config"):
    keras_compat.load_layer_config(path, "bn")


def test_h5_new_weights_format_is_explained(tmp_path):
  path = tmp_path / "model.weights.h5"
  with h5py.File(path, "w") as f:
    f.create_group("layers/batch_normalization/vars")
  # The newer layout names groups after classes: names need the model config.
  with pytest.raises(KeyError, match=r"holds no model config, so layer names need config_path="):
    keras_compat.load_layer_weights(path, "batch_normalization")


def test_h5_config_lookup():
  config = keras_compat.load_layer_config(keras_models.FIXTURES / "multi_axis.h5", "bn_ghost")
  assert config["class_name"] == "BatchNormalization"
  assert config["config"]["axis"] == [4]  # Keras's shifted ghost-batch axis, saved after build
  assert keras_compat.from_keras_config(config).axis == (3,)
  with pytest.raises(KeyError, match=r"no layer named 'nope'\. BatchNormalization layers"):
    keras_compat.load_layer_config(keras_models.FIXTURES / "multi_axis.h5", "nope")


def test_h5_without_h5py_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "h5py", None)
  with pytest.raises(ImportError, match=r"needs the optional dependency h5py: `pip install h5py`"):
    keras_compat.load_layer_weights(keras_models.FIXTURES / "convnet.h5", "bn1")
