"""Issue 10 item 5 and 6: the linen Module's mode, variables and Flax tooling.

* Flax's mode attribute ``use_running_average`` (the ``functools.partial`` idiom,
  ``nn.Sequential``), the call's ``training`` against it, Keras's ``training=None``;
* a forgotten mode with ``batch_stats`` mutable raises; a training apply without ``batch_stats``
  raises, needs no ``params`` PRNG and never re-initializes;
* ``Module.tabulate`` (``show_repeated``, ``compute_flops``), ``module_paths``, ``nn.tabulate``
  and ``jax.eval_shape`` of ``init`` on models that contain the layer;
* ``training`` errors (traced, string), ``semantics`` with ``trainable=False``, and PyTorch's
  cumulative average.
"""

from __future__ import annotations

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kbn_jax


def _x(shape=(8, 3), seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(0.5, 2.0, shape), jnp.float32)


# --------------------------------------------------------------------------------------------
# use_running_average
# --------------------------------------------------------------------------------------------


class _PartialNet(nn.Module):
  """The ``functools.partial(nn.BatchNorm, use_running_average=not train)`` idiom."""

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(kbn_jax.BatchNormalization, use_running_average=not train)
    x = nn.Dense(4)(x)
    x = norm(momentum=0.9)(x)
    return norm(momentum=0.9, name="second")(nn.relu(x))


def test_partial_idiom_trains_and_infers():
  x = _x()
  model = _PartialNet()
  variables = model.init(jax.random.key(0), x, train=False)
  y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  stats = updates["batch_stats"]
  for name in ("BatchNormalization_0", "second"):
    assert not np.allclose(
      stats[name]["moving_mean"], variables["batch_stats"][name]["moving_mean"]
    )
  # Training normalizes with batch statistics: the last layer's output has batch mean ~beta = 0.
  np.testing.assert_allclose(jnp.mean(y, axis=0), 0.0, atol=1e-5)
  # Inference reads the moving statistics; nothing to mutate.
  y_infer = model.apply({**variables, "batch_stats": stats}, x, train=False)
  assert not np.allclose(y_infer, y, atol=1e-3)


def test_sequential_with_use_running_average_false_trains():
  x = _x((16, 5))
  model = nn.Sequential([nn.Dense(4), kbn_jax.BatchNormalization(use_running_average=False)])
  variables = model.init(jax.random.key(0), x)
  y, updates = model.apply(variables, x, mutable=["batch_stats"])
  hidden = nn.Dense(4).apply({"params": variables["params"]["layers_0"]}, x)
  stats = updates["batch_stats"]["layers_1"]
  np.testing.assert_allclose(stats["moving_mean"], 0.01 * jnp.mean(hidden, axis=0), rtol=1e-5)
  np.testing.assert_allclose(
    stats["moving_variance"], 0.99 + 0.01 * jnp.var(hidden, axis=0), rtol=1e-5
  )
  np.testing.assert_allclose(jnp.mean(y, axis=0), 0.0, atol=1e-5)


def test_sequential_with_use_running_average_true_is_inference():
  x = _x((16, 5))
  model = nn.Sequential([nn.Dense(4), kbn_jax.BatchNormalization(use_running_average=True)])
  variables = model.init(jax.random.key(0), x)
  y, updates = model.apply(variables, x, mutable=["batch_stats"])
  chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
  hidden = nn.Dense(4).apply({"params": variables["params"]["layers_0"]}, x)
  np.testing.assert_allclose(y, hidden / np.sqrt(1.0 + 1e-3), rtol=1e-6)


