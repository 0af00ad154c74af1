"""The Haiku front-end: fixture parity, equality with linen, one scope per instance.

`kbn_jax.haiku.BatchNormalization` replays the 78 tf_keras V1 fixtures and the 42 V2 / Keras 3 /
PyTorch fixtures, equals the linen Module bit for bit on a few cases, and runs the float64
property test. Each instance owns its parameters and state (two layers never share them), init
creates them without moving them, and errors speak Haiku (`is_training`, `f.init`).
"""

from __future__ import annotations

from unittest import mock

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import kbn_jax
import kbn_jax.haiku
from kbn_jax._config import FIELD_NAMES
from tests import replay, test_properties
from tests.oracles.keras_parity.cases import CASES

BatchNormalization = kbn_jax.haiku.BatchNormalization


def apply_haiku(layer):
  """`replay.Apply` of the Haiku twin of a linen layer, in ``hk.transform_with_state``."""
  kwargs = {name: getattr(layer.config, name) for name in FIELD_NAMES}

  def apply(variables, x, training, mask):
    f = hk.transform_with_state(lambda x, mask: BatchNormalization(**kwargs)(x, training, mask))
    params = variables.get("params") or {}
    params = {"batch_normalization": dict(params)} if params else {}
    state = {"batch_normalization": dict(variables["batch_stats"])}
    y, state = f.apply(params, state, jax.random.key(0), x, mask)
    return y, state["batch_normalization"]

  return apply


@pytest.mark.parametrize(
  "name", replay.tiered([case["name"] for case in CASES], replay.REPRESENTATIVE_V1)
)
def test_haiku_matches_keras_v1(name):
  assert replay.keras_v1_errors(name, apply_haiku)


@pytest.mark.parametrize(
  "stem", replay.tiered(replay.FRAMEWORK_STEMS, replay.REPRESENTATIVE_FRAMEWORK)
)
def test_haiku_matches_keras_v2_keras3_torch(stem):
  assert replay.framework_errors(stem, apply_haiku)


@pytest.mark.parametrize("name", replay.EXACT_CASES)
def test_haiku_equals_linen_exactly(name):
  replay.assert_equals_linen_exactly(name, apply_haiku)


def _two_layers(x, is_training):
  """Two norms of different widths in one function, as a ResNet block has."""
  hidden = BatchNormalization(momentum=0.5)(x, is_training)
  return BatchNormalization(momentum=0.5)(hidden[:, :2] * 3.0 + 1.0, is_training)


def test_each_instance_owns_its_variables():
  f = hk.transform_with_state(_two_layers)
  x = jnp.arange(12.0).reshape(4, 3)
  params, state = f.init(None, x, is_training=True)
  assert sorted(params) == sorted(state) == ["batch_normalization", "batch_normalization_1"]
  assert params["batch_normalization"]["gamma"].shape == (3,)
  assert params["batch_normalization_1"]["gamma"].shape == (2,)
  # init creates the statistics without moving them (as linen's init).
  np.testing.assert_array_equal(state["batch_normalization"]["moving_mean"], jnp.zeros(3))
  _, state = f.apply(params, state, None, x, is_training=True)
  np.testing.assert_allclose(state["batch_normalization"]["moving_mean"], 0.5 * x.mean(0))
  second = state["batch_normalization_1"]
  np.testing.assert_allclose(second["moving_mean"], 0.5 * 1.0, rtol=1e-6)  # normalized * 3 + 1
  y, unchanged = f.apply(params, state, None, x, is_training=False)
  for name, stats in state.items():
    for stat, value in stats.items():
      np.testing.assert_array_equal(unchanged[name][stat], value)
  first = state["batch_normalization"]
  hidden = (x - first["moving_mean"][None]) / jnp.sqrt(first["moving_variance"][None] + 1e-3)
  z = hidden[:, :2] * 3.0 + 1.0
  expected = (z - second["moving_mean"][None]) / jnp.sqrt(second["moving_variance"][None] + 1e-3)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_jit_grad_and_random_initializers():
  def net(x, is_training):
    norm = BatchNormalization(gamma_initializer="random_normal", name="norm")
    return hk.Linear(1)(norm(x, is_training))

  f = hk.transform_with_state(net)
  x = jax.random.normal(jax.random.key(1), (8, 3))
  params, state = f.init(jax.random.key(2), x, is_training=True)
  again, _ = f.init(jax.random.key(2), x, is_training=True)
  other, _ = f.init(jax.random.key(3), x, is_training=True)
  np.testing.assert_array_equal(params["norm"]["gamma"], again["norm"]["gamma"])
  assert not np.array_equal(params["norm"]["gamma"], other["norm"]["gamma"])

  @jax.jit
  def step(params, state):
    def loss(params):
      y, state_ = f.apply(params, state, None, x, is_training=True)
      return jnp.mean(y**2), state_

    grads, new_state = jax.grad(loss, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), new_state

  params, state = step(params, state)
  assert not np.allclose(state["norm"]["moving_mean"], 0.0)


