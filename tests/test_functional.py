"""`kbn_jax.functional` against float64 NumPy formulas, eager and under `jax.jit`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kbn_jax import _moments, _moving_averages, _normalize
from kbn_jax import functional as F

TRANSFORMS = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])


def _tolerance(dtype):
  return {jnp.float32: 1e-6, jnp.float16: 1e-3, jnp.bfloat16: 1e-2}[dtype]


@TRANSFORMS
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize(
  "shape, axes", [((8, 3), (0,)), ((4, 5, 6, 3), (0, 1, 2)), ((4, 3, 5), (0, 2))]
)
def test_moments_match_float64(transform, dtype, shape, axes, rng):
  x = (rng.normal(size=shape) * 3 + 2).astype(np.float32)
  x_in = jnp.asarray(x, dtype)
  mean, variance = transform(functools.partial(F.moments, reduction_axes=axes))(x_in)
  assert mean.dtype == variance.dtype == jnp.float32  # 16-bit inputs reduce in float32
  x64 = np.asarray(x_in.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(mean, x64.mean(axes), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(variance, x64.var(axes), rtol=1e-5, atol=1e-6)


@TRANSFORMS
def test_moments_large_mean_is_accurate(transform, rng):
  # The regression of jax's nn_test large-mean variance: E[x^2] - E[x]^2 would be 0 or negative.
  x = (1e4 + rng.normal(size=(1000, 4))).astype(np.float32)
  _, variance = transform(functools.partial(F.moments, reduction_axes=(0,)))(x)
  np.testing.assert_allclose(variance, x.astype(np.float64).var(0), rtol=1e-4)


@TRANSFORMS
def test_weighted_moments_match_float64(transform, rng):
  x = rng.normal(size=(4, 6, 3)).astype(np.float32)
  mask = (rng.random((4, 6)) > 0.4).astype(np.float32)
  mean, variance = transform(functools.partial(F.moments, reduction_axes=(0, 1)))(x, mask=mask)
  w = mask[..., None].astype(np.float64)
  expected_mean = (w * x).sum((0, 1)) / (w.sum() + 0 * x.sum((0, 1)))
  expected_var = (w * (x - expected_mean) ** 2).sum((0, 1)) / w.sum()
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(variance, expected_var, rtol=1e-5, atol=1e-6)


def test_fully_masked_moments_are_zero_not_nan():
  mean, variance = F.moments(jnp.ones((3, 2)), (0,), mask=jnp.zeros((3,)))
  np.testing.assert_array_equal(mean, [0.0, 0.0])
  np.testing.assert_array_equal(variance, [0.0, 0.0])


def test_partial_moments_merge_equals_whole(rng):
  """Chan's merge of per-part (count, mean, M2) equals the moments of the concatenation."""
  parts = [rng.normal(loc=1e3, size=(n, 3)).astype(np.float32) for n in (2, 5, 1)]
  partials = [_moments.partial_moments(p, (0,)) for p in parts]
  counts, means, m2s = (jnp.stack([p[i] for p in partials]) for i in range(3))
  total, mean, m2 = _moments._merge(counts, means, m2s, axis=0)
  whole = np.concatenate(parts).astype(np.float64)
  np.testing.assert_allclose(total.ravel(), [8, 8, 8])
  np.testing.assert_allclose(mean.ravel(), whole.mean(0), rtol=1e-6)
  np.testing.assert_allclose((m2 / total).ravel(), whole.var(0), rtol=1e-4)


@TRANSFORMS
@pytest.mark.parametrize("subtract_mean_first", [False, True])
def test_normalize_matches_float64(transform, subtract_mean_first, rng):
  x = rng.normal(size=(5, 4)).astype(np.float32)
  mean, variance = rng.normal(size=(1, 4)), rng.random((1, 4)) + 0.5
  scale, offset = rng.normal(size=(1, 4)), rng.normal(size=(1, 4))
  f = functools.partial(F.normalize, epsilon=1e-3, subtract_mean_first=subtract_mean_first)
  y = transform(f)(
    x,
    jnp.float32(mean),
    jnp.float32(variance),
    scale=jnp.float32(scale),
    offset=jnp.float32(offset),
  )
  expected = (x - np.float32(mean)) / np.sqrt(np.float32(variance) + 1e-3) * np.float32(scale)
  np.testing.assert_allclose(y, expected + np.float32(offset), rtol=1e-5, atol=1e-5)


def test_normalize_without_scale_and_offset(rng):
  x = rng.normal(size=(5, 2)).astype(np.float32)
  y = F.normalize(x, jnp.zeros((1, 2)), jnp.ones((1, 2)), epsilon=0.0)
  np.testing.assert_allclose(y, x, rtol=1e-6)


