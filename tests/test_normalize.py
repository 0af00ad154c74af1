"""Normalization (`kbn_jax._normalize`): Keras's two forms, renorm's correction, and the
closed-form training kernel composed with `kbn_jax._moments`.

Forward values against a float64 NumPy reference and against `functional`; gradients against
autodiff of the `functional` formula and `jax.test_util.check_grads` (first and second order,
reverse mode); saved residuals; cross-device gradients under `shard_map`.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from kbn_jax import _moments, _normalize, functional

EPS = 1e-3
TRANSFORMS = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])

# (input shape, reduction axes): NHWC, NCHW, dense, ghost-batch layout, two feature axes.
LAYOUTS = [
  ((6, 3, 4, 5), (0, 1, 2)),
  ((6, 5, 3, 4), (0, 2, 3)),
  ((16, 7), (0,)),
  ((2, 3, 4, 2, 5), (0, 2, 3)),
  ((6, 3, 4, 5), (0, 3)),
]


def _stats_shape(shape, axes):
  return tuple(1 if a in axes else n for a, n in enumerate(shape))


def _data(rng, shape, axes, *, offset=3.0, dtype=np.float32):
  x = rng.normal(offset, 2.0, shape).astype(dtype)
  stats = _stats_shape(shape, axes)
  scale = rng.normal(1.0, 0.3, stats).astype(np.float32)
  shift = rng.normal(0.0, 0.3, stats).astype(np.float32)
  weights = rng.normal(size=shape).astype(np.float32)
  return x, scale, shift, weights


def _reference64(x, scale, shift, axes):
  """Float64 NumPy batch norm: two-pass moments, then the affine map."""
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=axes, keepdims=True)
  variance = np.square(x - mean).mean(axis=axes, keepdims=True)
  y = (x - mean) / np.sqrt(variance + EPS) * scale + shift
  return y, mean, variance


def _functional(x, scale, shift, axes, fused):
  """The reference formula the kernel must match: two-pass moments (autodiff) + normalize."""
  xc = x.astype(_moments.reduction_dtype(x.dtype))
  mean = jnp.mean(xc, axes, keepdims=True)
  variance = jnp.mean(jnp.square(xc - mean), axes, keepdims=True)
  y = functional.normalize(
    xc, mean, variance, scale=scale, offset=shift, epsilon=EPS, subtract_mean_first=fused
  )
  return y, mean, variance


def _batch_norm_train(
  x,
  scale=None,
  offset=None,
  *,
  reduction_axes,
  epsilon,
  subtract_mean_first=False,
  dtype=None,
  axis_name=None,
  axis_index_groups=None,
):
  """The layer's composition: fast moments, then the fast normalization; ``(y, mean, var)``."""
  mean, variance = functional.moments(
    x, reduction_axes, axis_name=axis_name, axis_index_groups=axis_index_groups, keepdims=True
  )
  y = _normalize.closed_form_normalize(
    x,
    mean,
    variance,
    scale,
    offset,
    reduction_axes=reduction_axes,
    epsilon=epsilon,
    subtract_mean_first=subtract_mean_first,
    dtype=dtype,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
  )
  return y, mean, variance


def _fast(x, scale, shift, axes, fused):
  return _batch_norm_train(
    x, scale, shift, reduction_axes=axes, epsilon=EPS, subtract_mean_first=fused
  )


