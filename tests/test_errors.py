"""Every misuse of `BatchNormalization` fails loudly, with the exact error type and a message
that names the argument (spec §§1-2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kbn_jax
from tests import reference

BN = kbn_jax.BatchNormalization
KEY = jax.random.key(0)


def _init(layer, shape, dtype=jnp.float32):
  return layer.init(KEY, jnp.zeros(shape, dtype))


def _train(layer, variables, x, **kwargs):
  return layer.apply(variables, x, training=True, mutable=["batch_stats"], **kwargs)


def _ones(*shape):
  return jnp.ones(shape, jnp.float32)


# --------------------------------------------------------------------------------------------
# Configuration errors: raised at construction, before any input is seen.
# --------------------------------------------------------------------------------------------

_AXIS_TYPE = r"Expected an int or a list/tuple of ints for the argument 'axis'"
_UNIT = r"must be in \[0, 1\]"

CONSTRUCTION_ERRORS = [
  # axis type (Keras rejects these at construction too; docs/keras_bn_v1_spec.md §1.2).
  ("axis_float", {"axis": 1.0}, TypeError, _AXIS_TYPE + r".*1\.0 of type float"),
  ("axis_none", {"axis": None}, TypeError, _AXIS_TYPE + r".*None of type NoneType"),
  ("axis_str", {"axis": "-1"}, TypeError, _AXIS_TYPE + r".*'-1' of type str"),
  ("axis_numpy_int", {"axis": np.int64(-1)}, TypeError, _AXIS_TYPE + r".*convert NumPy"),
  ("axis_list_float", {"axis": [1, 2.0]}, TypeError, _AXIS_TYPE + r".*element 2\.0 is a float"),
  ("axis_list_numpy", {"axis": [np.int32(1)]}, TypeError, r"'axis'.*axis=\[1\]"),
  ("axis_empty_list", {"axis": []}, ValueError, r"`axis`=\[\] is empty"),
  ("axis_empty_tuple", {"axis": ()}, ValueError, r"`axis`=\[\] is empty"),
  # momentum / epsilon: Keras validates neither; we reject nonsense (a deliberate difference).
  ("momentum_negative", {"momentum": -0.1}, ValueError, r"`momentum`=-0\.1 " + _UNIT),
  ("momentum_above_one", {"momentum": 1.5}, ValueError, r"`momentum`=1\.5 " + _UNIT),
  ("momentum_nan", {"momentum": float("nan")}, ValueError, r"`momentum`=nan " + _UNIT),
  ("momentum_str", {"momentum": "0.9"}, TypeError, r"`momentum`='0\.9' must be a real number"),
  ("momentum_bool", {"momentum": True}, TypeError, r"`momentum`=True must be a real number"),
  (
    "renorm_momentum_above_one",
    {"renorm": True, "renorm_momentum": 2.0},
    ValueError,
    r"`renorm_momentum`=2\.0 " + _UNIT,
  ),
  ("epsilon_negative", {"epsilon": -1e-3}, ValueError, r"`epsilon`=-0\.001 must be >= 0"),
  ("epsilon_nan", {"epsilon": float("nan")}, ValueError, r"`epsilon`=nan must be >= 0"),
  ("epsilon_str", {"epsilon": "1e-3"}, TypeError, r"`epsilon`='1e-3' must be a real number"),
  # Flags.
  ("center_str", {"center": "yes"}, TypeError, r"`center`='yes' must be a Python bool"),
  ("scale_int", {"scale": 1}, TypeError, r"`scale`=1 must be a Python bool"),
  ("renorm_none", {"renorm": None}, TypeError, r"`renorm`=None must be a Python bool"),
  ("trainable_str", {"trainable": "no"}, TypeError, r"`trainable`='no' must be a Python bool"),
  ("fused_str", {"fused": "auto"}, TypeError, r"`fused`='auto' must be None, True or False"),
  # virtual_batch_size (Keras: build-time ValueError for <= 0; docs/keras_bn_v1_spec.md §2 step 2).
  ("vbs_zero", {"virtual_batch_size": 0}, ValueError, r"`virtual_batch_size` must be a positive"),
  ("vbs_negative", {"virtual_batch_size": -4}, ValueError, r"virtual_batch_size=-4"),
  ("vbs_float", {"virtual_batch_size": 2.0}, TypeError, r"`virtual_batch_size`=2\.0 must be"),
  ("vbs_str", {"virtual_batch_size": "2"}, TypeError, r"`virtual_batch_size`='2' must be"),
  ("vbs_bool", {"virtual_batch_size": True}, TypeError, r"`virtual_batch_size`=True must be"),
  (
    "vbs_with_adjustment",
    {"virtual_batch_size": 2, "adjustment": lambda shape: (1.0, 0.0)},
    ValueError,
    r"When using `virtual_batch_size`, adjustment cannot be specified",
  ),
  ("adjustment_not_callable", {"adjustment": (1.0, 0.0)}, TypeError, r"`adjustment`=.* callable"),
  # renorm_clipping (Keras checks the keys only; docs/keras_bn_v1_spec.md §1.4).
  (
    "clipping_unknown_key",
    {"renorm": True, "renorm_clipping": {"rmax": 3.0, "r_max": 3.0}},
    ValueError,
    r"invalid keys for `renorm_clipping` argument: \{'r_max'\}",
  ),
  (
    "clipping_not_dict",
    {"renorm": True, "renorm_clipping": [("rmax", 3.0)]},
    TypeError,
    r"`renorm_clipping`=.* must be a dict",
  ),
  (
    "clipping_value_str",
    {"renorm": True, "renorm_clipping": {"rmax": "3"}},
    TypeError,
    r"`renorm_clipping\['rmax'\]`='3' must be a real number",
  ),
  (
    "clipping_value_list",
    {"renorm": True, "renorm_clipping": {"dmax": [5.0]}},
    TypeError,
    r"`renorm_clipping\['dmax'\]`=\[5\.0\] must be a real number",
  ),
  (
    "clipping_value_bool",
    {"renorm": True, "renorm_clipping": {"rmin": True}},
    TypeError,
    r"`renorm_clipping\['rmin'\]`=True must be a real number",
  ),
  # axis_index_groups must partition 0..N-1 into equal groups.
  (
    "groups_unequal",
    {"axis_index_groups": [[0, 1], [2]]},
    ValueError,
    r"`axis_index_groups`=.* groups of equal size",
  ),
  ("groups_duplicate", {"axis_index_groups": [[0, 0]]}, ValueError, r"`axis_index_groups`="),
  ("groups_gap", {"axis_index_groups": [[0, 2]]}, ValueError, r"`axis_index_groups`="),
  ("groups_empty", {"axis_index_groups": []}, ValueError, r"`axis_index_groups`="),
  ("groups_float", {"axis_index_groups": [[0.0, 1.0]]}, ValueError, r"`axis_index_groups`="),
  (
    "groups_with_vbs",
    {"axis_index_groups": [[0, 1]], "virtual_batch_size": 2},
    ValueError,
    r"`axis_index_groups` cannot be combined with `virtual_batch_size`",
  ),
]

for _arg, _kind in (
  ("beta_initializer", "initializer"),
  ("gamma_initializer", "initializer"),
  ("moving_mean_initializer", "initializer"),
  ("moving_variance_initializer", "initializer"),
  ("beta_regularizer", "regularizer"),
  ("gamma_regularizer", "regularizer"),
  ("beta_constraint", "constraint"),
  ("gamma_constraint", "constraint"),
):
  CONSTRUCTION_ERRORS += [
    (f"{_arg}_unknown_name", {_arg: "zerros"}, ValueError, rf"Unknown {_kind} for `{_arg}`"),
    (
      f"{_arg}_unknown_class",
      {_arg: {"class_name": "NoSuchThing", "config": {}}},
      ValueError,
      rf"Unknown {_kind} for `{_arg}`",
    ),
    (
      f"{_arg}_dict_without_class",
      {_arg: {"config": {}}},
      TypeError,
      rf"`{_arg}`=.* is not a Keras name, a Keras config dict",
    ),
    (f"{_arg}_int", {_arg: 3}, TypeError, rf"`{_arg}`=3 is not a Keras name"),
  ]
CONSTRUCTION_ERRORS += [
  (
    "initializer_config_typo",
    {"gamma_initializer": {"class_name": "Constant", "config": {"vaule": 1.0}}},
    ValueError,
    r"`gamma_initializer` config has unsupported keys \['vaule'\]",
  ),
  (
    "regularizer_config_typo",
    {"gamma_regularizer": {"class_name": "L2", "config": {"l": 0.1}}},
    ValueError,
    r"`gamma_regularizer` config has unsupported keys \['l'\]",
  ),
  (
    "constraint_config_typo",
    {"beta_constraint": {"class_name": "MaxNorm", "config": {"max": 2.0}}},
    ValueError,
    r"`beta_constraint` config has unsupported keys \['max'\]",
  ),
]


@pytest.mark.parametrize(
  "kwargs, error, match",
  [pytest.param(k, e, m, id=name) for name, k, e, m in CONSTRUCTION_ERRORS],
)
def test_construction_error(kwargs, error, match):
  with pytest.raises(error, match=match):
    BN(**kwargs)


def test_renorm_clipping_is_ignored_without_renorm():
  """Keras neither stores nor validates `renorm_clipping` when `renorm=False` (spec §1.1)."""
  layer = BN(renorm=False, renorm_clipping={"nonsense": "x"})
  variables = _init(layer, (4, 3))
  assert set(variables["batch_stats"]) == {"moving_mean", "moving_variance"}


# --------------------------------------------------------------------------------------------
# Shape-dependent errors: raised at trace time from static shapes, never from XLA.
# --------------------------------------------------------------------------------------------


def _apply_built(built_layer, built_shape, layer, x, **call):
  """Builds variables with `built_layer` on `built_shape`, then calls `layer` on `x`."""
  variables = _init(built_layer, built_shape)
  return layer.apply(variables, x, **call)


TRACE_ERRORS = [
  ("scalar_input", lambda: _init(BN(), ()), ValueError, r"Received: input_shape=\(\)"),
  (
    "axis_out_of_range",
    lambda: _init(BN(axis=2), (4, 3)),
    ValueError,
    r"Invalid value for `axis` argument.*inputs\.rank=2.*axis=2",
  ),
  (
    "axis_negative_out_of_range",
    lambda: _init(BN(axis=-4), (4, 3, 2)),
    ValueError,
    r"Invalid value for `axis` argument.*axis=-4 \(normalized: \(-1,\)\)",
  ),
  (
    "axis_list_out_of_range",
    lambda: _init(BN(axis=[1, 3]), (4, 3, 2)),
    ValueError,
    r"Invalid value for `axis`",
  ),
  (
    "axis_duplicate_after_normalization",
    lambda: _init(BN(axis=[1, -2]), (4, 3, 2)),
    ValueError,
    r"Duplicate axis: `axis`=\(1, -2\).*\(1, 1\)",
  ),
  ("axis_duplicate_literal", lambda: _init(BN(axis=(2, 2)), (4, 3, 2)), ValueError, "Duplicate"),
  (
    "vbs_with_axis_0",
    lambda: _init(BN(axis=0, virtual_batch_size=2), (4, 3)),
    ValueError,
    r"`virtual_batch_size`, the batch dimension must be 0 and thus axis cannot include 0",
  ),
  (
    "vbs_with_negative_axis_0",
    lambda: _init(BN(axis=[-2, -1], virtual_batch_size=2), (4, 3)),
    ValueError,
    r"axis cannot include 0\. Received axis=\[0, 1\]",
  ),
  (
    "ghost_batch_not_dividing",
    lambda: _train(BN(virtual_batch_size=3), _init(BN(virtual_batch_size=3), (6, 2)), _ones(8, 2)),
    ValueError,
    r"`virtual_batch_size`=3 must divide the batch size 8",
  ),
  (
    "ghost_batch_not_dividing_under_jit",
    lambda: jax.jit(lambda v, x: _train(BN(virtual_batch_size=4), v, x))(
      _init(BN(virtual_batch_size=4), (8, 2)), _ones(6, 2)
    ),
    ValueError,
    r"`virtual_batch_size`=4 must divide the batch size 6",
  ),
  (
    "feature_size_differs",
    lambda: _apply_built(BN(), (4, 3), BN(), _ones(4, 5)),
    ValueError,
    r"`gamma` has shape \(3,\) but this input's feature axes have size \(5,\)",
  ),
  (
    "feature_size_differs_no_affine",
    lambda: _apply_built(
      BN(center=False, scale=False), (4, 3), BN(center=False, scale=False), _ones(4, 5)
    ),
    ValueError,
    r"`moving_mean` has shape \(3,\) but this input's feature axes have size \(5,\)",
  ),
  (
    "feature_size_differs_in_training",
    lambda: _train(BN(scale=False), _init(BN(scale=False), (4, 3)), _ones(4, 2)),
    ValueError,
    r"`beta` has shape \(3,\)",
  ),
  (
    "feature_size_differs_multi_axis",
    lambda: _apply_built(BN(axis=[1, 2]), (2, 3, 4), BN(axis=[1, 2]), _ones(2, 3, 5)),
    ValueError,
    r"`gamma` has shape \(3, 4\) but this input's feature axes have size \(3, 5\)",
  ),
  (
    "rank_differs_feature_moves",
    lambda: _apply_built(BN(), (4, 3), BN(), _ones(4, 3, 2)),
    ValueError,
    r"`gamma` has shape \(3,\) but this input's feature axes have size \(2,\)",
  ),
  (
    "rank_differs_multi_axis",
    lambda: _apply_built(BN(axis=[1, 2]), (2, 3, 4), BN(axis=[1, 2]), _ones(3, 4)),
    ValueError,
    r"Invalid value for `axis`.*inputs\.rank=2",
  ),
  (
    "rank_differs_renorm_stats_checked",
    lambda: _apply_built(
      BN(renorm=True, center=False, scale=False),
      (4, 3),
      BN(renorm=True, center=False, scale=False),
      _ones(4, 6),
    ),
    ValueError,
    r"`moving_mean` has shape \(3,\)",
  ),
  (
    "training_without_mutable_batch_stats",
    lambda: _apply_built(BN(), (4, 3), BN(), _ones(4, 3), training=True),
    ValueError,
    r"'batch_stats' collection must be mutable: call `layer\.apply\(variables, x, "
    r"training=True, mutable=\['batch_stats'\]\)`",
  ),
  (
    "training_traced",
    lambda: jax.jit(lambda v, x, t: BN().apply(v, x, training=t, mutable=["batch_stats"]))(
      _init(BN(), (4, 3)), _ones(4, 3), True
    ),
    TypeError,
    r"`training`=.*Tracer.* must be a Python bool.*mark the argument that carries it static",
  ),
  (
    "training_str",
    lambda: _apply_built(BN(), (4, 3), BN(), _ones(4, 3), training="true"),
    TypeError,
    r"`training`='true' must be a Python bool",
  ),
  (
    "training_two",
    lambda: _apply_built(BN(), (4, 3), BN(), _ones(4, 3), training=2),
    TypeError,
    r"`training`=2 must be a Python bool",
  ),
  (
    "mask_wrong_shape",
    lambda: _train(BN(), _init(BN(), (4, 5, 3)), _ones(4, 5, 3), mask=jnp.ones((4, 3))),
    ValueError,
    r"`mask` of shape \(4, 3\) does not match inputs of shape \(4, 5, 3\).*\(4, 5\)",
  ),
  (
    "mask_wrong_rank",
    lambda: _train(BN(), _init(BN(), (4, 3)), _ones(4, 3), mask=jnp.ones((4, 3))),
    ValueError,
    r"`mask` of shape \(4, 3\) does not match",
  ),
  (
    "mask_with_vbs",
    lambda: _train(
      BN(virtual_batch_size=2), _init(BN(virtual_batch_size=2), (4, 3)), _ones(4, 3), mask=_ones(4)
    ),
    ValueError,
    r"`mask` cannot be combined with `virtual_batch_size`",
  ),
  (
    "call_clipping_unknown_key",
    lambda: _train(
      BN(renorm=True), _init(BN(renorm=True), (4, 3)), _ones(4, 3), renorm_clipping={"max": 2.0}
    ),
    ValueError,
    r"invalid keys for `renorm_clipping` argument: \{'max'\}",
  ),
  (
    "call_clipping_not_dict",
    lambda: _train(
      BN(renorm=True), _init(BN(renorm=True), (4, 3)), _ones(4, 3), renorm_clipping=2.0
    ),
    TypeError,
    r"`renorm_clipping`=2\.0 must be a dict",
  ),
  (
    "initializer_orthogonal_on_vector",
    lambda: _init(BN(gamma_initializer="orthogonal"), (4, 3)),
    ValueError,
    r"'orthogonal' initializer needs a weight of rank >= 2; got shape \(3,\)",
  ),
]


@pytest.mark.parametrize(
  "call, error, match", [pytest.param(c, e, m, id=name) for name, c, e, m in TRACE_ERRORS]
)
def test_trace_time_error(call, error, match):
  with pytest.raises(error, match=match):
    call()


# --------------------------------------------------------------------------------------------
# Misuses whose message needed a dedicated check.
# --------------------------------------------------------------------------------------------


def test_axis_name_outside_a_mapped_axis():
  """Today: JAX's bare ``NameError: unbound axis name: batch``."""
  layer = BN(axis_name="batch")
  variables = _init(layer, (4, 3))  # init skips collectives, as Flax does
  with pytest.raises(ValueError, match=r"`axis_name`='batch' is not bound"):
    _train(layer, variables, _ones(4, 3))


