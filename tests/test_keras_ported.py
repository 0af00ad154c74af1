"""Keras's own V1 numeric tests (spec §7), rewritten against float64 NumPy references.

Each test names the Keras test it ports. Tolerances are Keras's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kbn_jax


def _train(layer, variables, x, **kwargs):
  y, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"], **kwargs)
  return y, {**variables, **updates}


def _const(value):
  return {"class_name": "Constant", "config": {"value": value}}


# legacy_tf_layers/normalization_test.py ---------------------------------------------------------


def test_renorm():  # testRenorm
  shape, eps, momentum, renorm_momentum = (4, 3), 0.001, 0.99, 0.8
  rmax, rmin, dmax = 1.1, 0.9, 0.1
  gamma, beta = 2.0, 3.0
  layer = kbn_jax.BatchNormalization(
    axis=1,
    gamma_initializer=_const(gamma),
    beta_initializer=_const(beta),
    epsilon=eps,
    momentum=momentum,
    renorm=True,
    renorm_clipping={"rmax": rmax, "rmin": rmin, "dmax": dmax},
    renorm_momentum=renorm_momentum,
  )
  rng = np.random.default_rng(1)
  variables = layer.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))
  moving_mean, moving_stddev = 0.0, 1.0
  renorm_mean, renorm_stddev = 0.0, 1.0
  for _ in range(5):
    x = rng.random(shape).astype(np.float32)
    mean, stddev = x.mean(0), np.sqrt(x.var(0) + eps)
    r = np.clip(stddev / renorm_stddev, rmin, rmax)
    d = np.clip((mean - renorm_mean) / renorm_stddev, -dmax, dmax)
    y_train = ((x - mean) / stddev * r + d) * gamma + beta
    renorm_mean += (mean - renorm_mean) * (1 - renorm_momentum)
    renorm_stddev += (stddev - renorm_stddev) * (1 - renorm_momentum)
    moving_mean += (mean - moving_mean) * (1 - momentum)
    moving_stddev += (stddev - moving_stddev) * (1 - momentum)
    y_test = (x - moving_mean) / moving_stddev * gamma + beta

    y, variables = _train(layer, variables, x)
    np.testing.assert_allclose(y, y_train, atol=1e-5)
    np.testing.assert_allclose(layer.apply(variables, x), y_test, atol=1e-5)


def test_renorm_no_clipping_same_momentum_gives_same_test_train():
  # testRenormNoClippingSameMomentumGivesSameTestTrain
  shape, eps, momentum = (4, 3), 0.003, 0.9
  layer = kbn_jax.BatchNormalization(
    axis=1, epsilon=eps, momentum=momentum, renorm=True, renorm_momentum=momentum
  )
  rng = np.random.default_rng(2)
  variables = layer.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))
  moving_mean, moving_stddev = 0.0, 1.0
  for step in range(5):
    x = rng.random(shape).astype(np.float32)
    mean, stddev = x.mean(0), np.sqrt(x.var(0) + eps)
    y_ref = (x - moving_mean) / moving_stddev  # r and d make train equal test
    y_test = layer.apply(variables, x)
    y_train, variables = _train(layer, variables, x)
    atol = 1.5 * eps if step == 0 else 1e-5
    np.testing.assert_allclose(y_train, y_ref, atol=atol)
    np.testing.assert_allclose(y_test, y_ref, atol=atol)
    moving_mean += (mean - moving_mean) * (1 - momentum)
    moving_stddev += (stddev - moving_stddev) * (1 - momentum)


def _adjustment_arrays(rng, channels):
  return (
    rng.uniform(0.5, 1.5, channels).astype(np.float32),
    rng.uniform(-0.2, 0.2, channels).astype(np.float32),
  )


@pytest.mark.parametrize("renorm", [False, True], ids=["adjustment", "renorm_with_adjustment"])
def test_adjustment(renorm):  # testAdjustment, testRenormWithAdjustment
  shape, eps, momentum, renorm_momentum = (4, 3), 0.001, 0.99, 0.8
  gamma, beta, rmax, rmin, dmax = 2.0, 3.0, 1.1, 0.9, 0.1
  rng = np.random.default_rng(3)
  adjust = {}
  seen_shapes = []

  def adjustment(shape):
    seen_shapes.append(shape)
    return jnp.asarray(adjust["scale"]), jnp.asarray(adjust["bias"])

  layer = kbn_jax.BatchNormalization(
    axis=1,
    gamma_initializer=_const(gamma),
    beta_initializer=_const(beta),
    epsilon=eps,
    momentum=momentum,
    adjustment=adjustment,
    renorm=renorm,
    renorm_clipping={"rmax": rmax, "rmin": rmin, "dmax": dmax} if renorm else None,
    renorm_momentum=renorm_momentum,
  )
  variables = layer.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))
  moving_mean, moving_variance, moving_stddev = 0.0, 1.0, 1.0
  renorm_mean, renorm_stddev = 0.0, 1.0
  for _ in range(5):
    x = rng.random(shape).astype(np.float32)
    adjust["scale"], adjust["bias"] = _adjustment_arrays(rng, 3)
    mean, variance = x.mean(0), x.var(0)
    stddev = np.sqrt(variance + eps)
    x_hat = (x - mean) / stddev
    if renorm:
      r = np.clip(stddev / renorm_stddev, rmin, rmax)
      d = np.clip((mean - renorm_mean) / renorm_stddev, -dmax, dmax)
      x_hat = x_hat * r + d
      renorm_mean += (mean - renorm_mean) * (1 - renorm_momentum)
      renorm_stddev += (stddev - renorm_stddev) * (1 - renorm_momentum)
      moving_stddev += (stddev - moving_stddev) * (1 - momentum)
      moving_variance = moving_stddev**2 - eps
    else:
      moving_variance += (variance - moving_variance) * (1 - momentum)
    moving_mean += (mean - moving_mean) * (1 - momentum)
    y_train = (x_hat * adjust["scale"] + adjust["bias"]) * gamma + beta
    y_test = (x - moving_mean) / np.sqrt(moving_variance + eps) * gamma + beta

    y, variables = _train(layer, variables, x)
    np.testing.assert_allclose(y, y_train, atol=1e-5)
    np.testing.assert_allclose(layer.apply(variables, x), y_test, atol=1e-5)
  assert seen_shapes[-1] == shape  # Keras passes the input's shape


@pytest.mark.parametrize(
  "shape, axis, virtual_batch_size, atol",
  [
    ((6, 2), -1, 3, 1e-5),  # testGhostBN2Dims
    ((6, 10, 10, 3), 3, 2, 1e-2),  # testGhostBN4DimsAxis3
    ((6, 3, 10, 10), 1, 2, 1e-2),  # testGhostBN4DimsAxis1
    ((6, 3, 10, 10, 4), [1, 4], 3, 1e-2),  # testGhostBN5DimsMultiAxis14
  ],
)
def test_ghost_batch_norm(shape, axis, virtual_batch_size, atol):
  beta, gamma, momentum, eps = 2.0, 3.0, 0.8, 1e-3
  layer = kbn_jax.BatchNormalization(
    axis=axis,
    momentum=momentum,
    epsilon=eps,
    beta_initializer=_const(beta),
    gamma_initializer=_const(gamma),
    virtual_batch_size=virtual_batch_size,
    fused=False,
  )
  axes = [a % len(shape) for a in np.atleast_1d(axis)]
  stat_shape = [1, 1] + [shape[a - 1] if a - 1 in axes else 1 for a in range(2, len(shape) + 1)]
  reduce_axes = tuple([0] + [a + 1 for a in range(1, len(shape)) if a not in axes])
  rng = np.random.default_rng(4)
  variables = layer.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))
  moving_mean, moving_variance = np.zeros(stat_shape), np.ones(stat_shape)
  for _ in range(5):
    x = rng.random(shape).astype(np.float32)
    # Keras's strided layout: reshape to [vbs, B // vbs, ...], statistics over axis 0.
    ghost = x.astype(np.float64).reshape((virtual_batch_size, -1) + shape[1:])
    mean = ghost.mean(reduce_axes, keepdims=True)
    variance = ghost.var(reduce_axes, keepdims=True)
    y_train = ((ghost - mean) / np.sqrt(variance + eps) * gamma + beta).reshape(shape)
    moving_mean += (mean.mean(1, keepdims=True) - moving_mean) * (1 - momentum)
    moving_variance += (variance.mean(1, keepdims=True) - moving_variance) * (1 - momentum)
    y_test = (ghost - moving_mean) / np.sqrt(moving_variance + eps) * gamma + beta

    y, variables = _train(layer, variables, x)
    np.testing.assert_allclose(y, y_train, atol=atol)
    np.testing.assert_allclose(layer.apply(variables, x), y_test.reshape(shape), atol=atol)


def test_ghost_batch_full_equals_plain():  # testGhostBNVirtualBatchFull
  x = np.random.default_rng(5).random((6, 5, 4)).astype(np.float32)
  plain = kbn_jax.BatchNormalization()
  ghost = kbn_jax.BatchNormalization(virtual_batch_size=6)
  variables = plain.init(jax.random.key(0), x)
  y_plain, _ = _train(plain, variables, x)
  y_ghost, _ = _train(ghost, variables, x)
  np.testing.assert_allclose(y_ghost, y_plain, atol=1e-5)


def test_ghost_batch_shapes():  # testGhostBNInputOutputShapesMatch, ...UnknownBatchSize
  layer = kbn_jax.BatchNormalization(virtual_batch_size=3)
  x = jnp.ones((6, 4, 3))
  variables = layer.init(jax.random.key(0), x)
  assert _train(layer, variables, x)[0].shape == (6, 4, 3)
  assert layer.apply(variables, jnp.ones((10, 4, 3))).shape == (10, 4, 3)  # any batch at test


def test_negative_virtual_batch_rejected():  # testGhostBNNegativeVirtualBatch
  with pytest.raises(ValueError, match="virtual_batch_size"):
    kbn_jax.BatchNormalization(virtual_batch_size=-1)


@pytest.mark.parametrize("axis", [[1, 4], [-5, 1], [1, 2, 1]])
def test_multi_axis_invalid(axis):  # testMultiAxisInvalid
  layer = kbn_jax.BatchNormalization(axis=axis)
  with pytest.raises(ValueError, match="axis"):
    layer.init(jax.random.key(0), jnp.ones((5, 4, 3, 2)))


@pytest.mark.parametrize(
  "shape, axis, fused",
  [
    ((5, 4, 3), 1, False),  # test3DInputAxis1
    ((5, 4, 3), 2, False),  # test3DInputAxis2
    ((5, 4, 3, 6), 1, None),  # test4DInputAxis1 (fused, NCHW)
    ((5, 4, 3, 6), 2, False),  # test4DInputAxis2
    ((5, 4, 3, 6), 3, False),  # test4DInputAxis3
    ((5, 4, 3, 6), 3, None),  # test4DInputAxis3Fused
    ((5, 4, 3, 6), -1, None),  # testNegativeAxis
    ((5, 4, 3), [1, 2], False),  # test3DInputMultiAxis12
    ((5, 3, 4, 4, 3), [1, 2, 3], False),  # test5DInputMultiAxis123
  ],
)
def test_convergence(shape, axis, fused):
  """Normalized outputs have mean 0 and std 1; moving stats converge to the data's moments."""
  eps, momentum = 1e-3, 0.9
  layer = kbn_jax.BatchNormalization(axis=axis, epsilon=eps, momentum=momentum, fused=fused)
  axes = [a % len(shape) for a in np.atleast_1d(axis)]
  reduce_axes = tuple(a for a in range(len(shape)) if a not in axes)
  rng = np.random.default_rng(6)
  x = (rng.random(shape) + 100).astype(np.float32)
  variables = layer.init(jax.random.key(0), x)
  step = jax.jit(lambda v, x: _train(layer, v, x))
  for _ in range(100):
    y, variables = step(variables, x)
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(y.mean(reduce_axes), 0.0, atol=0.05)
    np.testing.assert_allclose(y.std(reduce_axes), 1.0, atol=0.05)
  feature_shape = variables["batch_stats"]["moving_mean"].shape
  n = np.prod([shape[a] for a in reduce_axes])
  bessel = n / (n - 1) if layer.fused is not False and len(axes) == 1 and len(shape) == 4 else 1
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(
    variables["batch_stats"]["moving_mean"],
    x64.mean(reduce_axes).reshape(feature_shape),
    atol=1e-2,
  )
  np.testing.assert_allclose(
    variables["batch_stats"]["moving_variance"],
    (x64.var(reduce_axes) * bessel).reshape(feature_shape),
    atol=1e-2,
  )
  y_test = np.asarray(layer.apply(variables, x), np.float64)
  np.testing.assert_allclose(y_test.mean(), 0.0, atol=0.1)
  np.testing.assert_allclose(y_test.std(), 1.0, atol=0.1)


