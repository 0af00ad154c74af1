"""Keras names and configs of initializers, regularizers and constraints.

Expected values: Keras's formulas in float64 NumPy (tf_keras/initializers, regularizers.py,
constraints.py) and the constraint outputs tf_keras itself produced
(`tests/oracles/keras_models/fixtures/constraints.*`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kbn_jax import constraints, initializers, regularizers
from tests.oracles import keras_models

KEY = jax.random.key(0)


def _config_forms(class_name, config):
  """One object in every serialized form Keras writes (spec §6.1)."""
  return [
    {"class_name": class_name, "config": dict(config)},  # Keras 2.6-2.12
    {
      "module": "keras.x",
      "class_name": class_name,
      "config": dict(config),
      "registered_name": None,
    },
    {"class_name": class_name, "config": {**config, "dtype": "float32"}},  # TF1 V1 objects
  ]


# ---------------------------------------------------------------------------------------------
# Initializers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  ("identifier", "expected"),
  [
    ("zeros", 0.0),
    ("zero", 0.0),
    ("ones", 1.0),
    ("one", 1.0),
    ("Zeros", 0.0),
    *[(form, 0.5) for form in _config_forms("Constant", {"value": 0.5})],
    *[(form, 1.0) for form in _config_forms("Ones", {})],
  ],
)
def test_constant_initializers(identifier, expected):
  value = initializers.get(identifier)(KEY, (3,), jnp.float32)
  assert value.dtype == jnp.float32
  np.testing.assert_array_equal(value, np.full(3, expected, np.float32))


def test_identity_and_callables():
  np.testing.assert_array_equal(
    initializers.get("identity")(KEY, (2, 3), jnp.float32), np.eye(2, 3)
  )
  init = jax.nn.initializers.constant(3.0)
  assert initializers.get(init) is init


@pytest.mark.parametrize(
  ("shape", "fans"),
  [((7,), (7, 7)), ((3, 5), (3, 5)), ((1, 3, 1, 5), (3, 15)), ((1, 1, 1, 4), (1, 4)), ((), (1, 1))],
)
def test_keras_fans(shape, fans):
  # tf_keras initializers._compute_fans: receptive field = prod(shape[:-2]).
  assert initializers.keras_fans(shape) == fans


SHAPE = (64, 512)  # 32768 draws; Keras fans: fan_in 64, fan_out 512
FAN_IN, FAN_OUT = 64, 512


@pytest.mark.parametrize(
  ("identifier", "limit"),
  [
    ("glorot_uniform", math.sqrt(6.0 / (FAN_IN + FAN_OUT))),
    ("xavier_uniform", math.sqrt(6.0 / (FAN_IN + FAN_OUT))),
    ("he_uniform", math.sqrt(6.0 / FAN_IN)),
    ("lecun_uniform", math.sqrt(3.0 / FAN_IN)),
    ({"class_name": "RandomUniform", "config": {"minval": -0.3, "maxval": 0.3}}, 0.3),
    ("random_uniform", 0.05),
    ("uniform", 0.05),
    (
      {
        "class_name": "VarianceScaling",
        "config": {"scale": 2.0, "mode": "fan_out", "distribution": "uniform"},
      },
      math.sqrt(6.0 / FAN_OUT),
    ),
  ],
)
def test_uniform_initializers_match_keras_limits(identifier, limit):
  draws = np.asarray(initializers.get(identifier)(KEY, SHAPE, jnp.float32))
  assert draws.shape == SHAPE and np.abs(draws).max() <= limit
  assert np.abs(draws).max() > 0.99 * limit  # fills its range
  np.testing.assert_allclose(draws.std(), limit / math.sqrt(3.0), rtol=0.02)


TRUNCATED_STD = 0.87962566103423978  # std of a unit normal truncated at +-2


def _variance_scaling(variance):
  """Keras's truncated variance scaling: a normal of stddev sqrt(variance) / 0.8796 cut at 2 of
  those, whose draws have stddev sqrt(variance)."""
  return math.sqrt(variance), 2 * math.sqrt(variance) / TRUNCATED_STD


@pytest.mark.parametrize(
  ("identifier", "stddev", "bound"),
  [
    ("glorot_normal", *_variance_scaling(2.0 / (FAN_IN + FAN_OUT))),
    ("he_normal", *_variance_scaling(2.0 / FAN_IN)),
    ("lecun_normal", *_variance_scaling(1.0 / FAN_IN)),
    ("truncated_normal", 0.05 * TRUNCATED_STD, 2 * 0.05),  # not rescaled: cut at 2 * stddev
    ("random_normal", 0.05, None),
    ("normal", 0.05, None),
    (
      {
        "class_name": "VarianceScaling",
        "config": {"scale": 3.0, "mode": "fan_avg", "distribution": "untruncated_normal"},
      },
      math.sqrt(3.0 / ((FAN_IN + FAN_OUT) / 2)),
      None,
    ),
    ({"class_name": "RandomNormal", "config": {"mean": 1.0, "stddev": 0.2, "seed": 3}}, 0.2, None),
  ],
)
def test_normal_initializers_match_keras_stddev(identifier, stddev, bound):
  draws = np.asarray(initializers.get(identifier)(KEY, SHAPE, jnp.float32), np.float64)
  centered = draws - np.round(draws.mean())  # RandomNormal(mean=1.0) is centered at 1
  np.testing.assert_allclose(centered.std(), stddev, rtol=0.03)
  if bound is None:
    assert np.abs(centered).max() > 3 * stddev
  else:
    assert np.abs(centered).max() <= bound * (1 + 1e-6)


def test_orthogonal_initializer_on_full_rank_shape():
  value = np.asarray(initializers.get("orthogonal")(KEY, (4, 4), jnp.float32))
  np.testing.assert_allclose(value @ value.T, np.eye(4), atol=1e-5)


@pytest.mark.parametrize(
  ("identifier", "error", "match"),
  [
    ("glorot_magic", ValueError, r"Unknown initializer for `initializer`: 'glorot_magic'"),
    ({"class_name": "Foo"}, ValueError, r"Unknown initializer"),
    (3, TypeError, r"`initializer`=3 is not a Keras name"),
    (
      {"class_name": "Constant", "config": {"vaule": 1}},
      ValueError,
      r"unsupported keys \['vaule'\]",
    ),
    (
      {"class_name": "VarianceScaling", "config": {"mode": "fan_sum"}},
      ValueError,
      r"`mode`='fan_sum' must be",
    ),
  ],
)
def test_initializer_errors(identifier, error, match):
  with pytest.raises(error, match=match):
    initializers.get(identifier)


# ---------------------------------------------------------------------------------------------
# Regularizers
# ---------------------------------------------------------------------------------------------
W = np.array([[0.5, -2.0, 3.0], [-1.5, 0.25, 0.0]], np.float32)


def _penalty(l1, l2, w=W):
  """Keras's L1L2: l1 * sum|w| + l2 * sum(w**2), coefficients stored in float32 (no 1/2)."""
  w = w.astype(np.float64)
  return float(np.float32(l1)) * np.abs(w).sum() + float(np.float32(l2)) * np.square(w).sum()


