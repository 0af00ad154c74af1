"""The Equinox front-end: fixture parity, equality with linen, per example == batched.

`kbn_jax.equinox.BatchNormalization` replays the 78 tf_keras V1 fixtures and the 42 V2 / Keras 3
/ PyTorch fixtures (batched calls), equals the linen Module bit for bit on a few cases, runs the
float64 property test, and gives the same outputs, gradients and statistics per example under
``jax.vmap(..., axis_name=...)`` as batched. Equinox's tools (``make_with_state``,
``inference_mode``, ``filter_jit``/``filter_grad``/``filter_vmap``, ``nn.Sequential``) work on it.
"""

from __future__ import annotations

from unittest import mock

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

import kbn_jax
import kbn_jax.equinox
from kbn_jax._config import FIELD_NAMES
from tests import replay, test_properties
from tests.oracles.keras_parity.cases import CASES

BatchNormalization = kbn_jax.equinox.BatchNormalization


def _build(layer, variables, **overrides):
  """The Equinox twin of a linen layer, holding `variables` (in its fields and its state)."""
  kwargs = {name: getattr(layer.config, name) for name in FIELD_NAMES} | overrides
  num_features = jnp.shape(variables["batch_stats"]["moving_mean"])
  model, state = eqx.nn.make_with_state(BatchNormalization)(
    num_features, key=jax.random.key(0), **kwargs
  )
  for name, value in variables.get("params", {}).items():
    model = eqx.tree_at(lambda m, name=name: getattr(m, name), model, value)
  return model, state.set(model.state_index, dict(variables["batch_stats"]))


def batched(layer):
  """`replay.Apply` of the batched call (``axis_name=None``)."""

  def apply(variables, x, training, mask):
    model, state = _build(layer, variables)
    y, state = model(x, state, inference=not training, mask=mask)
    return y, state.get(model.state_index)

  return apply


def _per_example_axis(axis):
  """A Keras `axis` (counting the batch) as an axis of one example."""
  shift = lambda a: a - 1 if a > 0 else a  # noqa: E731
  return shift(axis) if isinstance(axis, int) else tuple(shift(a) for a in axis)


def per_example(layer):
  """`replay.Apply` of the per-example call under ``jax.vmap(..., axis_name="batch")``."""

  def apply(variables, x, training, mask):
    axis = _per_example_axis(layer.config.axis)
    model, state = _build(layer, variables, axis=axis, axis_name="batch")
    call = lambda x, mask, state: model(x, state, inference=not training, mask=mask)  # noqa: E731
    in_axes = (0, None if mask is None else 0, None)
    y, state = jax.vmap(call, in_axes, (0, None), axis_name="batch")(x, mask, state)
    return y, state.get(model.state_index)

  return apply


@pytest.mark.parametrize(
  "name", replay.tiered([case["name"] for case in CASES], replay.REPRESENTATIVE_V1)
)
def test_equinox_matches_keras_v1(name):
  assert replay.keras_v1_errors(name, batched)


@pytest.mark.parametrize(
  "stem", replay.tiered(replay.FRAMEWORK_STEMS, replay.REPRESENTATIVE_FRAMEWORK)
)
def test_equinox_matches_keras_v2_keras3_torch(stem):
  assert replay.framework_errors(stem, batched)


@pytest.mark.parametrize("name", replay.EXACT_CASES)
def test_equinox_equals_linen_exactly(name):
  replay.assert_equals_linen_exactly(name, batched)


# Per example under vmap == batched, Keras's rank rules included: V1's fused path on rank 4
# (Bessel-corrected moving variance), V2's fused rules, renorm, a mask, PyTorch's counter.
_PER_EXAMPLE_CASES = {
  "v1_rank2": ((16, 3), {}),
  "v1_nchw_fused": ((8, 3, 4, 4), {"axis": 1}),
  "v1_nhwc_fused": ((8, 4, 4, 3), {}),
  "v1_rank3_masked": ((6, 5, 3), {"momentum": 0.5}),
  "v1_renorm": ((16, 3), {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}),
  "v2_nchw": ((8, 3, 4, 4), {"axis": 1, "semantics": "keras_v2"}),
  "keras3_rank4": ((8, 4, 4, 3), {"semantics": "keras3"}),
  "torch_nchw": ((8, 3, 4, 4), {"axis": 1, "semantics": "torch", "momentum": 0.9}),
}


