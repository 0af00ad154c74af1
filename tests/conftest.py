"""Strict, multi-device test environment; set up before anything imports jax."""

import os

# Eight CPU devices for pmap / shard_map / sharded-jit tests (must precede the jax import).
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng():
  """A NumPy generator with a fixed seed, fresh for each test."""
  return np.random.default_rng(0)