@pytest.mark.parametrize("groups", [[0, 1], [None], 5], ids=["flat", "none", "int"])
def test_axis_index_groups_not_nested(groups):
  """Today: ``TypeError: 'int' object is not iterable``."""
  with pytest.raises(TypeError, match=r"`axis_index_groups`=.* must be a list of lists"):
    BN(axis_index_groups=groups)


@pytest.mark.parametrize("adj_shape", [(5,), (2, 4, 3)], ids=["wrong_features", "rank_too_high"])
def test_adjustment_result_that_does_not_broadcast(adj_shape):
  """Today: ``TypeError: mul got incompatible shapes`` or a rank-promotion error."""
  layer = BN(adjustment=lambda shape: (jnp.ones(adj_shape), jnp.zeros(adj_shape)))
  with pytest.raises(ValueError, match=r"`adjustment` returned .* shape .*\(4, 3\)"):
    _train(layer, _init(layer, (4, 3)), _ones(4, 3))


# --------------------------------------------------------------------------------------------
# Not errors: behaviour pinned against the reference.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_], ids=str)
@pytest.mark.parametrize("training", [False, True])
def test_integer_and_boolean_input_is_cast_to_float(dtype, training, rng):
  """Keras casts integer input to the float compute dtype (spec §3.1 step 2); so do we."""
  x = rng.integers(0, 5, size=(6, 3)).astype(np.dtype(dtype))
  layer = BN(momentum=0.5, gamma_initializer="ones")
  variables = _init(layer, (6, 3))
  if training:
    y, updates = _train(layer, variables, jnp.asarray(x))
  else:
    y = layer.apply(variables, jnp.asarray(x))
  state = reference.state_from_variables(variables)
  expected, new_state = reference.keras_v1_reference(
    x.astype(np.float64), state, momentum=0.5, training=training
  )
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
  if training:
    for name, value in updates["batch_stats"].items():
      np.testing.assert_allclose(np.asarray(value), new_state[name], rtol=1e-6, atol=1e-6)