# layers/normalization/batch_normalization_test.py -----------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 1, 1), (2, 1, 1, 1, 1)])
def test_bessels_correction(shape):  # test_bessels_correction
  layer = kbn_jax.BatchNormalization(momentum=0.5, moving_variance_initializer="zeros")
  x = jnp.asarray([0.0, 2.0]).reshape(shape)
  variables = layer.init(jax.random.key(0), x)
  _, variables = _train(layer, variables, x)
  # Fused: the moving variance moves toward the unbiased variance 2 (the biased one is 1).
  assert variables["batch_stats"]["moving_variance"].tolist() == [1.0]
  non_fused = layer.clone(fused=False)
  _, variables = _train(non_fused, non_fused.init(jax.random.key(0), x), x)
  assert variables["batch_stats"]["moving_variance"].tolist() == [0.5]


@pytest.mark.parametrize("fused", [None, False])
def test_mixed_precision_does_not_overflow(fused):
  # test_batchnorm_mixed_precision_does_not_overflow: float16 compute, float32 parameters.
  layer = kbn_jax.BatchNormalization(axis=-1, dtype=jnp.float16, fused=fused)
  x = jnp.asarray([-1000.0, 1000.0], jnp.float16).reshape((2, 1, 1, 1))
  variables = layer.init(jax.random.key(0), x)
  assert variables["params"]["gamma"].dtype == jnp.float32
  y, _ = _train(layer, variables, x)
  assert y.dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(y, np.float32).ravel(), [-1.0, 1.0], atol=1e-3)


