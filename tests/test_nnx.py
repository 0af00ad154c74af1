"""The Flax NNX front-end: Keras V1 parity, equality with linen, modes, errors.

The 78 tf_keras V1 fixtures are replayed through `kbn_jax.nnx.BatchNormalization` (outputs,
every statistic after every step, gradients with respect to input, gamma and beta, inference),
and a few cases are compared with the linen Module bit for bit.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kbn_jax
import kbn_jax.nnx
import kbn_jax.nnx as kbn_nnx
from tests import replay
from tests._asserts import assert_trees_close
from tests.oracles.keras_parity import test_parity
from tests.oracles.keras_parity.cases import CASES


def _nnx_layer(name):
  meta, arrays = test_parity.load_case(name)
  linen = test_parity.build_layer(meta, arrays)
  variables = test_parity.initial_variables(linen, meta, arrays)
  return meta, arrays, linen, variables, kbn_jax.nnx.BatchNormalization.from_linen(linen, variables)


def _replay(name):
  """Runs one case through NNX; returns per-step results for comparison."""
  meta, arrays, _, _, layer = _nnx_layer(name)
  mask = jnp.asarray(arrays["mask"]) if "mask" in arrays else None

  @nnx.jit
  def step(layer, x, dy):
    def loss(layer, x):
      y = layer(x, training=True, mask=mask)
      return jnp.sum(y.astype(jnp.float32) * dy), y

    grads, y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
    return y, grads

  results = []
  for k in range(meta["case"]["steps"]):
    y, (grad_layer, grad_x) = step(
      layer, jnp.asarray(arrays[f"x_{k}"]), jnp.asarray(arrays[f"dy_{k}"])
    )
    stats = layer.linen_variables()["batch_stats"]
    grads = {n: getattr(grad_layer, n)[...] for n in ("gamma", "beta") if hasattr(grad_layer, n)}
    results.append((y, grad_x, grads, stats))
  layer.eval()
  y_infer = layer(jnp.asarray(arrays["x_infer"]))
  return meta, arrays, results, y_infer


@pytest.mark.parametrize(
  "name", replay.tiered([case["name"] for case in CASES], replay.REPRESENTATIVE_V1)
)
def test_nnx_matches_keras_v1(name):
  meta, arrays, results, y_infer = _replay(name)
  tolerance = test_parity._tolerance(meta["compute_dtype"], meta["case"])

  def close(actual, expected, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    error = np.max(np.abs(actual.reshape(expected.shape) - expected) / np.maximum(abs(expected), 1))
    assert error <= tolerance, f"{name}: {what} off by {error:.3g}"

  for k, (y, grad_x, grads, stats) in enumerate(results):
    close(y, arrays[f"y_{k}"], f"output {k}")
    close(grad_x, arrays[f"grad_x_{k}"], f"grad_x {k}")
    for weight, value in grads.items():
      close(value, arrays[f"grad_{weight}_{k}"], f"grad_{weight} {k}")
    for weight in meta["weight_names"]:
      if weight not in ("gamma", "beta"):
        close(stats[weight], arrays[f"w{k + 1}_{weight}"], f"{weight} after {k}")
  close(y_infer, arrays["y_infer"], "inference")


@pytest.mark.parametrize(
  "name", ["r2_default", "r4_nhwc_fused", "r2_renorm_all_clips", "r2_ghost", "r3_mask"]
)
def test_nnx_equals_linen_exactly(name):
  if name not in {case["name"] for case in CASES}:
    pytest.fail(f"unknown case {name}")
  meta, arrays, linen, variables, layer = _nnx_layer(name)
  x = jnp.asarray(arrays["x_0"])
  y_linen, updates = jax.jit(
    lambda v, x: linen.apply(v, x, training=True, mutable=["batch_stats"])
  )(variables, x)
  y_nnx = nnx.jit(lambda m, x: m(x, training=True))(layer, x)
  np.testing.assert_array_equal(y_nnx, y_linen)
  for stat, value in updates["batch_stats"].items():
    np.testing.assert_array_equal(getattr(layer, stat)[...], value)


def test_modes_follow_train_eval_and_view():
  layer = kbn_jax.nnx.BatchNormalization(3, momentum=0.5, rngs=nnx.Rngs(0))
  x = jnp.arange(12.0).reshape(4, 3)
  assert layer.use_running_average is False  # training by default, as nnx.BatchNorm
  layer(x)
  moved = layer.moving_mean[...]
  np.testing.assert_allclose(moved, 0.5 * x.mean(0), rtol=1e-6)
  layer.eval()
  y_eval = layer(x)
  np.testing.assert_array_equal(layer.moving_mean[...], moved)
  expected = (x - moved[None]) / jnp.sqrt(layer.moving_variance[...][None] + 1e-3)
  np.testing.assert_allclose(y_eval, expected, rtol=1e-6)
  layer.train()
  layer(x, training=False)  # the call overrides the mode
  np.testing.assert_array_equal(layer.moving_mean[...], moved)
  eval_view = nnx.view(layer, use_running_average=True)
  eval_view(x)
  np.testing.assert_array_equal(layer.moving_mean[...], moved)


def test_optimizer_trains_only_params():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.bn = kbn_jax.nnx.BatchNormalization(4, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.dense(x))

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (8, 3))

  @nnx.jit
  def step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, x)) for _ in range(5)]
  assert losses[-1] < losses[0]
  assert not np.allclose(model.bn.moving_mean[...], 0.0)


def test_interop_with_keras_weights_and_config():
  config = {"axis": -1, "momentum": 0.9, "epsilon": 1e-3, "renorm": True}
  layer = kbn_jax.nnx.BatchNormalization.from_keras_config(config, num_features=3, rngs=nnx.Rngs(0))
  assert layer.renorm and layer.momentum == 0.9
  weights = [np.full(3, float(i + 1)) for i in range(7)]
  variables = kbn_jax.keras_compat.variables_from_keras(layer, weights, (None, 3))
  layer.load_variables(variables)
  back = kbn_jax.keras_compat.keras_weights_from_variables(layer, layer.linen_variables())
  for value, expected in zip(back, weights, strict=True):
    np.testing.assert_array_equal(value, expected)
  assert layer.to_keras_config()["renorm"] is True


def test_errors_speak_nnx():
  layer = kbn_jax.nnx.BatchNormalization(3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"Construct the layer with `num_features`"):
    layer(jnp.ones((4, 5)))
  with pytest.raises(TypeError, match=r"model\.train\(\)"):
    nnx.jit(lambda m, x, t: m(x, training=t))(layer, jnp.ones((4, 3)), True)
  synced = kbn_jax.nnx.BatchNormalization(3, axis_name="data", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"nnx\.shard_map"):
    synced(jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"`num_features`=\(3, 4\) gives 2 size"):
    kbn_jax.nnx.BatchNormalization((3, 4), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"Unknown arguments \['use_bias'\]"):
    kbn_jax.nnx.BatchNormalization(3, use_bias=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"`momentum`=2"):
    kbn_jax.nnx.BatchNormalization(3, momentum=2, rngs=nnx.Rngs(0))


def test_training_helpers_work_on_nnx_models():
  """Penalties, constraints and frozen layers (kbn_jax.training) with nnx.Optimizer."""

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.bn = kbn_jax.nnx.BatchNormalization(
        4, gamma_regularizer="l2", gamma_constraint="non_neg", rngs=rngs
      )
      self.frozen = kbn_jax.nnx.BatchNormalization(4, trainable=False, rngs=rngs)

    def __call__(self, x):
      return self.frozen(self.bn(self.dense(x))) * self.dense.kernel[0, 0]

  model = Model(nnx.Rngs(0))
  sites = kbn_jax.training.find_batch_norms(model)
  assert [site.path for site in sites] == [("bn",), ("frozen",)]
  penalty = kbn_jax.training.regularization_penalty(nnx.state(model, nnx.Param), sites)
  np.testing.assert_allclose(penalty, 0.01 * 4, rtol=1e-6)  # Keras's l2: 0.01 * sum(gamma**2)
  tx = kbn_jax.training.keras_optimizer(optax.sgd(5.0), sites)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  frozen_gamma = model.frozen.gamma[...]
  x = jax.random.normal(jax.random.key(1), (8, 3))

  @nnx.jit
  def step(model, optimizer):
    def loss(m):
      params = nnx.state(m, nnx.Param)
      return jnp.mean(m(x)) + 10 * kbn_jax.training.regularization_penalty(params, sites)

    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)

  for _ in range(3):
    step(model, optimizer)
  np.testing.assert_array_equal(model.frozen.gamma[...], frozen_gamma)  # frozen: untouched
  assert np.all(model.bn.gamma[...] >= 0)  # the non_neg constraint held after big steps
  assert not np.allclose(model.bn.gamma[...], 1.0)


# Under the Flax NNX toolbox: jit, optimizers, split/merge, checkpoints, transforms, export
AXIS = "data"


NUM_SHARDS = 4


BATCH = 8


IMAGE = (5, 5, 3)  # NHWC input; after the 3x3 VALID conv the first kbn layer sees (B, 3, 3, 4).


CHANNELS = 4


HIDDEN = 5


LEARNING_RATE = 0.1


# NNX vs linen, N devices vs 1 device: only float32 summation order may differ.
TOLERANCE = 1e-6
# Parameter gradients summed across devices (shard_map's psum) against one device's sum: the
# order differs over whole batches of terms, whose rounding reached 1.1e-6 on an AVX2 CPU.
# Only those sums get it; outputs, input cotangents and statistics keep `TOLERANCE`.
PSUM_GRADS_TOLERANCE = 1e-5


RENORM = {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}}


class Net(nnx.Module):
  """Conv -> kbn (NHWC, Keras's fused path) -> pool -> Dense -> kbn (renorm) -> Dense.

  The layers before kbn have no bias, as usual (its gradient is zero, only rounding noise).
  """

  def __init__(self, rngs: nnx.Rngs, *, axis_name: str | None = None):
    self.conv = nnx.Conv(
      IMAGE[-1], CHANNELS, kernel_size=(3, 3), padding="VALID", use_bias=False, rngs=rngs
    )
    self.bn1 = kbn_nnx.BatchNormalization(CHANNELS, momentum=0.9, axis_name=axis_name, rngs=rngs)
    self.dense = nnx.Linear(CHANNELS, HIDDEN, use_bias=False, rngs=rngs)
    self.bn2 = kbn_nnx.BatchNormalization(
      HIDDEN, momentum=0.8, axis_name=axis_name, rngs=rngs, **RENORM
    )
    self.head = nnx.Linear(HIDDEN, 1, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn1(self.conv(x)))
    h = jnp.mean(h, axis=(1, 2))
    h = nnx.relu(self.bn2(self.dense(h)))
    return self.head(h)[:, 0]


class LinenNet(nn.Module):
  """`Net` in linen, with `kbn_jax.BatchNormalization`."""

  @nn.compact
  def __call__(self, x, training: bool):
    h = nn.Conv(CHANNELS, (3, 3), padding="VALID", use_bias=False, name="conv")(x)
    h = kbn_jax.BatchNormalization(momentum=0.9, name="bn1")(h, training=training)
    h = jnp.mean(nn.relu(h), axis=(1, 2))
    h = nn.Dense(HIDDEN, use_bias=False, name="dense")(h)
    h = kbn_jax.BatchNormalization(momentum=0.8, name="bn2", **RENORM)(h, training=training)
    return nn.Dense(1, name="head")(nn.relu(h))[:, 0]


class Block(nnx.Module):
  """Dense -> kbn -> relu, for scan / remat."""

  def __init__(self, rngs: nnx.Rngs):
    self.dense = nnx.Linear(HIDDEN, HIDDEN, use_bias=False, rngs=rngs)
    self.bn = kbn_nnx.BatchNormalization(HIDDEN, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.dense(x)))


def _data(seed: int, steps: int, members: tuple[int, ...] = ()):
  """`steps` batches of images and regression targets (leading `members` axes optional)."""
  rng = np.random.default_rng(seed)
  x = 0.5 + 2.0 * rng.standard_normal(members + (steps, BATCH) + IMAGE)
  t = rng.standard_normal(members + (steps, BATCH))
  return x.astype(np.float32), t.astype(np.float32)


def _pure(tree):
  """A nested dict of NumPy arrays (from an `nnx.State` or a plain pytree)."""
  tree = jax.tree.map(
    lambda s: nnx.to_pure_dict(s) if isinstance(s, nnx.State) else s,
    tree,
    is_leaf=lambda s: isinstance(s, nnx.State),
  )
  return jax.tree.map(np.asarray, tree)


def _assert_close(actual, expected, tolerance=TOLERANCE, what=""):
  """`assert_trees_close` on the arrays of NNX states."""
  assert_trees_close(_pure(actual), _pure(expected), tolerance, what)


def _assert_close_to_one_device(actual, expected, what):
  """A sharded step's ``{y, grad_x, grads, stats}`` against one device's: `TOLERANCE`, except
  the parameter gradients that shard_map sums across devices (`PSUM_GRADS_TOLERANCE`)."""
  rest = {k: v for k, v in actual.items() if k != "grads"}
  _assert_close(rest, {k: expected[k] for k in rest}, what=what)
  _assert_close(actual["grads"], expected["grads"], PSUM_GRADS_TOLERANCE, what + "grads: ")


def _assert_identical(actual, expected, what=""):
  actual, expected = _pure(actual), _pure(expected)
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  for (path, e), a in zip(
    jax.tree.leaves_with_path(expected), jax.tree.leaves(actual), strict=True
  ):
    np.testing.assert_array_equal(a, e, err_msg=what + jax.tree_util.keystr(path))


def _stats(model):
  return _pure(nnx.state(model, nnx.BatchStat))


def _params(model):
  return _pure(nnx.state(model, nnx.Param))


def _loss(model, x, t):
  return jnp.mean((model(x) - t) ** 2)


@nnx.jit
def _train_step(model, optimizer, x, t):
  loss, grads = nnx.value_and_grad(_loss)(model, x, t)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def _forward(model, x):
  """A call in the module's mode (training updates the statistics)."""
  return model(x)


def _train(model, optimizer, x, t):
  """Runs one step per batch; returns the losses and the state after each step."""
  history = []
  for xs, ts in zip(x, t, strict=True):
    loss = _train_step(model, optimizer, xs, ts)
    history.append({"loss": np.asarray(loss), "params": _params(model), "stats": _stats(model)})
  return history


def _linen_trajectory(params, stats, x, t):
  net, tx = LinenNet(), optax.sgd(LEARNING_RATE)

  @jax.jit
  def step(params, stats, opt_state, x, t):
    def loss_fn(params):
      y, updates = net.apply(
        {"params": params, "batch_stats": stats}, x, training=True, mutable=["batch_stats"]
      )
      return jnp.mean((y - t) ** 2), updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates), stats, opt_state

  opt_state = tx.init(params)
  history = []
  for xs, ts in zip(x, t, strict=True):
    loss, params, stats, opt_state = step(params, stats, opt_state, xs, ts)
    history.append({"loss": np.asarray(loss), "params": _pure(params), "stats": _pure(stats)})
  eval_y = net.apply({"params": params, "batch_stats": stats}, x[0], training=False)
  return history, np.asarray(eval_y)


