"""Case tables shared by the oracle generator (`generate.py`) and the tests; stdlib only.

`CONFIG_CASES` are Keras V1 ``BatchNormalization`` constructor kwargs (JSON). For each, the
generator records the layer's ``get_config()`` in every format Keras writes, and the layer's
behaviour (weights, one training call, one inference call, its regularization losses).

`EXPORT_CASES` are ``kbn_jax.BatchNormalization`` kwargs whose ``to_keras_config()`` the generator
feeds back to ``tf_keras``'s V1 ``BatchNormalization.from_config``.

`CONSTRAINT_CASES` are Keras constraint configs applied to weights of Keras parameter shapes.
"""

from __future__ import annotations

_CONSTANT = "Constant"

CONFIG_CASES = [
  {"name": "default", "kwargs": {}, "input_shape": [6, 4]},
  {
    "name": "regularized",
    "kwargs": {
      "gamma_initializer": {"class_name": _CONSTANT, "config": {"value": 1.5}},
      "beta_initializer": {"class_name": _CONSTANT, "config": {"value": -0.25}},
      "gamma_regularizer": "l2",
      "beta_regularizer": {"class_name": "L1L2", "config": {"l1": 0.001, "l2": 0.002}},
      "gamma_constraint": "non_neg",
      "beta_constraint": {"class_name": "MaxNorm", "config": {"max_value": 1.5, "axis": 0}},
    },
    "input_shape": [6, 4],
  },
  {
    "name": "initializers",
    "kwargs": {
      "center": False,
      "momentum": 0.9,
      "epsilon": 0.01,
      "moving_mean_initializer": {"class_name": _CONSTANT, "config": {"value": 0.3}},
      "moving_variance_initializer": {"class_name": _CONSTANT, "config": {"value": 2.0}},
      "gamma_regularizer": {"class_name": "L1", "config": {"l1": 0.05}},
    },
    "input_shape": [5, 3],
  },
  {
    "name": "renorm",
    "kwargs": {
      "renorm": True,
      "renorm_clipping": {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5},
      "renorm_momentum": 0.8,
      "momentum": 0.9,
    },
    "input_shape": [8, 3],
  },
  {"name": "multi_axis", "kwargs": {"axis": [1, 3], "scale": False}, "input_shape": [4, 3, 2, 5]},
  {"name": "fused_conv", "kwargs": {"momentum": 0.5}, "input_shape": [2, 3, 3, 4]},
  {"name": "ghost", "kwargs": {"virtual_batch_size": 2, "momentum": 0.5}, "input_shape": [8, 3]},
  {
    "name": "ghost_conv",
    "kwargs": {"virtual_batch_size": 2, "axis": 1, "momentum": 0.5},
    "input_shape": [4, 3, 2, 2],
  },
  {
    "name": "ghost_multi",
    "kwargs": {"virtual_batch_size": 2, "axis": [1, 2], "momentum": 0.5},
    "input_shape": [4, 3, 2, 2],
  },
  {"name": "mixed_float16", "kwargs": {"dtype": "mixed_float16"}, "input_shape": [6, 3]},
  {"name": "frozen", "kwargs": {"trainable": False, "momentum": 0.5}, "input_shape": [6, 3]},
]

EXPORT_CASES = [
  {"name": "default", "kwargs": {}, "input_shape": [6, 4]},
  {
    "name": "everything",
    "kwargs": {
      "axis": 1,
      "momentum": 0.9,
      "epsilon": 0.01,
      "center": True,
      "scale": True,
      "gamma_initializer": {"class_name": _CONSTANT, "config": {"value": 0.5}},
      "beta_initializer": "zeros",
      "moving_variance_initializer": {"class_name": _CONSTANT, "config": {"value": 2.0}},
      "gamma_regularizer": {"class_name": "L2", "config": {"l2": 0.001}},
      "beta_regularizer": "l1",
      "gamma_constraint": {"class_name": "MinMaxNorm", "config": {"min_value": 0.5}},
      "beta_constraint": "non_neg",
      "fused": False,
      "trainable": False,
    },
    "input_shape": [2, 3, 4, 4],
  },
  {
    "name": "renorm",
    "kwargs": {"renorm": True, "renorm_clipping": {"rmax": 2.0}, "renorm_momentum": 0.5},
    "input_shape": [8, 3],
  },
  {"name": "ghost", "kwargs": {"virtual_batch_size": 2, "axis": -1}, "input_shape": [4, 2, 3]},
  {
    "name": "ghost_list",
    "kwargs": {"virtual_batch_size": 2, "axis": [2]},
    "input_shape": [4, 2, 3],
  },
  {"name": "multi_axis", "kwargs": {"axis": [-3, -1]}, "input_shape": [2, 3, 2, 5]},
  {"name": "float16", "kwargs": {"dtype": "float16"}, "input_shape": [4, 3]},
]

CONSTRAINT_CASES = [
  {"name": "non_neg", "config": {"class_name": "NonNeg", "config": {}}},
  {
    "name": "max_norm",
    "config": {"class_name": "MaxNorm", "config": {"max_value": 1.0, "axis": 0}},
  },
  {
    "name": "max_norm_axes",
    "config": {"class_name": "MaxNorm", "config": {"max_value": 1.0, "axis": [1, 3]}},
    "shapes": [[1, 3, 1, 2]],
  },
  {"name": "unit_norm", "config": {"class_name": "UnitNorm", "config": {"axis": 0}}},
  {
    "name": "min_max_norm",
    "config": {
      "class_name": "MinMaxNorm",
      "config": {"min_value": 0.5, "max_value": 1.5, "rate": 0.5, "axis": 0},
    },
  },
  {
    "name": "min_max_norm_last",
    "config": {
      "class_name": "MinMaxNorm",
      "config": {"min_value": 1.0, "max_value": 2.0, "axis": -1},
    },
  },
]
# Keras parameter shapes: one axis (C,), several axes (1, C1, 1, C2), ghost batch (1, 1, C).
CONSTRAINT_SHAPES = [[5], [1, 3, 1, 2], [1, 1, 4]]

# Keras weight files the generator writes (see generate.py for the architectures).
MODELS = ("convnet", "renorm_mlp", "multi_axis", "port_mlp")