def test_ignore_masked_values():  # test_batchnorm_ignore_masked_values
  x = jnp.asarray([[1.0, 5.0], [2.0, 5.0], [0.0, 0.0], [0.0, 0.0]] * 10)[None]  # (1, 40, 2)
  mask = jnp.any(x != 0, axis=-1)
  layer = kbn_jax.BatchNormalization(momentum=0.0)
  variables = layer.init(jax.random.key(0), x)
  _, variables = _train(layer, variables, x, mask=mask)
  np.testing.assert_array_equal(variables["batch_stats"]["moving_mean"], [1.5, 5.0])
  np.testing.assert_array_equal(variables["batch_stats"]["moving_variance"], [0.25, 0.0])


def test_input_fully_masked():  # test_input_fully_masked
  layer = kbn_jax.BatchNormalization(momentum=0.5)
  x = jnp.zeros((4, 5))
  variables = layer.init(jax.random.key(0), x)
  y, variables = _train(layer, variables, x, mask=jnp.zeros((4,)))
  np.testing.assert_array_equal(y, np.zeros((4, 5)))
  assert np.all(np.isfinite(variables["batch_stats"]["moving_variance"]))


def test_repeated_calls_match_closed_form():
  # test_eager_batchnorm_in_custom_model_call_with_tf_function, with exact expectations.
  layer = kbn_jax.BatchNormalization()
  x = jnp.full((1, 1), 0.5)
  variables = layer.init(jax.random.key(0), x)
  step = jax.jit(lambda v: _train(layer, v, x)[1])
  for _ in range(10):
    variables = step(variables)
  np.testing.assert_allclose(
    variables["batch_stats"]["moving_mean"], [0.5 * (1 - 0.99**10)], rtol=1e-5
  )
  np.testing.assert_allclose(variables["batch_stats"]["moving_variance"], [0.99**10], rtol=1e-5)


