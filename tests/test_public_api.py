"""The public surface of every public module is pinned; the functional core has no Flax.

A public name added, renamed or removed fails `test_public_names_are_pinned` until the list below
and CHANGELOG.md say so (a removal or rename follows the deprecation policy there).
"""

import importlib
import inspect
import os
import subprocess
import sys
import typing

import pytest

import kbn_jax

EXPECTED_API = {
  "BatchNormalization",
  "diagnostics",
  "equinox",
  "flax_compat",
  "folding",
  "functional",
  "haiku",
  "keras_compat",
  "nnx",
  "torch_compat",
  "training",
}


# Module -> its public names: `__all__` where the module defines one, else the public attributes
# it defines itself (functions, classes, constants; imports excluded).
PUBLIC_NAMES = {
  "kbn_jax": EXPECTED_API,
  "kbn_jax.functional": {
    "BatchNormConfig",
    "batch_normalization",
    "init_variables",
    "keras_param_shape",
    "merge_ghost_batches",
    "moments",
    "normalize",
    "param_names",
    "regularization_penalties",
    "renorm_correction",
    "split_ghost_batches",
    "stat_names",
    "update_moving_average",
  },
  "kbn_jax.keras_compat": {
    "DEFAULT_LIMITS",
    "KERAS_WEIGHT_ORDER",
    "LayerNotFoundError",
    "Limits",
    "from_keras_config",
    "graft_batch_norms",
    "keras_param_shape",
    "keras_weights_from_variables",
    "load_batch_norms",
    "load_keras_h5_config",
    "load_keras_h5_weights",
    "load_layer_config",
    "load_layer_weights",
    "to_keras_config",
    "variables_from_keras",
  },
  "kbn_jax.torch_compat": {
    "batch_norm_prefixes",
    "from_state_dict",
    "graft_batch_norms",
    "load_batch_norms",
    "to_state_dict",
  },
  "kbn_jax.flax_compat": {"from_flax_batch_norm"},
  "kbn_jax.training": {
    "BatchNormSite",
    "constrain_params",
    "find_batch_norms",
    "freeze_non_trainable",
    "keras_constraints",
    "keras_optimizer",
    "regularization_loss",
    "regularization_penalty",
    "trainable_mask",
  },
  "kbn_jax.folding": {"fold_batch_norm", "fold_into_kernel", "inference_affine"},
  "kbn_jax.diagnostics": {"assert_finite", "has_nonfinite", "keep_finite", "nonfinite_statistics"},
  "kbn_jax.cpu": {"DEFAULT_THRESHOLD", "tune_malloc", "tune_malloc_env"},
  "kbn_jax.initializers": {"Initializer", "get", "keras_fans"},
  "kbn_jax.regularizers": {"Regularizer", "get", "l1_l2"},
  "kbn_jax.constraints": {
    "Constraint",
    "get",
    "max_norm",
    "min_max_norm",
    "non_neg",
    "radial_constraint",
    "unit_norm",
  },
  "kbn_jax.nnx": {"BatchNormalization"},
  "kbn_jax.linen": {"BatchNormalization", "HASHABLE_ARGS"},
  "kbn_jax.equinox": {"BatchNormalization"},
  "kbn_jax.haiku": {"BatchNormalization"},
}


def _public_names(module):
  """`module.__all__`, or the public attributes the module defines itself."""
  if hasattr(module, "__all__"):
    return set(module.__all__)
  return {
    name
    for name, value in vars(module).items()
    if not name.startswith("_")
    and not inspect.ismodule(value)
    and getattr(typing, name, None) is not value
    and getattr(value, "__module__", module.__name__) == module.__name__
  }


@pytest.mark.parametrize("module_name", sorted(PUBLIC_NAMES))
def test_public_names_are_pinned(module_name):
  module = importlib.import_module(module_name)
  names = _public_names(module)
  assert names == PUBLIC_NAMES[module_name], (
    f"{module_name}: added {sorted(names - PUBLIC_NAMES[module_name])}, removed "
    f"{sorted(PUBLIC_NAMES[module_name] - names)}; update PUBLIC_NAMES and CHANGELOG.md"
  )
  for name in names:
    assert getattr(module, name) is not None, f"{module_name}.{name}"


def test_layers_is_the_linen_alias():
  from kbn_jax import layers, linen  # noqa: PLC0415 (the alias module is not imported eagerly)

  assert layers.BatchNormalization is linen.BatchNormalization
  assert kbn_jax.BatchNormalization is linen.BatchNormalization


def test_all_is_the_documented_api():
  assert set(kbn_jax.__all__) == EXPECTED_API
  for name in kbn_jax.__all__:
    assert hasattr(kbn_jax, name), name
  assert isinstance(kbn_jax.__version__, str)


def test_functional_core_imports_no_flax():
  """Issue 10: raw JAX users import the whole layer without Flax or optax."""
  script = (
    "import sys, kbn_jax.functional as F, jax\n"
    "c = F.BatchNormConfig(renorm=True)\n"
    "p, s = F.init_variables(c, jax.random.key(0), (4, 3))\n"
    "F.batch_normalization(jax.numpy.ones((4, 3)), p, s, c, training=True)\n"
    "print(sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'optax', 'orbax'}))\n"
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
  )
  assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_package_attributes_load_lazily():
  script = (
    "import sys, kbn_jax\n"
    "assert 'flax' not in sys.modules\n"
    "kbn_jax.BatchNormalization\n"
    "print('flax' in sys.modules)\n"
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert result.stdout.strip() == "True", result.stdout + result.stderr