@pytest.mark.parametrize(
  ("identifier", "l1", "l2"),
  [
    ("l1", 0.01, 0.0),
    ("l2", 0.0, 0.01),
    ("l1_l2", 0.01, 0.01),  # Keras's function l1_l2(l1=0.01, l2=0.01)
    ("L1", 0.01, 0.0),
    *[(form, 0.0, 1e-4) for form in _config_forms("L2", {"l2": 1e-4})],
    *[(form, 0.3, 0.0) for form in _config_forms("L1", {"l1": 0.3})],
    *[(form, 0.1, 0.2) for form in _config_forms("L1L2", {"l1": 0.1, "l2": 0.2})],
    ({"class_name": "L1L2", "config": {}}, 0.0, 0.0),  # the class defaults to 0, 0
    ({"class_name": "L1L2", "config": {"l2": 0.009999999776482582}}, 0.0, 0.01),
  ],
)
def test_regularizer_penalties_equal_keras(identifier, l1, l2):
  penalty = regularizers.get(identifier, argument="gamma_regularizer")
  value = penalty(jnp.asarray(W))
  assert value.dtype == jnp.float32 and value.shape == ()
  np.testing.assert_allclose(value, _penalty(l1, l2), rtol=1e-6)


def test_regularizer_none_and_callables():
  assert regularizers.get(None) is None
  fn = lambda w: jnp.sum(w)  # noqa: E731
  assert regularizers.get(fn) is fn