@pytest.mark.parametrize(
  "case",
  replay.tiered(sorted(_PER_EXAMPLE_CASES), ("v1_nchw_fused", "v1_rank3_masked", "torch_nchw")),
)
def test_per_example_equals_batched(case):
  shape, config = _PER_EXAMPLE_CASES[case]
  key_x, key_dy, key_mask = jax.random.split(jax.random.key(7), 3)
  x = 2.0 + 1.5 * jax.random.normal(key_x, shape)
  dy = jax.random.normal(key_dy, shape)
  mask = (jax.random.uniform(key_mask, shape[:-1]) < 0.7).astype(jnp.float32)
  mask = mask if case.endswith("masked") else None
  linen = kbn_jax.BatchNormalization(**config)
  variables = linen.init(jax.random.key(0), x)
  outputs = {}
  for name, make_apply in (("batched", batched), ("per_example", per_example)):
    apply = make_apply(linen)

    def loss(params, x, apply=apply):
      y, stats = apply({**variables, "params": params}, x, True, mask)
      return jnp.sum(y * dy), (y, stats)

    grads, (y, stats) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x
    )
    outputs[name] = {"y": y, "grads": grads, "stats": stats}
  for path, value in jax.tree_util.tree_leaves_with_path(outputs["batched"]):
    actual = dict(jax.tree_util.tree_leaves_with_path(outputs["per_example"]))[path]
    np.testing.assert_allclose(actual, value, rtol=2e-6, atol=2e-6, err_msg=str(path))


def test_inference_mode_and_state():
  layer, state = eqx.nn.make_with_state(BatchNormalization)(3, "batch", momentum=0.5)
  x = jnp.arange(12.0).reshape(4, 3)
  vmapped = lambda m, s: jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(  # noqa: E731
    x, s
  )
  assert layer.inference is False  # training by default, as eqx.nn.BatchNorm
  _, state = vmapped(layer, state)
  moved = state.get(layer.state_index)["moving_mean"]
  np.testing.assert_allclose(moved, 0.5 * x.mean(0), rtol=1e-6)
  frozen = eqx.nn.inference_mode(layer)
  assert frozen.inference is True
  y, state = vmapped(frozen, state)
  np.testing.assert_array_equal(state.get(layer.state_index)["moving_mean"], moved)
  variance = state.get(layer.state_index)["moving_variance"]
  np.testing.assert_allclose(y, (x - moved[None]) / jnp.sqrt(variance[None] + 1e-3), rtol=1e-6)
  _, state = jax.vmap(  # the call's `inference` overrides the field
    lambda x, s: layer(x, s, inference=True),
    axis_name="batch",
    in_axes=(0, None),
    out_axes=(0, None),
  )(x, state)
  np.testing.assert_array_equal(state.get(layer.state_index)["moving_mean"], moved)


class _Model(eqx.Module):
  """A conv net written as Equinox teaches: per example, vmapped outside, state threaded."""

  conv: eqx.nn.Conv2d
  norm: kbn_jax.equinox.BatchNormalization
  head: eqx.nn.Linear

  def __init__(self, key):
    key_conv, key_head = jax.random.split(key)
    self.conv = eqx.nn.Conv2d(1, 4, 3, key=key_conv)
    self.norm = kbn_jax.equinox.BatchNormalization(4, "batch", axis=0, momentum=0.9)
    self.head = eqx.nn.Linear(4, 2, key=key_head)

  def __call__(self, x, state):
    x, state = self.norm(self.conv(x), state)
    return self.head(jnp.mean(jax.nn.relu(x), axis=(1, 2))), state


def test_filter_jit_grad_and_optax_train_a_per_example_model():
  model, state = eqx.nn.make_with_state(_Model)(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (16, 1, 6, 6))
  labels = jnp.arange(16) % 2
  optimizer = optax.sgd(0.1)
  opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
  traces = []

  @eqx.filter_jit
  def step(model, state, opt_state):
    traces.append(None)

    def loss(model, state):
      call = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      logits, state = call(x, state)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

    (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, state)
    updates, opt_state = optimizer.update(grads, opt_state)
    return eqx.apply_updates(model, updates), state, opt_state, value

  losses = []
  for _ in range(5):
    model, state, opt_state, value = step(model, state, opt_state)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  assert len(traces) == 1  # Python bools stay static: no retrace across steps
  assert not np.allclose(state.get(model.norm.state_index)["moving_mean"], 0.0)
  assert not np.allclose(model.norm.gamma, 1.0)  # gamma is a trained field
  grads = eqx.filter_grad(lambda m: jnp.sum(m(x[0], state)[0]))(
    eqx.nn.inference_mode(model)
  )  # inference needs no vmap axis
  assert grads.norm.gamma.shape == (4,)


