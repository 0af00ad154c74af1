"""`kbn_jax.training`: penalties, constraints and frozen layers in Flax + optax; checkpoints.

Constraint expectations come from tf_keras (`tests/oracles/keras_models/fixtures/constraints.*`)
and from
a float64 NumPy transcription of Keras's formulas; penalty gradients from their analytic form.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import kbn_jax
from kbn_jax import training
from tests.oracles import keras_models


def _standard_promotion(fn):
  """optax's adam/adamw mix weak Python floats with int32 counts, which strict promotion rejects
  (third-party code, see conftest); the library code under test runs inside this context too."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with jax.numpy_dtype_promotion("standard"):
      return fn(*args, **kwargs)

  return wrapper


class Net(nn.Module):
  """Dense -> BN -> relu -> Dense -> BN (frozen or not) -> Dense, with a BN inside a submodule."""

  bn1: dict
  bn2: dict

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(6, name="dense1")(x)
    x = nn.relu(kbn_jax.BatchNormalization(name="bn1", **self.bn1)(x, training=train))
    x = Block(self.bn2, name="block")(x, train)
    return nn.Dense(2, name="head")(x)


class Block(nn.Module):
  bn: dict

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(5, name="dense")(x)
    return kbn_jax.BatchNormalization(name="bn", **self.bn)(x, training=train)


def _net(bn1=None, bn2=None):
  return Net(bn1=bn1 or {}, bn2=bn2 or {})


def _randomized(variables, seed=0):
  """Moves gamma/beta away from 1/0 so that penalties, signs and constraints all matter."""
  rs = np.random.default_rng(seed)

  def perturb(path, value):
    name = getattr(path[-1], "key", None)
    if name in ("gamma", "beta"):
      return jnp.asarray(rs.normal(0.0, 1.5, value.shape), value.dtype)
    return value

  return jax.tree_util.tree_map_with_path(perturb, variables)


_INIT_CACHE = {}


def _init(model):
  """``model.init``; the plain layout is shared by every Net whose variables have that layout
  (the BN options used here only change gamma/beta, which `_randomized` redraws anyway)."""
  renorm = model.bn1.get("renorm", False) or model.bn2.get("renorm", False)
  key = (renorm, str(model.bn2.get("param_dtype", "float32")))
  if key not in _INIT_CACHE:
    _INIT_CACHE[key] = jax.jit(model.init)(jax.random.key(0), X)
  return _INIT_CACHE[key]


X = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
Y = np.random.default_rng(2).normal(size=(8, 2)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Finding the layers
# ---------------------------------------------------------------------------------------------
def test_find_batch_norms_paths_shapes_and_configs():
  model = _net({"gamma_regularizer": "l2"}, {"axis": (1,), "trainable": False})
  sites = training.find_batch_norms(model, X, True)  # positional flag: passed as it is
  assert [s.path for s in sites] == [("bn1",), ("block", "bn")]
  assert [s.input_shape for s in sites] == [(8, 6), (8, 5)]
  assert sites[0].module.gamma_regularizer == "l2"
  assert sites[1].module.trainable is False and sites[1].keras_shape == (5,)
  variables = _init(model)
  for site in sites:
    node = variables["params"]
    for name in site.path:
      node = node[name]
    assert set(node) == {"gamma", "beta"}


def test_find_batch_norms_abstract_input_shared_layer_and_top_level():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      bn = kbn_jax.BatchNormalization(axis=[1, 2], virtual_batch_size=2)
      return bn(bn(x))

  sample = jax.ShapeDtypeStruct((4, 3, 2), jnp.float32)
  (site,) = training.find_batch_norms(Shared(), sample)
  assert site.path == ("BatchNormalization_0",) and site.keras_shape == (1, 1, 3, 2)
  (top,) = training.find_batch_norms(kbn_jax.BatchNormalization(), sample)
  assert top.path == () and top.keras_shape == (2,)


# ---------------------------------------------------------------------------------------------
# Regularizers
# ---------------------------------------------------------------------------------------------
L2, L1 = 0.1, 0.05


def _loss(model, variables, params, penalty):
  y, updates = model.apply(
    {**variables, "params": params}, X, train=True, mutable=["batch_stats", "losses"]
  )
  loss = jnp.mean((y - Y) ** 2)
  if penalty == "sown":
    loss = loss + training.regularization_loss(updates["losses"])
  elif penalty == "params":
    loss = loss + training.regularization_penalty(params, training.find_batch_norms(model, X))
  return loss


def test_penalty_gradient_is_the_analytic_keras_gradient():
  regularized = _net(
    {
      "gamma_regularizer": {"class_name": "L2", "config": {"l2": L2}},
      "beta_regularizer": {
        "module": "keras.regularizers",
        "class_name": "L1",
        "config": {"l1": L1},
      },
    },
    {"axis": (1,), "gamma_regularizer": "l1_l2"},  # Keras's l1_l2(): l1 = l2 = 0.01
  )
  plain = _net({}, {"axis": (1,)})
  variables = _randomized(_init(regularized))
  params = variables["params"]

  @jax.jit
  def gradients(params):
    return {
      mode: jax.grad(lambda p, m=model, mode=mode: _loss(m, variables, p, mode))(params)
      for mode, model in (("sown", regularized), ("params", regularized), ("none", plain))
    }

  grads = jax.tree.map(lambda g: np.asarray(g, np.float64), gradients(params))
  f32 = np.float32
  gamma1 = np.asarray(params["bn1"]["gamma"], np.float64)
  beta1 = np.asarray(params["bn1"]["beta"], np.float64)
  gamma2 = np.asarray(params["block"]["bn"]["gamma"], np.float64)
  expected = jax.tree.map(np.zeros_like, grads["none"])
  expected["bn1"]["gamma"] = 2 * float(f32(L2)) * gamma1  # L2 is l2 * sum(w**2): no 1/2
  expected["bn1"]["beta"] = float(f32(L1)) * np.sign(beta1)
  expected["block"]["bn"]["gamma"] = float(f32(0.01)) * (np.sign(gamma2) + 2 * gamma2)
  for mode in ("sown", "params"):
    diff = jax.tree.map(np.subtract, grads[mode], grads["none"])
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), diff, expected
    )