@pytest.mark.parametrize("use_running_average", [None, True, False])
@pytest.mark.parametrize("training", [None, True, False])
def test_call_training_against_the_attribute(use_running_average, training):
  """``training=None`` defers to the attribute; agreeing values work; contradicting raise."""
  x = _x()
  layer = kbn_jax.BatchNormalization(use_running_average=use_running_average, momentum=0.5)
  variables = layer.init(jax.random.key(0), x)
  contradicts = (
    training is not None and use_running_average is not None and training == use_running_average
  )
  if contradicts:
    with pytest.raises(ValueError, match="contradicts `use_running_average`"):
      layer.apply(variables, x, training=training, mutable=["batch_stats"])
    return
  _, updates = layer.apply(variables, x, training=training, mutable=["batch_stats"])
  if training is None:
    trains = use_running_average is False
  else:
    trains = training
  changed = not np.allclose(
    updates["batch_stats"]["moving_mean"], variables["batch_stats"]["moving_mean"]
  )
  assert changed == trains


def test_call_training_overrides_an_unset_attribute_per_call():
  x = _x()
  layer = kbn_jax.BatchNormalization(momentum=0.5)
  variables = layer.init(jax.random.key(0), x)
  y_train, _ = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  y_infer = layer.apply(variables, x, training=False)
  np.testing.assert_allclose(jnp.mean(y_train, axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y_infer, x / np.sqrt(1.0 + 1e-3), rtol=1e-6)


def test_bad_use_running_average_names_the_attribute():
  with pytest.raises((TypeError, ValueError), match="use_running_average"):
    kbn_jax.BatchNormalization(use_running_average="yes")


# --------------------------------------------------------------------------------------------
# A forgotten mode; Keras's training=None
# --------------------------------------------------------------------------------------------


def test_forgotten_mode_with_mutable_batch_stats_raises():
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="No mode was given: pass `training=True`"):
    layer.apply(variables, x, mutable=["batch_stats"])
  with pytest.raises(ValueError, match="use_running_average"):
    layer.apply(variables, x, mutable=True)


def test_forgotten_mode_in_a_model_raises():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return kbn_jax.BatchNormalization()(nn.Dense(3)(x))

  x = _x()
  variables = Net().init(jax.random.key(0), x)  # init itself is fine
  with pytest.raises(ValueError, match="No mode was given"):
    Net().apply(variables, x, mutable=["batch_stats"])


def test_explicit_training_none_is_keras_inference():
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)
  y, updates = layer.apply(variables, x, training=None, mutable=["batch_stats"])
  chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(y, x / np.sqrt(1.0 + 1e-3), rtol=1e-6)


def test_no_mode_without_mutable_batch_stats_is_inference():
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)
  np.testing.assert_allclose(layer.apply(variables, x), x / np.sqrt(1.0 + 1e-3), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Missing batch_stats
# --------------------------------------------------------------------------------------------

_MISSING = r"`batch_stats` .*not found.*as `init` returned them"


@pytest.mark.parametrize("rngs", [None, "params"], ids=["no_rngs", "params_rng"])
@pytest.mark.parametrize("training", [True, False])
def test_missing_batch_stats_raises_and_never_reinitializes(rngs, training):
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)
  kwargs = {} if rngs is None else {"rngs": {"params": jax.random.key(1)}}
  with pytest.raises(ValueError, match=_MISSING):
    layer.apply(
      {"params": variables["params"]}, x, training=training, mutable=["batch_stats"], **kwargs
    )


def test_missing_batch_stats_in_a_model_names_the_layer():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, training=False):
      return kbn_jax.BatchNormalization(name="bn")(nn.Dense(3)(x), training=training)

  x = _x()
  variables = Net().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"`batch_stats` of BatchNormalization 'bn' not found"):
    Net().apply(
      {"params": variables["params"]},
      x,
      training=True,
      mutable=["batch_stats"],
      rngs={"params": jax.random.key(1)},
    )


def test_random_statistic_initializer_needs_no_key_at_apply():
  """A random moving-mean initializer draws at ``init`` only, never in a training apply."""
  x = _x()
  layer = kbn_jax.BatchNormalization(moving_mean_initializer="random_normal")
  variables = layer.init(jax.random.key(0), x)
  _, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  assert updates["batch_stats"]["moving_mean"].shape == (3,)
  with pytest.raises(ValueError, match=_MISSING):
    layer.apply(
      {"params": variables["params"]},
      x,
      training=True,
      mutable=["batch_stats"],
      rngs={"params": jax.random.key(1)},
    )


