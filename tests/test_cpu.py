"""`kbn_jax.cpu`: the opt-in glibc allocator setting, run in a fresh process."""

import subprocess
import sys

import pytest

import kbn_jax.cpu


def test_tune_malloc_applies_on_glibc_and_is_opt_in():
  script = (
    "import sys, kbn_jax, kbn_jax.cpu, platform\n"
    "print(platform.libc_ver()[0], kbn_jax.cpu.tune_malloc())\n"
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  libc, applied = result.stdout.split()
  assert applied == str(libc == "glibc"), result.stdout + result.stderr


def test_environment_route_and_bad_values():
  env = kbn_jax.cpu.tune_malloc_env()
  assert env == {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
  with pytest.raises(ValueError, match="mmap_threshold"):
    kbn_jax.cpu.tune_malloc(mmap_threshold=-5)