MEMBERS = 3


def _member(ensemble, i):
  graphdef, state = nnx.split(ensemble)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def _make_ensemble():
  @nnx.split_rngs(splits=MEMBERS)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return Net(rngs)

  return create(nnx.Rngs(0))


LAYERS = 3


def _block_data(seed):
  rng = np.random.default_rng(seed)
  x = (1.0 + 2.0 * rng.standard_normal((BATCH, HIDDEN))).astype(np.float32)
  cotangent = rng.standard_normal((BATCH, HIDDEN)).astype(np.float32)
  return x, cotangent


def _mesh():
  return jax.make_mesh((NUM_SHARDS,), (AXIS,))


def _cotangent_step(graphdef):
  """Pure step on ``loss = sum(y * cotangent)``: outputs, grads, new statistics."""

  def step(params, stats, x, cotangent):
    model = nnx.merge(graphdef, params, stats)

    def loss_fn(model, x):
      y = model(x)
      return jnp.sum(y * cotangent), y

    (grads, grad_x), y = nnx.grad(loss_fn, argnums=(0, 1), has_aux=True)(model, x)
    return {"y": y, "grad_x": grad_x, "grads": grads}, nnx.state(model, nnx.BatchStat)

  return step


def _one_device_history(x, cotangent):
  graphdef, params, stats = nnx.split(Net(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
  step = jax.jit(_cotangent_step(graphdef))
  history = []
  for xs, cs in zip(x, cotangent, strict=True):
    outputs, stats = step(params, stats, xs, cs)
    history.append(_pure({**outputs, "stats": stats}))
  return history


def _cotangents(seed, steps):
  return np.random.default_rng(seed).standard_normal((steps, BATCH)).astype(np.float32)


def test_jit_optimizer_training_and_eval_match_linen():
  x, t = _data(0, steps=5)
  # Repeat one batch so that the loss must go down.
  x, t = np.broadcast_to(x[:1], x.shape), np.broadcast_to(t[:1], t.shape)
  model = Net(nnx.Rngs(0))
  initial_params, initial_stats = _params(model), _stats(model)
  optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE), wrt=nnx.Param)
  history = _train(model, optimizer, x, t)

  expected, expected_eval = _linen_trajectory(initial_params, initial_stats, x, t)
  for s, (got, want) in enumerate(zip(history, expected, strict=True)):
    _assert_close(got, want, what=f"step {s}: ")
  losses = [h["loss"] for h in history]
  assert losses[-1] < 0.9 * losses[0], losses
  for name in ("bn1", "bn2"):
    for stat, value in history[-1]["stats"][name].items():
      assert not np.allclose(value, initial_stats[name][stat]), (name, stat)
  assert set(history[-1]["stats"]["bn2"]) == {
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
  }

  # Eval: the moving statistics, which stay as they are.
  model.eval()
  y = _forward(model, x[0])
  _assert_close(y, expected_eval, what="eval: ")
  _assert_identical(_stats(model), history[-1]["stats"], "stats after eval: ")
  # Back to training: one more step moves the statistics again.
  model.train()
  _forward(model, x[0])
  assert not np.allclose(
    _stats(model)["bn1"]["moving_mean"], history[-1]["stats"]["bn1"]["moving_mean"]
  )