@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
  "shape, axes", [*LAYOUTS[:3], *(pytest.param(*c, marks=pytest.mark.slow) for c in LAYOUTS[3:])]
)
def test_forward_matches_reference_and_functional(rng, shape, axes, fused, transform):
  x, scale, shift, _ = _data(rng, shape, axes)
  got = transform(lambda *a: _fast(*a, axes, fused))(x, scale, shift)
  for value, expected in zip(got, _reference64(x, scale, shift, axes), strict=True):
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
  same_arithmetic = jax.jit(lambda *a: _functional(*a, axes, fused))(x, scale, shift)
  for value, expected in zip(got, same_arithmetic, strict=True):
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape, axes", LAYOUTS)
def test_gradients_match_autodiff_of_functional(rng, shape, axes, fused):
  x, scale, shift, weights = _data(rng, shape, axes)
  mean_weights = rng.normal(size=_stats_shape(shape, axes)).astype(np.float32)

  def loss(implementation):
    def f(x, scale, shift):
      y, mean, variance = implementation(x, scale, shift, axes, fused)
      # Cotangents for all three outputs, so the mean/variance paths are checked too.
      return jnp.sum(y * weights) + jnp.sum(mean * mean_weights) + jnp.sum(jnp.sqrt(variance))

    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

  got = loss(_fast)(x, scale, shift)
  expected = loss(_functional)(x, scale, shift)
  for value, reference in zip(got, expected, strict=True):
    np.testing.assert_allclose(value, reference, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(
  "shape, axes", [LAYOUTS[0], *(pytest.param(*c, marks=pytest.mark.slow) for c in LAYOUTS[1:3])]
)
def test_check_grads_first_and_second_order(rng, shape, axes):
  x, scale, shift, weights = _data(rng, shape, axes, dtype=np.float64)
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a, jnp.float64) for a in (x, scale, shift))
    weights = jnp.asarray(weights, jnp.float64)

    def f(x, scale, shift):
      y, mean, variance = _fast(x, scale, shift, axes, True)
      return jnp.sum(jnp.tanh(y) * weights) + jnp.sum(mean**2) + jnp.sum(jnp.sin(variance))

    check_grads(f, args, order=2, modes=["rev"], atol=1e-4, rtol=1e-4)

    def f_reference(x, scale, shift):
      y, mean, variance = _functional(x, scale, shift, axes, True)
      return jnp.sum(jnp.tanh(y) * weights) + jnp.sum(mean**2) + jnp.sum(jnp.sin(variance))

    # Second order equals autodiff of the reference formula (hessian-vector products).
    direction = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in args)
    hvp = jax.jvp(jax.grad(f, argnums=(0, 1, 2)), args, direction)[1]
    hvp_reference = jax.jvp(jax.grad(f_reference, argnums=(0, 1, 2)), args, direction)[1]
    for value, reference in zip(hvp, hvp_reference, strict=True):
      np.testing.assert_allclose(value, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
  "shape, axes", [*LAYOUTS[:2], *(pytest.param(*c, marks=pytest.mark.slow) for c in LAYOUTS[2:])]
)
def test_forward_mode_agrees_with_reverse_mode(rng, shape, axes):
  """Issue 10: jvp, jacfwd and linearize work and equal the reverse-mode derivative."""
  x, scale, shift, weights = _data(rng, shape, axes)
  f = lambda x, scale, shift: _fast(x, scale, shift, axes, True)[0]  # noqa: E731
  args = (x, scale, shift)
  tangents = tuple(jnp.asarray(rng.normal(size=a.shape), jnp.float32) for a in args)
  _, jvp = jax.jvp(f, args, tangents)
  _, pullback = jax.vjp(f, *args)
  # <J t, w> == <t, J^T w> for the output weights w.
  lhs = jnp.vdot(jvp, weights)
  rhs = sum(jnp.vdot(t, g) for t, g in zip(tangents, pullback(jnp.asarray(weights)), strict=True))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)
  _, linear = jax.linearize(f, *args)
  np.testing.assert_allclose(linear(*tangents), jvp, rtol=1e-5, atol=1e-5)
  reference = jax.jvp(lambda *a: _functional(*a, axes, True)[0], args, tangents)[1]
  np.testing.assert_allclose(jvp, reference, rtol=2e-4, atol=2e-5)


