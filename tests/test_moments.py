"""Batch moments (`kbn_jax._moments`) against float64 NumPy formulas, eager and under `jax.jit`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kbn_jax import _moments
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


def _channel_moments(x, axes, *, one_pass):
  """`batch_moments`, squeezed to the channel shape."""
  mean, variance, _ = _moments.batch_moments(x, axes, one_pass=one_pass)
  return jnp.squeeze(mean, axes), jnp.squeeze(variance, axes)


def _compiled_moments(x, axes, *, one_pass):
  """`_channel_moments` under `jax.jit`, where one pass applies (eager calls take two)."""
  return jax.jit(functools.partial(_channel_moments, axes=axes, one_pass=one_pass))(x)


def _float64_moments(x, axes):
  x64 = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
  return x64.mean(axes), x64.var(axes)


@pytest.mark.parametrize("stds", [0.0, 1.0, 1.99, 2.01, 8.0])
def test_one_pass_is_trusted_only_within_two_standard_deviations_of_zero(stds, rng):
  x = rng.normal(size=(512, 3))
  x = (x - x.mean(0)) / x.std(0) + stds  # mean exactly `stds` standard deviations from 0
  *_, trusted = _moments._one_pass_partials(jnp.asarray(x, jnp.float32), (0,))
  assert bool(trusted) == (stds <= _moments.ONE_PASS_WITHIN_STDS)


@pytest.mark.parametrize("stds", [0.0, 0.5, 1.0, 1.99, 2.01, 3.0])
def test_one_pass_moments_match_float64_on_both_sides_of_the_window(stds, rng):
  # The worst case one pass accepts: a mean just inside the window over a large batch (its
  # variance has about 1 + 2**2 times the rounding of a two-pass one); just outside, two passes.
  x = rng.normal(size=(64 * 32 * 32, 4))
  x = ((x - x.mean(0)) / x.std(0) * 0.5 + 0.5 * stds).astype(np.float32)
  mean, variance = _compiled_moments(x, (0,), one_pass=True)
  expected_mean, expected_variance = _float64_moments(x, (0,))
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(variance, expected_variance, rtol=1e-5)


@pytest.mark.parametrize(
  "dtype, mean", [(jnp.float32, 1e4), (jnp.float16, 1e3), (jnp.bfloat16, 1e3)]
)
def test_one_pass_moments_take_a_second_pass_for_large_means(dtype, mean, rng):
  # E[x^2] - E[x]^2 would lose the variance here; the second pass keeps two-pass accuracy.
  x = jnp.asarray(mean + rng.normal(size=(1000, 4)), dtype)
  _, variance = _compiled_moments(x, (0,), one_pass=True)
  np.testing.assert_allclose(variance, _float64_moments(x, (0,))[1], rtol=1e-4)


@pytest.mark.parametrize("special", [np.nan, np.inf, 5.0], ids=["nan", "inf", "constant"])
def test_one_pass_moments_of_special_channels_are_the_two_pass_ones(special, rng):
  x = (rng.normal(size=(256, 3)) * 3 + 2).astype(np.float32)
  x[:, 1] = special if special == 5.0 else x[:, 1]
  x[7, 1] = special
  one_pass = _compiled_moments(x, (0,), one_pass=True)
  two_pass = _compiled_moments(x, (0,), one_pass=False)
  np.testing.assert_array_equal(one_pass[0], two_pass[0])
  np.testing.assert_allclose(one_pass[1], two_pass[1], rtol=1e-6)
  if special == 5.0:
    assert one_pass[1][1] == 0.0  # a constant channel has exactly zero variance


def test_one_pass_moments_under_vmap_keep_each_examples_choice(rng):
  # One example takes one pass, the other needs two: vmap runs both and each keeps its own.
  near = rng.normal(size=(300, 3))
  far = 1e4 + rng.normal(size=(300, 3))
  xs = jnp.asarray(np.stack([near, far]), jnp.float32)
  batched = jax.vmap(lambda x: _channel_moments(x, (0,), one_pass=True))(xs)
  for i in range(2):
    single = _compiled_moments(xs[i], (0,), one_pass=True)
    np.testing.assert_allclose(batched[0][i], single[0], rtol=1e-6)
    np.testing.assert_allclose(batched[1][i], single[1], rtol=1e-5)
    np.testing.assert_allclose(batched[1][i], _float64_moments(xs[i], (0,))[1], rtol=1e-4)


def test_one_pass_moments_have_the_two_pass_derivatives(rng):
  x = (rng.normal(size=(64, 3)) * 2 + 1).astype(np.float32)
  weights = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)

  def loss(x, one_pass):
    mean, variance = _channel_moments(x, (0,), one_pass=one_pass)
    return jnp.sum(weights[0] * mean + weights[1] * variance)

  one_pass = jax.grad(loss)(x, True)
  two_pass = jax.grad(loss)(x, False)
  np.testing.assert_allclose(one_pass, two_pass, rtol=1e-5, atol=1e-6)


def test_one_pass_is_for_code_compiled_for_the_cpu(monkeypatch, rng):
  # Other backends keep the straight-line two passes (a conditional there waits on the host),
  # and eager calls too (nothing fuses there): the same result as `one_pass=False`.
  x = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)

  def lowered(one_pass):
    return jax.jit(lambda x: _channel_moments(x, (0,), one_pass=one_pass)).lower(x).as_text()

  assert "stablehlo.case" in lowered(True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert lowered(True) == lowered(False)
  monkeypatch.undo()
  eager = _channel_moments(x, (0,), one_pass=True)
  two_pass = _channel_moments(x, (0,), one_pass=False)
  for got, expected in zip(eager, two_pass, strict=True):
    np.testing.assert_array_equal(got, expected)


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


def test_reduction_dtype():
  assert _moments.reduction_dtype(jnp.bfloat16) == jnp.float32
  assert _moments.reduction_dtype(jnp.float16) == jnp.float32
  assert _moments.reduction_dtype(jnp.int32) == jnp.float32


DEPRECATED_FORWARDS = [
  "AxisIndexGroups",
  "AxisName",
  "batch_moments",
  "bessel_correction",
  "compose_affine",
  "device_group_moments",
  "merge_partial_moments",
  "normalize_batch",
  "partial_moments",
  "promote_dtypes",
  "reduction_dtype",
  "update_moving_average_keras3",
  "update_moving_average_torch",
]


@pytest.mark.parametrize("name", DEPRECATED_FORWARDS)
def test_names_removed_from_functional_warn_and_still_work(name):
  with pytest.warns(DeprecationWarning, match=f"kbn_jax.functional.{name}` is deprecated"):
    forwarded = getattr(F, name)
  assert forwarded is not None and name not in F.__all__


def test_deprecated_batch_moments_keeps_its_0_1_result():
  x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (6, 4)), jnp.float32)
  with pytest.warns(DeprecationWarning):
    mean, variance = F.batch_moments(x, (0,))
  assert mean.shape == variance.shape == (1, 4)
  np.testing.assert_allclose(mean[0], np.asarray(x, np.float64).mean(0), rtol=1e-6)
  np.testing.assert_allclose(variance[0], np.asarray(x, np.float64).var(0), rtol=1e-5)


def test_unknown_functional_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="has no attribute 'nope'"):
    F.nope  # noqa: B018