def test_split_merge_state_update_round_trip():
  model = Net(nnx.Rngs(0))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  shapes = {"bn1": (CHANNELS,), "bn2": (HIDDEN,)}
  for layer, shape in shapes.items():
    for name in ("gamma", "beta"):
      assert isinstance(params[layer][name], nnx.Param), (layer, name)
      assert params[layer][name].get_value().shape == shape
    for name in ("moving_mean", "moving_variance"):
      assert isinstance(stats[layer][name], nnx.BatchStat), (layer, name)
      assert stats[layer][name].get_value().shape == shape
    assert not set(params[layer]) & set(stats[layer])
  assert set(stats["bn2"]) >= {"moving_stddev", "renorm_mean", "renorm_stddev"}
  # Nothing of a kbn layer falls outside Param / BatchStat.
  *_, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  assert not jax.tree.leaves(rest)

  # A pure training function: merge, call, return the new statistics.
  x, _ = _data(1, steps=1)
  initial_stats = _stats(model)
  eager = nnx.clone(model)  # independent Variables (nnx.split/merge share them)

  @jax.jit
  def pure_forward(params, stats, x):
    inner = nnx.merge(graphdef, params, stats)
    return inner(x), nnx.state(inner, nnx.BatchStat)

  y_pure, new_stats = pure_forward(params, stats, x[0])
  assert isinstance(new_stats["bn1"]["moving_mean"], nnx.BatchStat)
  y = eager(x[0])
  _assert_close(y_pure, y, what="y: ")
  _assert_close(new_stats, nnx.state(eager, nnx.BatchStat), what="stats: ")
  # The model itself saw nothing of the pure call.
  _assert_identical(_stats(model), initial_stats)
  assert not np.allclose(_stats(eager)["bn1"]["moving_mean"], initial_stats["bn1"]["moving_mean"])

  # nnx.update writes the new statistics into the model; then model == eager twin.
  nnx.update(model, new_stats)
  _assert_close(_stats(model), _stats(eager))
  model.eval()
  eager.eval()
  _assert_close(model(x[0]), eager(x[0]), what="eval: ")
  _assert_close(_stats(model), _stats(eager), what="stats after eval: ")

  # nnx.update with modified params reaches the kbn attributes.
  before = _params(model)
  nnx.update(model, jax.tree.map(lambda a: 2 * a + 1, nnx.state(model, nnx.Param)))
  for layer in ("bn1", "bn2"):
    for name in ("gamma", "beta"):
      got = getattr(getattr(model, layer), name)
      assert isinstance(got, nnx.Param)
      np.testing.assert_array_equal(got[...], 2 * before[layer][name] + 1)

  # merge of a full split (a copy of the state) rebuilds an independent, equal module.
  graphdef, state = nnx.split(model)
  clone = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  _assert_identical(nnx.state(clone), nnx.state(model))
  assert clone.bn1.use_running_average and clone.bn2.momentum == 0.8 and clone.bn2.renorm
  _assert_identical(clone(x[0]), model(x[0]))
  clone.train()
  clone(x[0])
  assert not np.allclose(_stats(clone)["bn1"]["moving_mean"], _stats(model)["bn1"]["moving_mean"])