def test_jacfwd_equals_jacrev(rng):
  x, scale, shift, _ = _data(rng, (5, 3), (0,))
  f = lambda x: _fast(x, scale, shift, (0,), False)[0]  # noqa: E731
  np.testing.assert_allclose(jax.jacfwd(f)(x), jax.jacrev(f)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_mean_gradients_as_accurate_as_two_pass_autodiff(rng, offset):
  """Two-pass accuracy in the backward too (no ``E[g x] - E[g] E[x]`` cancellation): against
  float64, the kernel's float32 gradients are as close as float32 autodiff of the reference."""
  shape, axes = (64, 8), (0,)
  x, scale, shift, weights = _data(rng, shape, axes, offset=offset)

  def grads(implementation, weights, *args):
    loss = lambda *a: jnp.sum(implementation(*a, axes, True)[0] * weights)  # noqa: E731
    return [np.asarray(g, np.float64) for g in jax.grad(loss, argnums=(0, 1, 2))(*args)]

  fast = grads(_fast, weights, x, scale, shift)
  autodiff32 = grads(_functional, weights, x, scale, shift)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(a, jnp.float64) for a in (x, scale, shift)]
    exact = grads(_functional, jnp.asarray(weights, jnp.float64), *args64)
  for value, baseline, reference in zip(fast, autodiff32, exact, strict=True):
    size = np.max(np.abs(reference))
    error = np.max(np.abs(value - reference)) / size
    baseline_error = np.max(np.abs(baseline - reference)) / size
    assert error <= 2 * baseline_error + 1e-6, (error, baseline_error)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_16_bit_input_reduces_in_float32_and_keeps_its_dtype(rng, dtype):
  shape, axes = (8, 4, 4, 3), (0, 1, 2)
  x, scale, shift, weights = _data(rng, shape, axes)
  x16 = jnp.asarray(x, dtype)
  y, mean, variance = _batch_norm_train(
    x16, scale, shift, reduction_axes=axes, epsilon=EPS, dtype=dtype
  )
  assert y.dtype == dtype and mean.dtype == variance.dtype == jnp.float32
  expected = _reference64(np.asarray(x16, np.float32), scale, shift, axes)
  np.testing.assert_allclose(np.asarray(y, np.float32), expected[0], rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(mean, expected[1], rtol=1e-5, atol=1e-5)
  dx = jax.grad(lambda x: jnp.sum(_fast(x, scale, shift, axes, True)[0] * weights))(x16)
  assert dx.dtype == dtype


def _residuals(f, *args):
  """Shapes of the residuals `f`'s VJP saves, and whether each is one of the arguments."""
  import contextlib  # noqa: PLC0415
  import io  # noqa: PLC0415

  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    print_saved_residuals(f, *args)
  found = []
  for line in buffer.getvalue().splitlines():
    match = re.match(r"\w+\[([\d,]*)\]", line)
    if match:
      shape = tuple(int(d) for d in match.group(1).split(",") if d)
      found.append((shape, "from the argument" in line))
  return found


def _activation_sized(residuals, shape):
  size = int(np.prod(shape))
  return [r for r in residuals if int(np.prod(r[0])) >= size]


@pytest.mark.parametrize("shape, axes", LAYOUTS)
def test_training_step_saves_only_the_input_and_per_channel_vectors(rng, shape, axes):
  """Issue 5, memory: one activation-sized residual (the input itself), all else per channel."""
  x, scale, shift, _ = _data(rng, shape, axes)
  channels = int(np.prod(_stats_shape(shape, axes)))

  def step(x, scale, shift):
    # What the layer does: moments, a renorm-style correction under stop_gradient folded into
    # scale and offset, then the normalization.
    mean, variance = functional.moments(x, axes, keepdims=True)
    r = jax.lax.stop_gradient(jnp.sqrt(variance + EPS))
    return _normalize.closed_form_normalize(
      x, mean, variance, scale * r, shift + r, reduction_axes=axes, epsilon=EPS
    )

  residuals = _residuals(step, x, scale, shift)
  big = _activation_sized(residuals, shape)
  assert big == [(shape, True)], residuals
  assert all(int(np.prod(r[0])) <= channels for r in residuals if r not in big), residuals


def test_residual_check_catches_autodiff_intermediates(rng):
  """The same inspection flags the autodiff formulation, so the memory test can fail."""
  shape, axes = (6, 3, 4, 5), (0, 1, 2)
  x, scale, shift, _ = _data(rng, shape, axes)
  residuals = _residuals(lambda *a: _functional(*a, axes, True)[0], x, scale, shift)
  assert len(_activation_sized(residuals, shape)) >= 2, residuals


def test_rejects_per_element_scale_and_bad_axes(rng):
  x, _, shift, _ = _data(rng, (4, 3), (0,))
  with pytest.raises(ValueError, match=r"`scale` of shape \(4, 3\) .* 1 on every reduction axis"):
    _batch_norm_train(x, jnp.ones((4, 3)), shift, reduction_axes=(0,), epsilon=EPS)
  with pytest.raises(ValueError, match=r"`reduction_axes` entry 2 is out of range"):
    _batch_norm_train(x, reduction_axes=(2,), epsilon=EPS)
  with pytest.raises(ValueError, match=r"repeats an axis"):
    _batch_norm_train(x, reduction_axes=(0, -2), epsilon=EPS)
  assert _normalize.is_per_channel(jnp.ones(3), (0,), 2)
  assert not _normalize.is_per_channel(jnp.ones((4, 3)), (0,), 2)


@pytest.mark.parametrize("groups", [None, [[0, 1], [2, 3]]])
def test_shard_map_gradients_equal_one_device(rng, groups):
  """With `axis_name`, 4 devices give the gradients of one device on the whole batch (or on
  each group's batch), with replicated scale and offset."""
  shape, axes = (16, 3, 5), (0, 1)
  x, scale, shift, weights = _data(rng, shape, axes)
  mesh = jax.make_mesh((4,), ("d",))

  def local_loss(x, scale, shift, weights):
    y, mean, _ = _batch_norm_train(
      x, scale, shift, reduction_axes=axes, epsilon=EPS, axis_name="d", axis_index_groups=groups
    )
    if groups is None:  # The mean is replicated: count it once.
      return jax.lax.psum(jnp.sum(y * weights), "d") + jnp.sum(mean)
    # Each group's mean lives on its 2 devices: count each group's once.
    return jax.lax.psum(jnp.sum(y * weights) + jnp.sum(mean) / 2, "d")

  def sharded_loss(x, scale, shift, weights):
    specs = (P("d"), P(), P(), P("d"))
    return jax.shard_map(local_loss, mesh=mesh, in_specs=specs, out_specs=P())(
      x, scale, shift, weights
    )

  batch = NamedSharding(mesh, P("d"))
  with jax.set_mesh(mesh):
    got = jax.jit(jax.grad(sharded_loss, argnums=(0, 1, 2)))(
      jax.device_put(x, batch), scale, shift, jax.device_put(weights, batch)
    )
  got = [np.asarray(g) for g in got]

  def one_device(x, scale, shift, weights):
    y, mean, _ = _fast(x, scale, shift, axes, False)
    return jnp.sum(y * weights) + jnp.sum(mean)

  parts = [slice(0, 16)] if groups is None else [slice(0, 8), slice(8, 16)]
  expected = [np.zeros_like(x), np.zeros_like(scale), np.zeros_like(shift)]
  for part in parts:
    grads = jax.grad(one_device, argnums=(0, 1, 2))(x[part], scale, shift, weights[part])
    expected[0][part] = grads[0]
    expected[1] += grads[1]
    expected[2] += grads[2]
  for value, reference in zip(got, expected, strict=True):
    np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-5)


