"""Renorm clipping bounds that change every step (Ioffe 2017's warm-up) under one compilation.

The clipping values are passed per call (``renorm_clipping=`` of ``__call__``), as traced
scalars: a jitted train step must trace and compile once, and give the result of a layer built
with those bounds as fixed (Python float) configuration, which the float64 reference confirms.
A regression test for the CrossQ use case of google/flax#3822.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kbn_jax
from tests import reference

STEPS = 5
CONFIG = {"momentum": 0.5, "renorm_momentum": 0.5}


def warmup(step):
  """A warm-up of the bounds in the style of the paper, fast enough to move in 5 steps."""
  rmax = 1.0 + 0.5 * step
  return {"rmax": rmax, "rmin": 1.0 / rmax, "dmax": 0.5 * step}


def _inputs(rng):
  """Batches whose mean and spread drift, so that r and d hit the clipping bounds."""
  return [
    jnp.asarray(rng.normal(2.0 * t, 3.0**t, (8, 3)), jnp.float32) for t in range(1, STEPS + 1)
  ]


def _fixed_clipping_run(xs):
  """The same steps with the bounds as fixed layer configuration (a new layer per step)."""
  layer = kbn_jax.BatchNormalization(renorm=True, **CONFIG)
  variables = layer.init(jax.random.key(0), xs[0])
  outputs, all_variables = [], []
  for t, x in enumerate(xs):
    fixed = kbn_jax.BatchNormalization(renorm=True, renorm_clipping=warmup(float(t)), **CONFIG)
    y, updates = fixed.apply(variables, x, training=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    outputs.append(y)
    all_variables.append(variables)
  return outputs, all_variables


class _CompileLog(logging.Handler):
  """Collects JAX's "finished compilation" records of ``train_step`` (`jax.log_compiles`)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages = []

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Finished XLA compilation of jit(train_step)"):
      self.messages.append(message)


def _count_compiles(fn):
  handler = _CompileLog()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      result = fn()
  finally:
    logger.removeHandler(handler)
  return result, handler.messages


def _assert_matches(outputs, variables, expected_outputs, expected_variables):
  for t in range(STEPS):
    np.testing.assert_allclose(outputs[t], expected_outputs[t], rtol=1e-6, atol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
      variables[t],
      expected_variables[t],
    )


@pytest.mark.parametrize("as_arrays", [True, False], ids=["jnp_scalars", "python_floats"])
def test_clipping_passed_per_call_compiles_once(rng, as_arrays):
  xs = _inputs(rng)
  layer = kbn_jax.BatchNormalization(renorm=True, **CONFIG)
  variables = layer.init(jax.random.key(0), xs[0])
  traces = []

  @jax.jit
  def train_step(variables, x, clipping):
    traces.append(clipping)
    y, updates = layer.apply(
      variables, x, training=True, renorm_clipping=clipping, mutable=["batch_stats"]
    )
    return y, {**variables, **updates}

  def run(variables):
    outputs, all_variables = [], []
    for t, x in enumerate(xs):
      clipping = warmup(float(t))
      if as_arrays:
        clipping = {k: jnp.asarray(v, jnp.float32) for k, v in clipping.items()}
      y, variables = train_step(variables, x, clipping)
      outputs.append(y)
      all_variables.append(variables)
    return outputs, all_variables

  (outputs, all_variables), compiles = _count_compiles(lambda: run(variables))
  assert len(traces) == 1, f"traced {len(traces)} times for {STEPS} clipping values"
  assert len(compiles) == 1, compiles
  _assert_matches(outputs, all_variables, *_fixed_clipping_run(xs))


def test_clipping_from_a_traced_step_count_compiles_once(rng):
  # The optax style: the schedule is a function of the step count carried in the train state.
  xs = _inputs(rng)
  layer = kbn_jax.BatchNormalization(renorm=True, **CONFIG)
  variables = layer.init(jax.random.key(0), xs[0])
  traces = []

  @jax.jit
  def train_step(variables, x, step):
    traces.append(step)
    clipping = warmup(step.astype(jnp.float32))
    y, updates = layer.apply(
      variables, x, training=True, renorm_clipping=clipping, mutable=["batch_stats"]
    )
    return y, {**variables, **updates}, step + 1

  def run(variables):
    step = jnp.zeros((), jnp.int32)
    outputs, all_variables = [], []
    for x in xs:
      y, variables, step = train_step(variables, x, step)
      outputs.append(y)
      all_variables.append(variables)
    return outputs, all_variables

  (outputs, all_variables), compiles = _count_compiles(lambda: run(variables))
  assert len(traces) == 1 and len(compiles) == 1, compiles
  _assert_matches(outputs, all_variables, *_fixed_clipping_run(xs))


def test_fixed_clipping_run_matches_float64_reference_and_clipping_binds(rng):
  # Pins the comparison target above to the spec (section 3.6), and shows the bounds matter.
  xs = _inputs(rng)
  outputs, all_variables = _fixed_clipping_run(xs)
  state = reference.initial_state((3,), renorm=True)
  differs = []
  for t, x in enumerate(xs):
    x64 = np.asarray(x, np.float64)
    unclipped, _ = reference.keras_v1_reference(x64, state, renorm=True, training=True, **CONFIG)
    expected, state = reference.keras_v1_reference(
      x64, state, renorm=True, renorm_clipping=warmup(float(t)), training=True, **CONFIG
    )
    np.testing.assert_allclose(outputs[t], expected, rtol=1e-5, atol=1e-5)
    for name, value in state.items():
      actual = {**all_variables[t]["params"], **all_variables[t]["batch_stats"]}[name]
      np.testing.assert_allclose(actual, value, rtol=1e-5, atol=1e-5)
    differs.append(not np.allclose(unclipped, expected, atol=1e-3))
  assert all(differs), "every step's clipping must change the output, or the test is vacuous"