def test_orbax_checkpoint_resumes_exactly(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")  # a test extra; the lowest-versions lane lacks it
  x, t = _data(2, steps=4)

  def tx():
    return optax.sgd(LEARNING_RATE, momentum=0.9)  # optimizer state matters too

  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)
  _train(model, optimizer, x[:2], t[:2])
  path = tmp_path / "checkpoint"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
    checkpointer.wait_until_finished()
  uninterrupted = _train(model, optimizer, x[2:], t[2:])

  # A fresh model (different initial weights), built abstractly and restored.
  abstract_model = nnx.eval_shape(lambda: Net(nnx.Rngs(1)))
  abstract_optimizer = nnx.eval_shape(lambda: nnx.Optimizer(Net(nnx.Rngs(1)), tx(), wrt=nnx.Param))
  model_def, model_state = nnx.split(abstract_model)
  optimizer_def, optimizer_state = nnx.split(abstract_optimizer)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, {"model": model_state, "optimizer": optimizer_state})
  resumed_model = nnx.merge(model_def, restored["model"])
  resumed_optimizer = nnx.merge(optimizer_def, restored["optimizer"])
  assert isinstance(resumed_model.bn2.renorm_stddev, nnx.BatchStat)
  resumed = _train(resumed_model, resumed_optimizer, x[2:], t[2:])
  _assert_identical(resumed, uninterrupted)

  # Restoring into a concrete fresh model with nnx.update works the same way.
  fresh = Net(nnx.Rngs(3))
  fresh_optimizer = nnx.Optimizer(fresh, tx(), wrt=nnx.Param)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(
      path, {"model": nnx.state(fresh), "optimizer": nnx.state(fresh_optimizer)}
    )
  nnx.update(fresh, restored["model"])
  nnx.update(fresh_optimizer, restored["optimizer"])
  _assert_identical(_train(fresh, fresh_optimizer, x[2:], t[2:]), uninterrupted)


