"""CPU-only tuning: keep XLA's large buffers in glibc's heap instead of fresh ``mmap`` calls.

XLA:CPU allocates every output and temporary buffer of a compiled computation with ``malloc``.
With glibc's defaults, a block of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB, rising
dynamically to at most 32 MiB) is served by a fresh anonymous ``mmap`` and returned with
``munmap`` when freed. A multi-megabyte activation is therefore mapped anew on every step, and
its first write page-faults on every 4 KiB page. Measured on a 2-core AMD EPYC (fresh process
per setting, medians): ``jax.jit(lambda x: x * 2 + 1)`` on a 51 MB array took 20.6 ms with the
defaults and 2.6 ms with the thresholds raised (either way below), and a kbn_jax training step
(forward, input/gamma/beta cotangents, statistics) 2.2x to 2.9x less time on NHWC activations
of 17 to 51 MB. TensorFlow pools its own memory and does not pay this.

Raising the thresholds is not enough on its own: XLA's worker threads each get their own glibc
arena, whose heaps are at most 64 MiB, and a training step that runs after a smaller one in the
same process (an evaluation pass, another model) kept page-faulting one whole activation per
step (a 16x56x56x128 step: 6,273 faults per step, every step). With one arena
(``M_ARENA_MAX=1``) every block comes from the main heap and the faults stop (0 to 0.15
activations per step over 20 steps); the 32x56x56x128 step run after an 8x112x112x64 one took
24-26 ms instead of 43-46 ms.

Raising glibc's mmap and trim thresholds, with one arena, makes such blocks come from the heap
and stay there once freed, so the next step reuses memory whose pages are already mapped. Two
ways:

* in the environment, before Python starts (`tune_malloc_env` gives the variables)::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_ARENA_MAX=1 \
      python train.py

* in the process, as early as possible (before JAX starts its threads and allocates its first
  large arrays)::

    import kbn_jax.cpu
    kbn_jax.cpu.tune_malloc()

The cost: memory freed by the process is kept by the allocator for reuse instead of going back
to the operating system, so the resident size stays at its high-water mark (a training loop
reuses it each step; a process that peaks once and then idles keeps the peak). Heap
fragmentation may also grow, and threads that ``malloc`` blocks larger than glibc's per-thread
cache (above 1 KiB) take turns on the one arena's lock. Nothing here is applied at import; it
only matters on CPU and only with glibc (Linux); GPU and TPU buffers are allocated by their own
runtimes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import warnings

__all__ = ["DEFAULT_THRESHOLD", "tune_malloc", "tune_malloc_env"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# mallopt takes a C int: the largest value it accepts (2 GiB - 1). Blocks below it come from
# the heap; activations larger than 2 GiB are still mapped one by one, which costs little
# relative to their size.
DEFAULT_THRESHOLD = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
  """glibc's ``libc`` through ctypes, or None on another C library or platform."""
  if platform.system() != "Linux":
    return None
  libc_version = platform.libc_ver()[0]
  if libc_version != "glibc":
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  if not hasattr(libc, "mallopt"):
    return None
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.mallopt.restype = ctypes.c_int
  return libc


def _check_int(
  name: str, value: int, low: int, unit: str, high: int = DEFAULT_THRESHOLD, kind: str = "C int"
) -> int:
  """`value` as an int in ``[low, high]`` (a `kind` number of `unit`), else a ValueError."""
  value = int(value)
  if not low <= value <= high:
    raise ValueError(
      f"`{name}`={value} is outside [{low}, {high}]: glibc takes a {kind} number of {unit}."
    )
  return value