def test_cross_replica_statistics_under_shard_map():
  """`axis_name` (Haiku's ``cross_replica_axis``): 4 devices give the one-device statistics."""
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  f_synced = hk.transform_with_state(lambda x: BatchNormalization(axis_name="data")(x, True))
  f_one = hk.transform_with_state(lambda x: BatchNormalization()(x, True))
  x = jax.random.normal(jax.random.key(0), (16, 3)) * 2.0 + 1.0
  params, state = f_synced.init(None, x)  # init outside shard_map: no collective
  P = jax.sharding.PartitionSpec
  sharded = jax.jit(
    jax.shard_map(
      lambda x: f_synced.apply(params, state, None, x),
      mesh=mesh,
      in_specs=P("data"),
      out_specs=(P("data"), P()),
    )
  )
  y, synced = sharded(jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data"))))
  y_one, one = f_one.apply(params, state, None, x)
  np.testing.assert_allclose(y, y_one, rtol=1e-5, atol=1e-6)
  for stat, value in one["batch_normalization"].items():
    np.testing.assert_allclose(synced["batch_normalization"][stat], value, rtol=1e-6)


def test_errors_speak_haiku():
  f = hk.transform_with_state(_two_layers)
  x = jnp.ones((4, 3))
  params, state = f.init(None, x, is_training=True)
  with pytest.raises(TypeError, match=r"`is_training`=.* is traced.*static_argnames"):
    jax.jit(f.apply)(params, state, None, x, is_training=True)
  y, _ = jax.jit(f.apply, static_argnames="is_training")(params, state, None, x, is_training=True)
  assert y.shape == (4, 2)  # the remedy the message gives works
  with pytest.raises(ValueError, match=r"`batch_normalization/gamma` has shape \(3,\).*f\.init"):
    f.apply(params, state, None, jnp.ones((4, 5)), is_training=True)
  with pytest.raises(TypeError, match=r"Unknown arguments \['decay_rate'\]"):
    hk.transform_with_state(lambda x: BatchNormalization(decay_rate=0.9)(x, True)).init(None, x)
  synced = hk.transform_with_state(lambda x: BatchNormalization(axis_name="data")(x, True))
  params, state = synced.init(None, x)
  with pytest.raises(ValueError, match=r"`axis_name`='data' is not bound.*jax\.shard_map"):
    synced.apply(params, state, None, x)


def _haiku_steps(layer, mask):
  """`test_properties`'s step and inference functions through the Haiku layer."""
  apply = apply_haiku(layer)

  @jax.jit
  def step(params, stats, x, dy):
    def loss(params, x):
      y, new_stats = apply({"params": params, "batch_stats": stats}, x, True, mask)
      return jnp.sum(y.astype(jnp.float32) * dy), (y, new_stats)

    (grad_params, grad_x), (y, new_stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new_stats, grad_params, grad_x

  def infer(params, stats, x):
    return apply({"params": params, "batch_stats": stats}, x, False, None)[0]

  return step, infer


@pytest.mark.slow
@test_properties.PROFILE
@given(case=test_properties.configurations())
def test_haiku_matches_float64_reference(case):
  with mock.patch.object(test_properties, "_linen_steps", _haiku_steps):
    test_properties.test_layer_matches_float64_reference.hypothesis.inner_test("linen", case)