def test_vmap_ensemble_forward_matches_each_member():
  ensemble = _make_ensemble()
  members = [_member(ensemble, i) for i in range(MEMBERS)]
  assert ensemble.bn1.gamma.get_value().shape == (MEMBERS, CHANNELS)
  assert ensemble.bn2.moving_stddev.get_value().shape == (MEMBERS, HIDDEN)
  # Split rngs: the members start from different weights.
  assert not np.allclose(members[0].conv.kernel[...], members[1].conv.kernel[...])
  x, _ = _data(3, steps=1)

  @nnx.jit
  @nnx.vmap(in_axes=(0, None), out_axes=0)
  def forward(model, x):  # one shared batch, as in flax#4760
    return model(x)

  y = forward(ensemble, x[0])
  for i, member in enumerate(members):
    _assert_close(y[i], _forward(member, x[0]), what=f"member {i} y: ")
    _assert_close(_stats(_member(ensemble, i)), _stats(member), what=f"member {i} stats: ")
  ensemble.eval()
  trained_stats = _stats(ensemble)
  y = forward(ensemble, x[0])
  _assert_identical(_stats(ensemble), trained_stats, "eval changed the statistics: ")
  for i, member in enumerate(members):
    member.eval()
    _assert_close(y[i], _forward(member, x[0]), what=f"member {i} eval: ")


