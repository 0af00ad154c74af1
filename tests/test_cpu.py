"""`kbn_jax.cpu`: the opt-in glibc allocator setting, run in fresh processes."""

import platform
import subprocess
import sys

import pytest

import kbn_jax.cpu

# A fresh process that trains on a small activation, then on a larger one (the order that
# left XLA's per-thread glibc arenas mapping a new block every step), and prints the page
# faults per step of the larger one, in units of one activation's 4 KiB pages.
_FAULTS_PER_STEP = """
import resource, sys
import kbn_jax.cpu
if sys.argv[1] == "tuned":
  assert kbn_jax.cpu.tune_malloc()
import jax, jax.numpy as jnp, kbn_jax

def faults_per_step(shape, steps=20):
  module = kbn_jax.BatchNormalization()
  x, ct = jnp.full(shape, 2.0), jnp.ones(shape)
  variables = module.init(jax.random.key(0), x)

  @jax.jit
  def step(params, x, ct):
    def forward(x, params):
      return module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x, True,
        mutable=["batch_stats"])
    y, vjp, updates = jax.vjp(forward, x, params, has_aux=True)
    return y, vjp(ct), updates

  for _ in range(3):
    jax.block_until_ready(step(variables["params"], x, ct))
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    jax.block_until_ready(step(variables["params"], x, ct))
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
  return faults / steps / (x.nbytes / 4096)

faults_per_step((8, 56, 56, 64))
print(faults_per_step((16, 56, 56, 128)))
"""


def test_tune_malloc_applies_on_glibc_and_is_opt_in():
  script = (
    "import sys, kbn_jax, kbn_jax.cpu, platform\n"
    "print(platform.libc_ver()[0], kbn_jax.cpu.tune_malloc())\n"
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  libc, applied = result.stdout.split()
  assert applied == str(libc == "glibc"), result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator setting")
def test_tuned_training_steps_reuse_mapped_pages_after_a_smaller_model():
  result = subprocess.run(
    [sys.executable, "-c", _FAULTS_PER_STEP, "tuned"], capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stderr[-3000:]
  # Untuned, or tuned without one arena, every step faults about one whole activation (1.0);
  # tuned, blocks are reused (measured 0 to 0.15).
  assert float(result.stdout.split()[-1]) < 0.5, result.stdout


def test_environment_route_and_bad_values():
  env = kbn_jax.cpu.tune_malloc_env()
  assert env == {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_ARENA_MAX": "1",
  }
  assert "MALLOC_ARENA_MAX" not in kbn_jax.cpu.tune_malloc_env(arena_max=None)
  with pytest.raises(ValueError, match="mmap_threshold"):
    kbn_jax.cpu.tune_malloc(mmap_threshold=-5)
  with pytest.raises(ValueError, match="arena_max"):
    kbn_jax.cpu.tune_malloc(arena_max=0)
  with pytest.raises(ValueError, match="arena_max"):
    kbn_jax.cpu.tune_malloc_env(arena_max=0)
  with pytest.raises(ValueError, match="threshold"):
    kbn_jax.cpu.tune_malloc_env(threshold=-1)