def test_filter_vmap_ensemble_of_sequentials():
  def make(key):
    return eqx.nn.make_with_state(eqx.nn.Sequential)(
      [eqx.nn.Linear(2, 3, key=key), BatchNormalization(3, "batch", momentum=0.0)]
    )

  models, states = eqx.filter_vmap(make)(jax.random.split(jax.random.key(0), 3))
  x = jax.random.normal(jax.random.key(1), (8, 2))

  def run(model, state):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

  ys, states = eqx.filter_vmap(run)(models, states)
  assert ys.shape == (3, 8, 3)
  np.testing.assert_allclose(jnp.mean(ys, axis=1), 0.0, atol=1e-5)
  hidden = eqx.filter_vmap(lambda m: jax.vmap(m.layers[0])(x))(models)
  moving_mean = states.get(models.layers[1].state_index)["moving_mean"]  # momentum 0: batch mean
  np.testing.assert_allclose(moving_mean, jnp.mean(hidden, axis=1), rtol=1e-5, atol=1e-6)


def test_batched_call_across_devices_under_shard_map():
  """``per_example=False`` with an `axis_name`: 4 devices give the one-device statistics."""
  P = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  synced, state = eqx.nn.make_with_state(BatchNormalization)(3, "data", per_example=False)
  one, _ = eqx.nn.make_with_state(BatchNormalization)(3)
  x = jax.random.normal(jax.random.key(0), (16, 3)) * 2.0 + 1.0
  sharded = jax.jit(
    jax.shard_map(synced, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P("data"), P()))
  )
  x_sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
  y, synced_state = sharded(x_sharded, state)
  y_one, one_state = one(x, state)
  np.testing.assert_allclose(y, y_one, rtol=1e-5, atol=1e-6)
  for stat, value in one_state.get(one.state_index).items():
    np.testing.assert_allclose(synced_state.get(synced.state_index)[stat], value, rtol=1e-6)


def test_errors_speak_equinox():
  layer, state = eqx.nn.make_with_state(BatchNormalization)(3)
  with pytest.raises(ValueError, match=r"Construct the layer with `num_features`"):
    layer(jnp.ones((4, 5)), state)
  with pytest.raises(TypeError, match=r"`inference`=.* is traced.*eqx\.filter_jit"):
    jax.jit(lambda m, x, s: m(x, s))(layer, jnp.ones((4, 3)), state)
  synced, synced_state = eqx.nn.make_with_state(BatchNormalization)(3, "batch")
  with pytest.raises(ValueError, match=r"`jax\.vmap\(\.\.\., axis_name=\.\.\.\)` per example"):
    synced(jnp.ones(3), synced_state)
  with pytest.raises(ValueError, match=r"`per_example=True` needs `axis_name`"):
    BatchNormalization(3, per_example=True)
  with pytest.raises(ValueError, match=r"`virtual_batch_size`=4 .* construct the layer without"):
    BatchNormalization(3, "batch", virtual_batch_size=4)
  with pytest.raises(ValueError, match=r"\['gamma'\] draw random numbers: pass `key="):
    BatchNormalization(3, gamma_initializer="random_normal")
  with pytest.raises(TypeError, match=r"Unknown arguments \['eps'\]"):
    BatchNormalization(3, eps=1e-5)
  with pytest.raises(TypeError, match=r"`inference`=1.0 must be None, True or False"):
    BatchNormalization(3, inference=1.0)


def test_random_initializers_use_the_key():
  first = BatchNormalization(3, gamma_initializer="random_normal", key=jax.random.key(1))
  again = BatchNormalization(3, gamma_initializer="random_normal", key=jax.random.key(1))
  other = BatchNormalization(3, gamma_initializer="random_normal", key=jax.random.key(2))
  np.testing.assert_array_equal(first.gamma, again.gamma)
  assert not np.array_equal(first.gamma, other.gamma)


def _equinox_steps(layer, mask):
  """`test_properties`'s step and inference functions through the batched Equinox layer."""
  apply = batched(layer)

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
def test_equinox_matches_float64_reference(case):
  with mock.patch.object(test_properties, "_linen_steps", _equinox_steps):
    test_properties.test_layer_matches_float64_reference.hypothesis.inner_test("linen", case)