def test_trainable_false_uses_batch_statistics_without_updates():
  # test_batchnorm_trainable (learning phase 1) and test_that_trainable_disables_updates (V1).
  layer = kbn_jax.BatchNormalization(trainable=False)
  x = jnp.arange(10.0)[:, None]
  variables = {
    "params": {"gamma": jnp.ones(1), "beta": jnp.zeros(1)},
    "batch_stats": {"moving_mean": jnp.full(1, 0.5), "moving_variance": jnp.full(1, 100.0)},
  }
  y = layer.apply(variables, x, training=True)  # no mutable collection needed
  x64 = np.arange(10.0)[:, None]
  np.testing.assert_allclose(y, (x64 - x64.mean()) / x64.std(), atol=1e-3)
  _, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  assert updates == {} or updates["batch_stats"] == variables["batch_stats"]


# spec §10 golden values ---------------------------------------------------------------------------

_G1_X = [[1.0, 2.0], [3.0, 6.0], [5.0, 10.0], [7.0, 14.0]]


def test_golden_g1_g4():
  x = jnp.asarray(_G1_X)
  layer = kbn_jax.BatchNormalization(momentum=0.9)
  variables = layer.init(jax.random.key(0), x)
  y, variables = _train(layer, variables, x)
  np.testing.assert_allclose(
      y.ravel(),
      [-1.3415066, -1.3416073, -0.44716883, -0.44720244, 0.44716895, 0.44720244, 1.3415066,
       1.3416073],
      atol=1e-6,
  )  # fmt: skip
  np.testing.assert_allclose(variables["batch_stats"]["moving_mean"], [0.4, 0.8], atol=1e-6)
  np.testing.assert_allclose(variables["batch_stats"]["moving_variance"], [1.4, 2.9], atol=1e-6)

  renorm = kbn_jax.BatchNormalization(
    momentum=0.9,
    renorm=True,
    renorm_momentum=0.5,
    renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.5},
  )
  variables = renorm.init(jax.random.key(0), x)
  _, variables = _train(renorm, variables, x)
  stats = variables["batch_stats"]
  np.testing.assert_allclose(stats["moving_variance"], [1.2615426, 1.8140144], atol=1e-6)
  np.testing.assert_allclose(stats["moving_stddev"], [1.1236292, 1.3472247], atol=1e-6)
  np.testing.assert_allclose(stats["renorm_stddev"], [1.6181458, 2.7361238], atol=1e-6)
  y, variables = _train(renorm, variables, 2 * x + 1)
  np.testing.assert_allclose(
      y.ravel(),
      [-1.5124109, -1.5124488, -0.17080355, -0.17081618, 1.1708038, 1.1708162, 2.5124109,
       2.5124485],
      atol=1e-6,
  )  # fmt: skip
  np.testing.assert_allclose(
      renorm.apply(variables, x).ravel(),
      [-0.17826653, -0.19934177, 1.1930137, 1.6991506, 2.5642939, 3.5976431, 3.9355738,
       5.4961348],
      atol=1e-6,
  )  # fmt: skip