def test_sown_penalties_equal_numpy_and_the_params_helper():
  model = _net(
    {"gamma_regularizer": {"class_name": "L2", "config": {"l2": L2}}, "beta_regularizer": "l1"},
    {"axis": (1,), "beta_regularizer": {"class_name": "L1L2", "config": {"l1": 0.2, "l2": 0.3}}},
  )
  variables = _randomized(_init(model))
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  _, updates = apply(variables, X, train=True, mutable=("batch_stats", "losses"))
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
  expected = (
    np.float32(L2) * np.sum(p["bn1"]["gamma"] ** 2)
    + np.float32(0.01) * np.sum(np.abs(p["bn1"]["beta"]))
    + np.float32(0.2) * np.sum(np.abs(p["block"]["bn"]["beta"]))
    + np.float32(0.3) * np.sum(p["block"]["bn"]["beta"] ** 2)
  )
  assert set(updates["losses"]["bn1"]) == {"gamma_regularizer", "beta_regularizer"}
  np.testing.assert_allclose(training.regularization_loss(updates["losses"]), expected, rtol=1e-6)
  sites = training.find_batch_norms(model, X)
  np.testing.assert_allclose(
    training.regularization_penalty(variables["params"], sites), expected, rtol=1e-6
  )
  # Nothing is sown in inference or when `losses` is not mutable.
  _, updates = apply(variables, X, train=False, mutable=("batch_stats", "losses"))
  assert training.regularization_loss(updates.get("losses", {})) == 0.0


def test_regularization_penalty_sees_keras_shape():
  seen = []

  def penalty(w):
    seen.append(w.shape)
    return jnp.sum(w)

  layer = kbn_jax.BatchNormalization(axis=(1, 3), gamma_regularizer=penalty)
  x = jnp.ones((2, 3, 4, 5))
  sites = training.find_batch_norms(layer, x)
  params = layer.init(jax.random.key(0), x)["params"]
  np.testing.assert_allclose(training.regularization_penalty(params, sites), 15.0)
  assert seen[-1] == (1, 3, 1, 5)
  with pytest.raises(KeyError, match="pass the model's `params` collection"):
    training.regularization_penalty({"params": params}, training.find_batch_norms(_net(), X))


# ---------------------------------------------------------------------------------------------
# Constraints
# ---------------------------------------------------------------------------------------------
def _layer_for_keras_shape(shape, **kwargs):
  """A BN layer and an input whose Keras parameter shape is `shape`."""
  if len(shape) == 1:
    return kbn_jax.BatchNormalization(**kwargs), (4, shape[0])
  if shape[:2] == [1, 1]:  # ghost batches: (1, 1, C)
    return kbn_jax.BatchNormalization(virtual_batch_size=2, **kwargs), (4, shape[-1])
  axes = tuple(i for i, d in enumerate(shape) if d > 1)
  return kbn_jax.BatchNormalization(axis=axes, **kwargs), (4, *[max(d, 2) for d in shape[1:]])


