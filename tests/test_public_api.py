"""The public surface is exactly what `kbn_jax.__all__` lists; the functional core has no Flax."""

import os
import subprocess
import sys

import kbn_jax

EXPECTED_API = {
  "BatchNormalization",
  "diagnostics",
  "equinox",
  "flax_compat",
  "folding",
  "functional",
  "haiku",
  "keras_compat",
  "nnx",
  "torch_compat",
  "training",
}


def test_all_is_the_documented_api():
  assert set(kbn_jax.__all__) == EXPECTED_API
  for name in kbn_jax.__all__:
    assert hasattr(kbn_jax, name), name
  assert isinstance(kbn_jax.__version__, str)


def test_functional_core_imports_no_flax():
  """Issue 10: raw JAX users import the whole layer without Flax or optax."""
  script = (
    "import sys, kbn_jax.functional as F, jax\n"
    "c = F.BatchNormConfig(renorm=True)\n"
    "p, s = F.init_variables(c, jax.random.key(0), (4, 3))\n"
    "F.batch_normalization(jax.numpy.ones((4, 3)), p, s, c, training=True)\n"
    "print(sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'optax', 'orbax'}))\n"
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
  )
  assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_package_attributes_load_lazily():
  script = (
    "import sys, kbn_jax\n"
    "assert 'flax' not in sys.modules\n"
    "kbn_jax.BatchNormalization\n"
    "print('flax' in sys.modules)\n"
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert result.stdout.strip() == "True", result.stdout + result.stderr
