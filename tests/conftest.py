"""Strict, multi-device test environment; set up before anything imports jax."""

import os
import pathlib

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


def pytest_report_header(config):
  """Names the kbn_jax under test (the checkout's, or an installed wheel's)."""
  import kbn_jax  # noqa: PLC0415 (after the jax configuration above)

  return f"kbn_jax {kbn_jax.__version__} from {pathlib.Path(kbn_jax.__file__).parent}"


def pytest_sessionstart(session):
  """With KBN_EXPECT_INSTALLED=1 (.ci/installed.sh), refuses to test anything but site-packages."""
  import kbn_jax  # noqa: PLC0415

  where = pathlib.Path(kbn_jax.__file__).resolve()
  if os.environ.get("KBN_EXPECT_INSTALLED") == "1" and "site-packages" not in where.parts:
    raise pytest.UsageError(f"KBN_EXPECT_INSTALLED=1 but kbn_jax was imported from {where}")


@pytest.fixture
def rng():
  """A NumPy generator with a fixed seed, fresh for each test."""
  return np.random.default_rng(0)