def _constraint_cases():
  record, _ = keras_models.load("constraints")
  for name, case in record["cases"].items():
    for shape in case["shapes"]:
      yield pytest.param(
        case["config"], shape, f"{name}/{'x'.join(map(str, shape))}", id=f"{name}-{shape}"
      )


@pytest.mark.parametrize(("config", "shape", "key"), list(_constraint_cases()))
def test_constrain_params_projects_like_keras(config, shape, key):
  _, arrays = keras_models.load("constraints")
  w, keras_projected = arrays[f"{key}/w"], arrays[f"{key}/projected"]
  layer, input_shape = _layer_for_keras_shape(
    shape, gamma_constraint=config, beta_constraint=config
  )
  (site,) = training.find_batch_norms(layer, jnp.zeros(input_shape))
  assert site.keras_shape == tuple(shape)
  feature = w.reshape(-1) if len(shape) != 4 else w.reshape(shape[1], shape[3])
  params = {"gamma": jnp.asarray(feature), "beta": jnp.asarray(-feature)}
  projected = training.constrain_params(params, [site])
  for name, sign in (("gamma", 1.0), ("beta", -1.0)):
    ours = np.asarray(projected[name]).reshape(shape)
    np.testing.assert_allclose(
      ours, keras_models.numpy_constraint(config, sign * w), rtol=2e-6, atol=1e-7
    )
    if sign > 0:
      np.testing.assert_allclose(ours, keras_projected, rtol=2e-6, atol=1e-7)


def test_constraint_axis_conventions_differ_by_keras_shape():
  # max_norm(axis=0) bounds the whole (C,) vector of a one-axis layer but each entry of a
  # ghost-batch layer's (1, 1, C) weight.
  gamma = jnp.asarray([3.0, 4.0])
  for layer, shape, expected in (
    (kbn_jax.BatchNormalization(gamma_constraint="max_norm"), (4, 2), [1.2, 1.6]),
    (
      kbn_jax.BatchNormalization(gamma_constraint="max_norm", virtual_batch_size=2),
      (4, 2),
      [2.0, 2.0],
    ),
  ):
    sites = training.find_batch_norms(layer, jnp.zeros(shape))
    out = training.constrain_params({"gamma": gamma, "beta": gamma}, sites)
    np.testing.assert_allclose(out["gamma"], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["beta"], gamma)  # no beta constraint


@_standard_promotion
def test_keras_constraints_transform_lands_on_the_projection():
  model = _net(
    {"gamma_constraint": "non_neg", "beta_constraint": "unit_norm"},
    {"axis": (1,), "gamma_constraint": "max_norm"},
  )
  sites = training.find_batch_norms(model, X)
  variables = _randomized(_init(model))
  params = variables["params"]
  grads = jax.jit(jax.grad(lambda p: _loss(model, variables, p, None)))(params)
  sgd = optax.sgd(0.5)
  tx = optax.chain(sgd, training.keras_constraints(sites))
  updates, _ = tx.update(grads, tx.init(params), params)
  ours = optax.apply_updates(params, updates)
  plain_updates, _ = sgd.update(grads, sgd.init(params), params)
  expected = training.constrain_params(optax.apply_updates(params, plain_updates), sites)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), ours, expected)
  assert np.min(ours["bn1"]["gamma"]) >= 0 and np.min(params["bn1"]["gamma"]) < 0
  np.testing.assert_allclose(np.linalg.norm(ours["bn1"]["beta"]), 1.0, rtol=1e-5)
  assert np.linalg.norm(ours["block"]["bn"]["gamma"]) <= 2.0 + 1e-5
  # Unconstrained leaves keep the optimizer's updates bit for bit.
  np.testing.assert_array_equal(updates["head"]["kernel"], plain_updates["head"]["kernel"])
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(grads, tx.init(params))


def test_frozen_layers_are_not_constrained():
  model = _net({"gamma_constraint": "non_neg", "trainable": False})
  sites = training.find_batch_norms(model, X)
  params = _randomized(_init(model))["params"]
  np.testing.assert_array_equal(
    training.constrain_params(params, sites)["bn1"]["gamma"], params["bn1"]["gamma"]
  )


# ---------------------------------------------------------------------------------------------
# Frozen layers
# ---------------------------------------------------------------------------------------------
def _make_step(model, tx):
  """One jitted training step (loss, gradients, optimizer, moving statistics)."""

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(params):
      y, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, X, train=True, mutable=["batch_stats"]
      )
      return jnp.mean((y - Y) ** 2), updates["batch_stats"]

    grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  return step