def test_rank_change_with_same_feature_size_is_accepted(rng):
  """Deliberate difference: the variables record feature sizes, not the build rank (Keras's
  InputSpec would reject rank 3 after a rank-2 build). Results are exact for the new rank."""
  layer = BN(momentum=0.5)
  variables = _init(layer, (4, 3))
  x = rng.normal(size=(4, 2, 3)).astype(np.float32)
  y, updates = _train(layer, variables, jnp.asarray(x))
  expected, state = reference.keras_v1_reference(
    x, reference.state_from_variables(variables), momentum=0.5, training=True
  )
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["moving_variance"], state["moving_variance"])


def test_training_false_needs_no_mutable_collection(rng):
  layer = BN()
  variables = _init(layer, (4, 3))
  y = layer.apply(variables, jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), training=False)
  assert y.shape == (4, 3)


def test_trainable_false_trains_without_mutable_collection(rng):
  """V1 `trainable=False`: batch statistics, no update, so nothing needs to be mutable."""
  layer = BN(trainable=False)
  x = rng.normal(size=(4, 3)).astype(np.float32)
  variables = _init(layer, (4, 3))
  y = layer.apply(variables, jnp.asarray(x), training=True)
  expected, _ = reference.keras_v1_reference(
    x, reference.state_from_variables(variables), training=True, trainable=False
  )
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_mask_on_fused_configuration_warns_and_is_ignored(rng):
  """Keras ignores a mask on the fused path with a warning (spec §3.4 step 1)."""
  layer = BN(momentum=0.5)
  x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  variables = _init(layer, x.shape)
  with pytest.warns(UserWarning, match=r"Masking is not supported with `fused=True`"):
    y, _ = _train(layer, variables, jnp.asarray(x), mask=jnp.zeros((2, 3, 3)))
  expected, _ = reference.keras_v1_reference(
    x, reference.state_from_variables(variables), momentum=0.5, training=True
  )
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_boolean_axis_is_accepted_like_keras():
  """`bool` is an `int` subclass, so Keras accepts axis=True (axis 1); we match it."""
  variables = _init(BN(axis=True), (4, 3, 2))
  assert variables["params"]["gamma"].shape == (3,)