def test_vmap_ensemble_training_matches_each_member():
  ensemble = _make_ensemble()
  members = [_member(ensemble, i) for i in range(MEMBERS)]
  x, t = _data(4, steps=3, members=(MEMBERS,))  # each member its own batches
  optimizer = nnx.Optimizer(ensemble, optax.sgd(LEARNING_RATE), wrt=nnx.Param)

  @nnx.jit
  def ensemble_step(ensemble, optimizer, x, t):
    def loss_fn(ensemble):
      losses = nnx.vmap(_loss, in_axes=(0, 0, 0))(ensemble, x, t)
      return jnp.sum(losses), losses

    (_, losses), grads = nnx.value_and_grad(loss_fn, has_aux=True)(ensemble)
    optimizer.update(ensemble, grads)
    return losses

  losses = [ensemble_step(ensemble, optimizer, x[:, s], t[:, s]) for s in range(x.shape[1])]
  for i, member in enumerate(members):
    alone = _train(
      member, nnx.Optimizer(member, optax.sgd(LEARNING_RATE), wrt=nnx.Param), x[i], t[i]
    )
    _assert_close([np.asarray(loss)[i] for loss in losses], [h["loss"] for h in alone])
    final = _member(ensemble, i)
    _assert_close(_params(final), alone[-1]["params"], what=f"member {i} params: ")
    _assert_close(_stats(final), alone[-1]["stats"], what=f"member {i} stats: ")