@pytest.mark.parametrize(
  ("identifier", "match"),
  [
    ("l3", r"Unknown regularizer for `beta_regularizer`: 'l3'"),
    ({"class_name": "OrthogonalRegularizer", "config": {}}, r"Unknown regularizer"),
    ({"class_name": "L2", "config": {"l": 0.1}}, r"unsupported keys \['l'\]"),
  ],
)
def test_regularizer_errors(identifier, match):
  with pytest.raises(ValueError, match=match):
    regularizers.get(identifier, argument="beta_regularizer")


# ---------------------------------------------------------------------------------------------
# Constraints
# ---------------------------------------------------------------------------------------------
def _keras_constraint_cases():
  record, _ = keras_models.load("constraints")
  for name, case in record["cases"].items():
    for shape in case["shapes"]:
      key = f"{name}/{'x'.join(map(str, shape))}"
      yield pytest.param(case["config"], key, id=key)


@pytest.mark.parametrize(("config", "key"), list(_keras_constraint_cases()))
def test_constraints_equal_tf_keras(config, key):
  _, arrays = keras_models.load("constraints")
  w = arrays[f"{key}/w"]
  for form in _config_forms(config["class_name"], config["config"])[:2]:
    projected = np.asarray(constraints.get(form)(jnp.asarray(w)))
    np.testing.assert_allclose(projected, arrays[f"{key}/projected"], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(
      projected, keras_models.numpy_constraint(config, w), rtol=2e-6, atol=1e-7
    )


@pytest.mark.parametrize(
  ("identifier", "config"),
  [
    ("non_neg", {"class_name": "NonNeg"}),
    ("nonneg", {"class_name": "NonNeg"}),
    ("NonNeg", {"class_name": "NonNeg"}),
    ("max_norm", {"class_name": "MaxNorm", "config": {"max_value": 2.0, "axis": 0}}),
    ("maxnorm", {"class_name": "MaxNorm", "config": {"max_value": 2.0, "axis": 0}}),
    ("unit_norm", {"class_name": "UnitNorm", "config": {"axis": 0}}),
    ("unitnorm", {"class_name": "UnitNorm", "config": {"axis": 0}}),
    (
      "min_max_norm",
      {"class_name": "MinMaxNorm", "config": {"min_value": 0.0, "max_value": 1.0, "axis": 0}},
    ),
  ],
)
def test_constraint_names_use_keras_defaults(identifier, config):
  w = np.array([-3.0, 0.5, 2.0], np.float32)  # norm 3.64: every norm constraint acts
  projected = constraints.get(identifier)(jnp.asarray(w))
  np.testing.assert_allclose(projected, keras_models.numpy_constraint(config, w), rtol=2e-6)


def test_radial_constraint_rejects_non_kernels_like_keras():
  project = constraints.get("radial_constraint")
  with pytest.raises(ValueError, match=r"applies to 4-D convolution kernels; got .* \(3,\)"):
    project(jnp.ones(3))


def test_constraint_none_callables_and_errors():
  assert constraints.get(None) is None
  fn = jnp.abs
  assert constraints.get(fn) is fn
  with pytest.raises(ValueError, match=r"Unknown constraint for `gamma_constraint`: 'positive'"):
    constraints.get("positive", argument="gamma_constraint")
  with pytest.raises(ValueError, match=r"unsupported keys \['max'\]"):
    constraints.get({"class_name": "MaxNorm", "config": {"max": 2}})