# --------------------------------------------------------------------------------------------
# Flax tooling: tabulate, module_paths, eval_shape
# --------------------------------------------------------------------------------------------


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, training: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(kbn_jax.BatchNormalization(renorm=True)(x, training=training))
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(kbn_jax.BatchNormalization(virtual_batch_size=2)(x, training=training))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


_CONSOLE = {"width": 400, "force_terminal": False, "no_color": True}


def _table_rows(table: str) -> tuple[list[str], list[list[str]]]:
  """The header and the body lines of a rich table, as cells (the first line of each row holds
  its path and module)."""
  header, rows = [], []
  for line in table.splitlines():
    if line.startswith("┃"):
      header = [cell.strip() for cell in line.strip("┃").split("┃")]
    elif line.startswith("│"):
      rows.append([cell.strip() for cell in line.strip("│").split("│")])
  return header, rows


@pytest.mark.parametrize("training", [False, True])
def test_tabulate_with_show_repeated_and_flops(training):
  x = jnp.ones((4, 6, 6, 2), jnp.float32)
  table = _ConvNet().tabulate(
    jax.random.key(0),
    x,
    training=training,
    show_repeated=True,
    compute_flops=True,
    compute_vjp_flops=True,
    console_kwargs=_CONSOLE,
  )
  header, rows = _table_rows(table)
  path_col, module_col = header.index("path"), header.index("module")
  bn_rows = [r for r in rows if r[module_col] == "BatchNormalization"]
  assert [r[path_col] for r in bn_rows] == ["BatchNormalization_0", "BatchNormalization_1"]
  assert sum("BatchNormalization" in line for line in table.splitlines()) == 2, table
  for helper in ("_mode", "_variables", "_train", "nowrap"):
    assert helper not in table
  flops_col = header.index("flops")
  assert all(int(r[flops_col]) > 0 for r in bn_rows)
  assert "moving_mean" in table and "renorm_stddev" in table


def test_nn_tabulate_function():
  x = jnp.ones((4, 6, 6, 2), jnp.float32)
  tabulate = nn.tabulate(_ConvNet(), jax.random.key(0), show_repeated=True, console_kwargs=_CONSOLE)
  table = tabulate(x, training=True)
  assert len(re.findall(r"│ BatchNormalization_\d", table)) == 2, table


def test_module_paths_lists_only_the_layers():
  paths = _ConvNet().module_paths(jax.random.key(0), jnp.ones((4, 6, 6, 2), jnp.float32))
  assert list(paths) == [
    "",
    "Conv_0",
    "BatchNormalization_0",
    "Conv_1",
    "BatchNormalization_1",
    "Dense_0",
  ]
  assert isinstance(paths["BatchNormalization_0"], kbn_jax.BatchNormalization)


def test_eval_shape_of_init():
  x = jnp.ones((4, 6, 6, 2), jnp.float32)
  shapes = jax.eval_shape(_ConvNet().init, jax.random.key(0), x)
  variables = _ConvNet().init(jax.random.key(0), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, variables)
  stats = shapes["batch_stats"]["BatchNormalization_0"]
  assert set(stats) == {
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
  }
  chex.assert_shape(list(stats.values()), (4,))


def test_capture_intermediates_sees_the_layer_output():
  x = jnp.ones((4, 6, 6, 2), jnp.float32)
  variables = _ConvNet().init(jax.random.key(0), x)
  _, state = _ConvNet().apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  out = state["intermediates"]["BatchNormalization_1"]["__call__"][0]
  chex.assert_shape(out, (4, 6, 6, 4))
  assert set(state["intermediates"]["BatchNormalization_1"]) == {"__call__"}