# Keras's arithmetic forms, renorm's correction and affine composition


@TRANSFORMS
@pytest.mark.parametrize("subtract_mean_first", [False, True])
def test_normalize_matches_float64(transform, subtract_mean_first, rng):
  x = rng.normal(size=(5, 4)).astype(np.float32)
  mean, variance = rng.normal(size=(1, 4)), rng.random((1, 4)) + 0.5
  scale, offset = rng.normal(size=(1, 4)), rng.normal(size=(1, 4))
  f = functools.partial(functional.normalize, epsilon=1e-3, subtract_mean_first=subtract_mean_first)
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
  y = functional.normalize(x, jnp.zeros((1, 2)), jnp.ones((1, 2)), epsilon=0.0)
  np.testing.assert_allclose(y, x, rtol=1e-6)


@pytest.mark.slow
def test_normalize_second_order_gradients():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)), jnp.float32)

  def bn(x, scale, offset):
    mean, variance = functional.moments(x, (0,), keepdims=True)
    return functional.normalize(x, mean, variance, scale=scale, offset=offset, epsilon=1e-3)

  args = (x, jnp.full((1, 3), 1.5), jnp.full((1, 3), 0.2))
  with jax.numpy_rank_promotion("allow"):  # check_grads's own arithmetic broadcasts
    check_grads(bn, args, order=2, modes=["rev"], atol=2e-2, rtol=2e-2)