def test_eval_shape_gives_the_real_structure():
  abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
  real = Net(nnx.Rngs(0))
  assert isinstance(abstract.bn1.gamma, nnx.Param)
  assert isinstance(abstract.bn2.renorm_mean, nnx.BatchStat)
  abstract_state, real_state = nnx.state(abstract), nnx.state(real)
  assert jax.tree.structure(abstract_state) == jax.tree.structure(real_state)
  for a, r in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(real_state), strict=True):
    assert isinstance(a, jax.ShapeDtypeStruct), type(a)
    assert (a.shape, a.dtype) == (r.shape, r.dtype)

  # Random initializers and multi-axis features too, without computing anything.
  layer = nnx.eval_shape(
    lambda: kbn_nnx.BatchNormalization(
      (3, 2), axis=[1, 3], gamma_initializer="random_normal", rngs=nnx.Rngs(0)
    )
  )
  assert layer.gamma.get_value().shape == (3, 2)
  assert isinstance(layer.gamma.get_value(), jax.ShapeDtypeStruct)
  assert layer.moving_variance.get_value().shape == (3, 2)


def test_scan_over_stacked_layers_equals_unrolled_loop():
  @nnx.split_rngs(splits=LAYERS)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return Block(rngs)

  stack = create(nnx.Rngs(0))
  blocks = [_member(stack, i) for i in range(LAYERS)]
  x, cotangent = _block_data(5)

  def scanned(stack, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(block, h):
      return block(h)

    return body(stack, x)

  def unrolled(blocks, x):
    for block in blocks:
      x = block(x)
    return x

  def loss(forward):
    return lambda model, x: jnp.sum(forward(model, x) * cotangent)

  for step in range(2):
    grad_stack, grad_x = nnx.jit(nnx.grad(loss(scanned), argnums=(0, 1)))(stack, x)
    grad_blocks, grad_x_unrolled = nnx.grad(loss(unrolled), argnums=(0, 1))(blocks, x)
    _assert_close(grad_x, grad_x_unrolled, what=f"step {step} grad_x: ")
    for i in range(LAYERS):
      _assert_close(
        jax.tree.map(lambda a, i=i: a[i], _pure(grad_stack)),
        _pure(grad_blocks[i]),
        what=f"step {step} layer {i} grads: ",
      )
      _assert_close(_stats(_member(stack, i)), _stats(blocks[i]), what=f"layer {i} stats: ")
    assert not np.allclose(_stats(stack)["bn"]["moving_mean"][0], 0.0)

  stack.eval()
  for block in blocks:
    block.eval()
  trained_stats = _stats(stack)
  _assert_close(nnx.jit(scanned)(stack, x), unrolled(blocks, x), what="eval: ")
  _assert_identical(_stats(stack), trained_stats, "eval changed the statistics: ")


def test_remat_block_equals_plain_block():
  block = Block(nnx.Rngs(0))
  twin = nnx.clone(block)
  x, cotangent = _block_data(6)

  def loss(block, x):
    return jnp.sum(block(x) * cotangent)

  @nnx.remat
  def remat_forward(block, x):
    return block(x)

  def remat_loss(block, x):
    return jnp.sum(remat_forward(block, x) * cotangent)

  for step in range(2):
    grads, grad_x = nnx.jit(nnx.grad(remat_loss, argnums=(0, 1)))(block, x)
    grads_plain, grad_x_plain = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(twin, x)
    _assert_close(grads, grads_plain, what=f"step {step} grads: ")
    _assert_close(grad_x, grad_x_plain, what=f"step {step} grad_x: ")
    _assert_close(_stats(block), _stats(twin), what=f"step {step} stats: ")
  assert not np.allclose(_stats(block)["bn"]["moving_variance"], 1.0)
  # The remat really is there.
  graphdef, state = nnx.split(block)
  jaxpr = jax.make_jaxpr(jax.grad(lambda state: remat_loss(nnx.merge(graphdef, state), x)))(state)
  assert "checkpoint" in str(jaxpr) or "remat" in str(jaxpr)


def test_jax_shard_map_matches_one_device():
  x, _ = _data(7, steps=2)
  cotangent = _cotangents(8, steps=2)
  mesh = _mesh()
  model = Net(nnx.Rngs(0), axis_name=AXIS)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  step = _cotangent_step(graphdef)

  def per_device(params, stats, x, cotangent):
    outputs, new_stats = step(params, stats, x, cotangent)
    # Each device returns its own copy of the statistics, one row per device.
    return outputs, jax.tree.map(lambda a: a[None], new_stats)

  sharded = jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS)),
      out_specs=({"y": P(AXIS), "grad_x": P(AXIS), "grads": P()}, P(AXIS)),
    )
  )
  expected = _one_device_history(x, cotangent)
  initial_stats = _stats(model)
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  params, stats = jax.device_put((params, stats), replicated)
  for s in range(2):
    outputs, rows = sharded(
      params, stats, jax.device_put(x[s], batch), jax.device_put(cotangent[s], batch)
    )
    for leaf in jax.tree.leaves(_pure(rows)):
      assert leaf.shape[0] == NUM_SHARDS
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
    stats = jax.device_put(jax.tree.map(lambda a: np.asarray(a)[0], rows), replicated)
    _assert_close_to_one_device({**_pure(outputs), "stats": stats}, expected[s], f"step {s}: ")
  # The module takes the statistics back with nnx.update.
  _assert_identical(_stats(model), initial_stats)
  nnx.update(model, stats)
  _assert_close(_stats(model), expected[-1]["stats"], what="model: ")