def test_golden_g2_g3_g5():
  x = jnp.asarray([[0.0, 1.0], [2.0, 5.0]]).reshape((2, 1, 1, 2))
  for fused, expected in ((None, [1.1, 1.7]), (False, [1.0, 1.3])):
    layer = kbn_jax.BatchNormalization(momentum=0.9, fused=fused)
    _, variables = _train(layer, layer.init(jax.random.key(0), x), x)
    np.testing.assert_allclose(variables["batch_stats"]["moving_variance"], expected, atol=1e-6)

  x = jnp.asarray([[0.0], [1.0], [2.0], [3.0]])
  layer = kbn_jax.BatchNormalization(momentum=0.0, virtual_batch_size=2)
  y, variables = _train(layer, layer.init(jax.random.key(0), x), x)
  np.testing.assert_allclose(y.ravel(), [-0.9995004, -0.9995004, 0.9995004, 0.9995005], atol=1e-6)
  np.testing.assert_allclose(variables["batch_stats"]["moving_variance"], [1.0], atol=1e-6)

  x = jnp.arange(24.0).reshape(2, 3, 4) ** 1.5
  layer = kbn_jax.BatchNormalization(axis=[1, 2], momentum=0.5)
  _, variables = _train(layer, layer.init(jax.random.key(0), x), x)
  np.testing.assert_allclose(
      variables["batch_stats"]["moving_variance"].ravel(),
      [216.50002, 263.53195, 307.45947, 350.2827, 392.5, 434.3347, 475.90775, 517.29224,
       558.5356, 599.6699, 640.7182, 681.69714],
      rtol=1e-6,
  )  # fmt: skip