def _train(step, tx, variables, steps, opt_state=None):
  """`steps` calls of `step` from `variables` (and `opt_state`, else a fresh one)."""
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params) if opt_state is None else opt_state
  for _ in range(steps):
    params, batch_stats, opt_state = step(params, batch_stats, opt_state)
  return {"params": params, "batch_stats": batch_stats}, opt_state


def test_trainable_mask():
  model = _net({}, {"trainable": False})
  params = _init(model)["params"]
  mask = training.trainable_mask(params, training.find_batch_norms(model, X))
  assert mask["block"]["bn"] == {"gamma": False, "beta": False}
  assert mask["bn1"] == {"gamma": True, "beta": True}
  assert all(jax.tree.leaves(mask["head"]) + jax.tree.leaves(mask["block"]["dense"]))


@_standard_promotion
def test_frozen_gamma_beta_and_statistics_unchanged_by_adamw():
  model = _net({}, {"trainable": False, "gamma_constraint": "non_neg"})
  sites = training.find_batch_norms(model, X)
  variables = _randomized(_init(model))
  tx = training.keras_optimizer(optax.adamw(0.05, weight_decay=0.5), sites)
  trained, _ = _train(_make_step(model, tx), tx, variables, steps=3)
  before, after = variables["params"], trained["params"]
  for name in ("gamma", "beta"):
    np.testing.assert_array_equal(after["block"]["bn"][name], before["block"]["bn"][name])
    assert not np.array_equal(after["bn1"][name], before["bn1"][name])
  for layer in ("dense1", "head"):
    assert not np.array_equal(after[layer]["kernel"], before[layer]["kernel"])
  # V1: a frozen layer keeps its moving statistics in training calls; the other layer moves.
  jax.tree.map(
    np.testing.assert_array_equal,
    trained["batch_stats"]["block"],
    variables["batch_stats"]["block"],
  )
  assert not np.array_equal(
    trained["batch_stats"]["bn1"]["moving_mean"], variables["batch_stats"]["bn1"]["moving_mean"]
  )
  # Plain adamw (what optax.masked would fall back to) does move them: the wrapper is needed.
  adamw = optax.adamw(0.05, weight_decay=0.5)
  plain, _ = _train(_make_step(model, adamw), adamw, variables, steps=1)
  assert not np.array_equal(plain["params"]["block"]["bn"]["gamma"], before["block"]["bn"]["gamma"])


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _checkpoint_model():
  return _net(
    {"renorm": True, "gamma_constraint": "non_neg"}, {"axis": (1,), "param_dtype": jnp.bfloat16}
  )


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)

  def check(x, y):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))

  jax.tree.map(check, a, b)


def test_flax_serialization_round_trip_is_exact():
  variables = _randomized(_init(_checkpoint_model()))
  restored = flax.serialization.from_bytes(variables, flax.serialization.to_bytes(variables))
  _assert_bitwise_equal(restored, variables)
  state = flax.serialization.msgpack_restore(
    flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(variables))
  )
  _assert_bitwise_equal(state, variables)
  assert set(variables["batch_stats"]["bn1"]) == {
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
  }
  assert variables["params"]["block"]["bn"]["gamma"].dtype == jnp.bfloat16


def test_orbax_round_trip_is_exact(tmp_path):
  variables = _randomized(_init(_checkpoint_model()))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "variables", variables)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
    tmp_path / "variables", jax.tree.map(ocp.utils.to_shape_dtype_struct, variables)
  )
  _assert_bitwise_equal(restored, variables)


@_standard_promotion
def test_resuming_from_a_checkpoint_is_bit_identical(tmp_path):
  model = _checkpoint_model()
  sites = training.find_batch_norms(model, X)
  tx = training.keras_optimizer(optax.adamw(0.02, weight_decay=0.1), sites)
  variables = _randomized(_init(model))

  step = _make_step(model, tx)
  uninterrupted, _ = _train(step, tx, variables, steps=4)

  halfway, opt_state = _train(step, tx, variables, steps=2)
  state = {"variables": halfway, "opt_state": opt_state}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "step2", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
    tmp_path / "step2", jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  )
  _assert_bitwise_equal(restored, state)

  resumed, _ = _train(step, tx, restored["variables"], steps=2, opt_state=restored["opt_state"])
  _assert_bitwise_equal(resumed, uninterrupted)