def test_nnx_shard_map_matches_one_device():
  x, _ = _data(9, steps=2)
  cotangent = _cotangents(10, steps=2)
  mesh = _mesh()
  model = Net(nnx.Rngs(0), axis_name=AXIS)

  @nnx.jit
  @nnx.shard_map(
    mesh=mesh,
    in_specs=(P(), P(AXIS), P(AXIS)),
    out_specs=({"y": P(AXIS), "grad_x": P(AXIS), "grads": P()}),
  )
  def sharded(model, x, cotangent):
    def loss_fn(model, x):
      y = model(x)
      return jnp.sum(y * cotangent), y

    (grads, grad_x), y = nnx.grad(loss_fn, argnums=(0, 1), has_aux=True)(model, x)
    return {"y": y, "grad_x": grad_x, "grads": grads}

  expected = _one_device_history(x, cotangent)
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  nnx.update(model, jax.device_put(nnx.state(model), replicated))
  for s in range(2):
    outputs = sharded(model, jax.device_put(x[s], batch), jax.device_put(cotangent[s], batch))
    _assert_close_to_one_device(
      {**_pure(outputs), "stats": _stats(model)}, expected[s], f"step {s}: "
    )


def test_sharded_nnx_jit_matches_one_device():
  x, t = _data(11, steps=3)
  mesh = _mesh()
  batch = NamedSharding(mesh, P(AXIS))
  replicated = NamedSharding(mesh, P())

  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE), wrt=nnx.Param)
  expected = _train(model, optimizer, x, t)

  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE), wrt=nnx.Param)
  for module in (model, optimizer):
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, replicated))
  history = []
  for s in range(x.shape[0]):
    loss = _train_step(model, optimizer, jax.device_put(x[s], batch), jax.device_put(t[s], batch))
    assert model.bn1.moving_mean.get_value().sharding.is_fully_replicated
    history.append({"loss": np.asarray(loss), "params": _params(model), "stats": _stats(model)})
  _assert_close(history, expected)
  # Sharded eval too.
  model.eval()
  y = _forward(model, jax.device_put(x[0], batch))
  reference = Net(nnx.Rngs(0))
  nnx.update(reference, jax.device_get(nnx.state(model)))
  reference.eval()
  _assert_close(y, _forward(reference, x[0]), what="eval: ")


def test_jax_export_inference_equals_direct_call():
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE), wrt=nnx.Param)
  x, t = _data(12, steps=2)
  _train(model, optimizer, x, t)  # moving statistics away from their initial values
  model.eval()
  graphdef, state = nnx.split(model)
  weights, treedef = jax.tree.flatten(state)  # a plain list of arrays for the exported function

  def infer(weights, x):
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))(x)

  direct = infer(weights, x[0])
  _assert_close(direct, _forward(model, x[0]), what="direct: ")
  exported = jax.export.export(jax.jit(infer))(weights, x[0])
  restored = jax.export.deserialize(exported.serialize())
  np.testing.assert_allclose(restored.call(weights, x[0]), direct, rtol=1e-6, atol=1e-6)

  # A symbolic batch size: inference does not depend on it.
  (b,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b,) + IMAGE, jnp.float32)
  polymorphic = jax.export.deserialize(jax.export.export(jax.jit(infer))(weights, spec).serialize())
  for size in (3, BATCH):
    np.testing.assert_allclose(
      polymorphic.call(weights, x[1][:size]), infer(weights, x[1][:size]), rtol=1e-6, atol=1e-6
    )