# --------------------------------------------------------------------------------------------
# training errors
# --------------------------------------------------------------------------------------------


def test_traced_training_error_names_both_static_arguments():
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)

  @jax.jit
  def step(variables, x, training):
    return layer.apply(variables, x, training=training, mutable=["batch_stats"])

  with pytest.raises(TypeError, match="static_argnames") as error:
    step(variables, x, True)
  assert "static_argnums" in str(error.value)
  assert "traced" in str(error.value)


def test_traced_training_error_of_the_pure_function():
  from kbn_jax import functional  # noqa: PLC0415

  config = functional.BatchNormConfig()
  x = _x()
  params, stats = functional.init_variables(config, jax.random.key(0), x.shape)
  step = jax.jit(
    lambda x, training: functional.batch_normalization(x, params, stats, config, training=training)
  )
  with pytest.raises(TypeError, match="static_argnames") as error:
    step(x, True)
  assert "static_argnums" in str(error.value)


@pytest.mark.parametrize("value", ["True", "False"])
def test_string_training_says_it_is_a_string(value):
  x = _x()
  layer = kbn_jax.BatchNormalization()
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(TypeError, match=rf"`training`='{value}' must be a Python bool, not a string"):
    layer.apply(variables, x, training=value, mutable=["batch_stats"])


# --------------------------------------------------------------------------------------------
# Other semantics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("semantics", ["keras_v2", "keras3"])
def test_frozen_layer_trains_as_inference(semantics):
  x = _x((8, 3))
  layer = kbn_jax.BatchNormalization(
    trainable=False,
    semantics=semantics,
    moving_mean_initializer={"class_name": "Constant", "config": {"value": 0.5}},
    moving_variance_initializer={"class_name": "Constant", "config": {"value": 2.0}},
    gamma_initializer={"class_name": "Constant", "config": {"value": 1.5}},
  )
  variables = layer.init(jax.random.key(0), x)
  y_train, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  y_infer = layer.apply(variables, x, training=False)
  chex.assert_trees_all_equal(y_train, y_infer)
  chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(y_infer, (x - 0.5) / np.sqrt(2.0 + 1e-3) * 1.5, rtol=1e-5)


def test_frozen_v1_layer_still_uses_batch_statistics():
  x = _x((8, 3))
  layer = kbn_jax.BatchNormalization(trainable=False)
  variables = layer.init(jax.random.key(0), x)
  y_train, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(jnp.mean(y_train, axis=0), 0.0, atol=1e-5)


def test_torch_cumulative_average_over_three_steps():
  """``momentum=None`` under ``semantics="torch"``: the running statistics are the plain means
  of the batch means and of the unbiased batch variances; ``num_batches_tracked`` counts."""
  layer = kbn_jax.BatchNormalization(semantics="torch", momentum=None, epsilon=1e-5)
  rng = np.random.default_rng(5)
  batches = [rng.normal(i, 1.0 + i, (6, 3)).astype(np.float32) for i in range(3)]
  variables = layer.init(jax.random.key(0), jnp.asarray(batches[0]))
  assert int(variables["batch_stats"]["num_batches_tracked"]) == 0
  step = jax.jit(
    lambda variables, x: layer.apply(variables, x, training=True, mutable=["batch_stats"])
  )
  for x in batches:
    _, updates = step(variables, jnp.asarray(x))
    variables = {**variables, **updates}
  stats = variables["batch_stats"]
  batches64 = [b.astype(np.float64) for b in batches]
  expected_mean = np.mean([b.mean(axis=0) for b in batches64], axis=0)
  expected_variance = np.mean([b.var(axis=0, ddof=1) for b in batches64], axis=0)
  np.testing.assert_allclose(stats["moving_mean"], expected_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["moving_variance"], expected_variance, rtol=1e-5)
  assert int(stats["num_batches_tracked"]) == 3
  assert jnp.issubdtype(stats["num_batches_tracked"].dtype, jnp.integer)