@TRANSFORMS
def test_renorm_correction_matches_formula(transform, rng):
  mean, variance = rng.normal(size=3), rng.random(3) + 0.1
  renorm_mean, renorm_stddev = rng.normal(size=3), np.array([0.5, 1e-4, 2.0])
  eps = 1e-3
  f = functools.partial(functional.renorm_correction, epsilon=eps, rmin=0.8, rmax=1.2, dmax=0.3)
  r, d = transform(f)(
    jnp.float32(mean), jnp.float32(variance), jnp.float32(renorm_mean), jnp.float32(renorm_stddev)
  )
  floor = np.maximum(renorm_stddev, np.sqrt(eps))  # Keras floors the divisor only
  np.testing.assert_allclose(r, np.clip(np.sqrt(variance + eps) / floor, 0.8, 1.2), rtol=1e-5)
  np.testing.assert_allclose(d, np.clip((mean - renorm_mean) / floor, -0.3, 0.3), rtol=1e-5)


def test_renorm_clipping_order_rmin_then_rmax():
  r, _ = functional.renorm_correction(
    jnp.zeros(1), jnp.full(1, 3.0), jnp.zeros(1), jnp.ones(1), epsilon=0.0, rmin=2.5, rmax=1.5
  )
  assert float(r[0]) == 1.5  # rmin > rmax is accepted: rmax wins, as in Keras


def test_renorm_correction_has_no_gradient():
  def f(mean):
    r, d = functional.renorm_correction(mean, jnp.ones(2), jnp.zeros(2), jnp.ones(2), epsilon=1e-3)
    return jnp.sum(r + d)

  np.testing.assert_array_equal(jax.grad(f)(jnp.ones(2)), [0.0, 0.0])


_RENORM_X = np.random.default_rng(2).normal(size=(8, 2)).astype(np.float32)


def _renorm_correction(x):
  mean, variance = functional.moments(x, (0,), keepdims=True)
  renorm_mean, renorm_stddev = jnp.zeros((1, 2)), jnp.full((1, 2), 0.7)
  return functional.renorm_correction(
    mean, variance, renorm_mean, renorm_stddev, epsilon=1e-3, rmax=1.3, dmax=0.5
  )


def _renorm_bn(x, scale, r, d):
  mean, variance = functional.moments(x, (0,), keepdims=True)
  scale, offset = _normalize.compose_affine(r, d, scale, None)
  return functional.normalize(x, mean, variance, scale=scale, offset=offset, epsilon=1e-3)


@pytest.mark.slow
def test_renorm_normalization_second_order_gradients():
  x, scale = jnp.asarray(_RENORM_X), jnp.ones((1, 2))
  r, d = _renorm_correction(x)
  with jax.numpy_rank_promotion("allow"):  # check_grads's own arithmetic broadcasts
    check_grads(
      lambda x, s: _renorm_bn(x, s, r, d), (x, scale), order=2, modes=["rev"], atol=2e-2, rtol=2e-2
    )


def test_renorm_normalization_gradient_holds_r_and_d_constant():
  """The renorm path differentiates like BN with r, d held constant (spec §3.10)."""
  x, scale = jnp.asarray(_RENORM_X), jnp.ones((1, 2))
  r, d = _renorm_correction(x)
  cotangent = jnp.asarray(np.random.default_rng(3).normal(size=(8, 2)), jnp.float32)
  inside = jax.grad(
    lambda x, s: jnp.sum(_renorm_bn(x, s, *_renorm_correction(x)) * cotangent), (0, 1)
  )
  constant = jax.grad(lambda x, s: jnp.sum(_renorm_bn(x, s, r, d) * cotangent), (0, 1))
  for a, b in zip(inside(x, scale), constant(x, scale), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_compose_affine():
  s, o = _normalize.compose_affine(
    jnp.float32(2.0), jnp.float32(1.0), jnp.float32(3.0), jnp.float32(0.5)
  )
  assert (float(s), float(o)) == (6.0, 3.5)  # first (2x + 1), then (3y + 0.5)
  assert _normalize.compose_affine(None, None, None, None) == (None, None)