def test_normalize_gradients():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)), jnp.float32)

  def bn(x, scale, offset):
    mean, variance = F.moments(x, (0,), keepdims=True)
    return F.normalize(x, mean, variance, scale=scale, offset=offset, epsilon=1e-3)

  args = (x, jnp.full((1, 3), 1.5), jnp.full((1, 3), 0.2))
  with jax.numpy_rank_promotion("allow"):  # check_grads's own arithmetic broadcasts
    check_grads(bn, args, order=2, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_update_moving_average_is_keras_assign_sub():
  moving, value, momentum = np.float32(0.7), np.float32(3.1), 0.9
  expected = moving - (moving - value) * np.float32(1.0 - momentum)
  assert F.update_moving_average(moving, value, momentum) == expected


def test_bessel_correction():
  np.testing.assert_allclose(_moving_averages.bessel_correction(jnp.float32(1.0), 4), 4 / 3)
  assert _moving_averages.bessel_correction(jnp.float32(0.0), 1) == 0.0  # n = 1: max(n - 1, 1)


@TRANSFORMS
def test_renorm_correction_matches_formula(transform, rng):
  mean, variance = rng.normal(size=3), rng.random(3) + 0.1
  renorm_mean, renorm_stddev = rng.normal(size=3), np.array([0.5, 1e-4, 2.0])
  eps = 1e-3
  f = functools.partial(F.renorm_correction, epsilon=eps, rmin=0.8, rmax=1.2, dmax=0.3)
  r, d = transform(f)(
    jnp.float32(mean), jnp.float32(variance), jnp.float32(renorm_mean), jnp.float32(renorm_stddev)
  )
  floor = np.maximum(renorm_stddev, np.sqrt(eps))  # Keras floors the divisor only
  np.testing.assert_allclose(r, np.clip(np.sqrt(variance + eps) / floor, 0.8, 1.2), rtol=1e-5)
  np.testing.assert_allclose(d, np.clip((mean - renorm_mean) / floor, -0.3, 0.3), rtol=1e-5)


def test_renorm_clipping_order_rmin_then_rmax():
  r, _ = F.renorm_correction(
    jnp.zeros(1), jnp.full(1, 3.0), jnp.zeros(1), jnp.ones(1), epsilon=0.0, rmin=2.5, rmax=1.5
  )
  assert float(r[0]) == 1.5  # rmin > rmax is accepted: rmax wins, as in Keras


def test_renorm_correction_has_no_gradient():
  def f(mean):
    r, d = F.renorm_correction(mean, jnp.ones(2), jnp.zeros(2), jnp.ones(2), epsilon=1e-3)
    return jnp.sum(r + d)

  np.testing.assert_array_equal(jax.grad(f)(jnp.ones(2)), [0.0, 0.0])


def test_renorm_normalization_gradient():
  """The renorm path differentiates like BN with r, d held constant (spec §3.10)."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 2)), jnp.float32)
  renorm_stats = (jnp.zeros((1, 2)), jnp.full((1, 2), 0.7))

  def correction(x):
    mean, variance = F.moments(x, (0,), keepdims=True)
    return F.renorm_correction(mean, variance, *renorm_stats, epsilon=1e-3, rmax=1.3, dmax=0.5)

  def renorm_bn(x, scale, r, d):
    mean, variance = F.moments(x, (0,), keepdims=True)
    scale, offset = _normalize.compose_affine(r, d, scale, None)
    return F.normalize(x, mean, variance, scale=scale, offset=offset, epsilon=1e-3)

  scale = jnp.ones((1, 2))
  r, d = correction(x)
  with jax.numpy_rank_promotion("allow"):  # check_grads's own arithmetic broadcasts
    check_grads(
      lambda x, s: renorm_bn(x, s, r, d), (x, scale), order=2, modes=["rev"], atol=2e-2, rtol=2e-2
    )
  cotangent = jnp.asarray(np.random.default_rng(3).normal(size=(8, 2)), jnp.float32)
  inside = jax.grad(lambda x, s: jnp.sum(renorm_bn(x, s, *correction(x)) * cotangent), (0, 1))
  constant = jax.grad(lambda x, s: jnp.sum(renorm_bn(x, s, r, d) * cotangent), (0, 1))
  for a, b in zip(inside(x, scale), constant(x, scale), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_compose_affine():
  s, o = _normalize.compose_affine(
    jnp.float32(2.0), jnp.float32(1.0), jnp.float32(3.0), jnp.float32(0.5)
  )
  assert (float(s), float(o)) == (6.0, 3.5)  # first (2x + 1), then (3y + 0.5)
  assert _normalize.compose_affine(None, None, None, None) == (None, None)


def test_ghost_batches_are_strided():
  x = jnp.arange(8.0)[:, None]
  ghost = F.split_ghost_batches(x, 2)
  assert ghost.shape == (2, 4, 1)
  np.testing.assert_array_equal(ghost[:, 0, 0], [0.0, 4.0])  # sub-batch 0 = samples {0, 4}
  np.testing.assert_array_equal(F.merge_ghost_batches(ghost), x)


def test_reduction_dtype():
  assert _moments.reduction_dtype(jnp.bfloat16) == jnp.float32
  assert _moments.reduction_dtype(jnp.float16) == jnp.float32
  assert _moments.reduction_dtype(jnp.int32) == jnp.float32