def tune_malloc(
  mmap_threshold: int = DEFAULT_THRESHOLD,
  trim_threshold: int = DEFAULT_THRESHOLD,
  arena_max: int | None = 1,
) -> bool:
  """Raises glibc's mmap and trim thresholds and keeps one arena in this process, for CPU speed.

  Blocks smaller than `mmap_threshold` bytes then come from the heap instead of a fresh
  ``mmap`` each, up to `trim_threshold` bytes of free memory at the top of the heap are kept
  instead of being returned to the system, and the threads share `arena_max` arenas. XLA:CPU's
  per-step activation buffers then reuse already-mapped pages instead of page-faulting on every
  step (see the module docstring for measurements). Call it once, first thing: blocks
  allocated before the call keep their old home, and threads that already allocated (JAX's,
  once it has computed anything) keep their arena.

  What it costs: freed memory stays with the process (its resident size stays at its peak),
  the heap may fragment, and threads allocating blocks above 1 KiB share the arena's lock. It
  changes nothing on GPU or TPU buffers and is never applied by importing kbn_jax. Setting
  both thresholds explicitly also turns off glibc's dynamic threshold adjustment.

  Args:
    mmap_threshold: ``M_MMAP_THRESHOLD`` in bytes (glibc's default is 128 KiB, adjusted up to
      32 MiB as blocks are freed).
    trim_threshold: ``M_TRIM_THRESHOLD`` in bytes (glibc's default is 128 KiB).
    arena_max: ``M_ARENA_MAX``, the number of arenas threads may use (glibc's default is 8 per
      core); None leaves it as it is.

  Returns:
    True if every setting was applied; False (with a `RuntimeWarning`) where the C library is
    not glibc, e.g. on macOS, Windows or musl-based Linux.

  Raises:
    ValueError: if a threshold is negative, `arena_max` is below 1, or one does not fit a C int.
  """
  settings = {
    _M_MMAP_THRESHOLD: _check_int("mmap_threshold", mmap_threshold, 0, "bytes"),
    _M_TRIM_THRESHOLD: _check_int("trim_threshold", trim_threshold, 0, "bytes"),
  }
  if arena_max is not None:
    settings[_M_ARENA_MAX] = _check_int("arena_max", arena_max, 1, "arenas")
  libc = _glibc()
  if libc is None:
    warnings.warn(
      "kbn_jax.cpu.tune_malloc: the C library is not glibc "
      f"({platform.system()} {platform.libc_ver()[0] or 'unknown libc'}); nothing was changed.",
      RuntimeWarning,
      stacklevel=2,
    )
    return False
  applied = all([libc.mallopt(parameter, value) == 1 for parameter, value in settings.items()])
  if not applied:
    warnings.warn(
      "kbn_jax.cpu.tune_malloc: glibc's mallopt rejected the settings "
      f"(mmap_threshold={mmap_threshold}, trim_threshold={trim_threshold}, "
      f"arena_max={arena_max}).",
      RuntimeWarning,
      stacklevel=2,
    )
  return applied


def tune_malloc_env(threshold: int = 2**32, arena_max: int | None = 1) -> dict[str, str]:
  """The environment variables that give a *new* process the effect of `tune_malloc`.

  glibc reads them at program start, so they must be set before Python starts (in the
  shell, a launcher script, or the ``env`` of a ``subprocess``), e.g.::

    env = {**os.environ, **kbn_jax.cpu.tune_malloc_env()}
    subprocess.run([sys.executable, "train.py"], env=env)

  Args:
    threshold: bytes, for both ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
      (the environment route takes a size_t, so values above 2 GiB work).
    arena_max: ``MALLOC_ARENA_MAX``; None leaves it out.

  Returns:
    ``{"MALLOC_MMAP_THRESHOLD_": ..., "MALLOC_TRIM_THRESHOLD_": ..., "MALLOC_ARENA_MAX": ...}``.

  Raises:
    ValueError: if `threshold` is negative or `arena_max` is below 1.
  """
  value = str(_check_int("threshold", threshold, 0, "bytes", high=2**64 - 1, kind="size_t"))
  env = {"MALLOC_MMAP_THRESHOLD_": value, "MALLOC_TRIM_THRESHOLD_": value}
  if arena_max is not None:
    env["MALLOC_ARENA_MAX"] = str(_check_int("arena_max", arena_max, 1, "arenas"))
  return env
