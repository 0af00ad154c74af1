"""The moving-average rules (`kbn_jax._moving_averages`) against their formulas."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kbn_jax import _moving_averages, functional


def test_update_moving_average_is_keras_assign_sub():
  moving, value, momentum = np.float32(0.7), np.float32(3.1), 0.9
  expected = moving - (moving - value) * np.float32(1.0 - momentum)
  assert functional.update_moving_average(moving, value, momentum) == expected


def test_bessel_correction():
  np.testing.assert_allclose(_moving_averages.bessel_correction(jnp.float32(1.0), 4), 4 / 3)
  assert _moving_averages.bessel_correction(jnp.float32(0.0), 1) == 0.0  # n = 1: max(n - 1, 1)
