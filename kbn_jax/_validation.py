"""Argument checks shared by the Module and the Keras config importer.

Pure-configuration checks run at construction (`check_config`); checks that need the input's
shape run at trace time (`normalize_axes`, `check_virtual_batch`, ...). Every message names the
argument, the value received, what is allowed, and the fix.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


class FrozenMapping(Mapping):
  """An immutable, hashable dict (equal to any mapping with the same items)."""

  def __init__(self, items: Mapping[str, Any]):
    self._items = dict(items)

  def __getitem__(self, key):
    return self._items[key]

  def __iter__(self):
    return iter(self._items)

  def __len__(self):
    return len(self._items)

  def __hash__(self):
    return hash(tuple(sorted(self._items.items(), key=lambda item: str(item[0]))))

  def __repr__(self):
    return f"FrozenMapping({self._items!r})"


def freeze(value: Any, mapping_type: type = FrozenMapping) -> Any:
  """A hashable copy of a configuration value: dicts become `mapping_type`, lists tuples.

  Configurations must be hashable, so that a layer can be a static argument of `jax.jit`.
  """
  if isinstance(value, Mapping):
    return mapping_type({key: freeze(item, mapping_type) for key, item in value.items()})
  if isinstance(value, list | tuple):
    return tuple(freeze(item, mapping_type) for item in value)
  return value


_KERAS_MIXED_POLICIES = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def canonicalize_dtype(dtype: Any, *, argument: str, allow_policy: bool = False) -> Any:
  """Checks a floating dtype; with `allow_policy`, Keras's mixed policy names are accepted.

  Args:
    dtype: ``None``, a floating dtype or its name; or ``"mixed_float16"``/``"mixed_bfloat16"``
      (Keras policies: 16-bit compute and output, float32 variables) when `allow_policy`.
    argument: the argument name, for the error message.
    allow_policy: whether Keras policy names are accepted.

  Returns:
    ``None`` or a dtype.

  Raises:
    TypeError: for anything that is not a floating dtype.
  """
  if dtype is None:
    return None
  if allow_policy and isinstance(dtype, str) and dtype in _KERAS_MIXED_POLICIES:
    dtype = _KERAS_MIXED_POLICIES[dtype]
  try:
    resolved = jnp.dtype(dtype)
  except TypeError:
    resolved = None
  if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
    allowed = "float16, bfloat16, float32 or float64"
    if allow_policy:
      allowed += ', or a Keras policy "mixed_float16"/"mixed_bfloat16"'
    raise TypeError(f"`{argument}`={dtype!r} is not a floating dtype; pass {allowed}.")
  return resolved


def canonicalize_axis(axis: Any) -> int | tuple[int, ...]:
  """Checks the type of `axis` as Keras does at construction; lists become tuples.

  Args:
    axis: an int, or a list/tuple of ints.

  Returns:
    The int unchanged, or a tuple of ints.

  Raises:
    TypeError: if `axis` is not an int or a list/tuple of ints (NumPy integers are rejected,
      as Keras rejects them).
  """
  if isinstance(axis, (list, tuple)):
    if not axis:
      raise ValueError(
        "`axis`=[] is empty; pass at least one feature axis, e.g. axis=-1 for channels-last."
      )
    for a in axis:
      if not isinstance(a, int):
        raise TypeError(
          f"Expected an int or a list/tuple of ints for the argument 'axis', but received: "
          f"{axis!r} (element {a!r} is a {type(a).__name__}); pass Python ints, e.g. "
          f"axis={[int(v) if isinstance(v, numbers.Integral) else v for v in axis]!r}."
        )
    return tuple(axis)
  if isinstance(axis, int):
    return axis
  raise TypeError(
    "Expected an int or a list/tuple of ints for the argument 'axis', but received: "
    f"{axis!r} of type {type(axis).__name__}; pass a Python int such as axis=-1 "
    "(convert NumPy integers with int(...))."
  )


def normalize_axes(axis: int | tuple[int, ...], rank: int) -> tuple[int, ...]:
  """Resolves `axis` against the input rank like Keras's `validate_axis`.

  Args:
    axis: the canonical `axis` (int or tuple of ints).
    rank: the input's rank.

  Returns:
    The feature axes as non-negative ints, in the order given.

  Raises:
    ValueError: for a scalar input, an axis out of range, or a duplicate axis.
  """
  if rank == 0:
    raise ValueError(
      "Input has undefined rank. Received: input_shape=() (a scalar); BatchNormalization "
      "needs at least one feature axis, so pass an array of rank >= 1."
    )
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  resolved = tuple(a + rank if a < 0 else a for a in axes)
  if any(not 0 <= a < rank for a in resolved):
    raise ValueError(
      "Invalid value for `axis` argument. Expected 0 <= axis < inputs.rank (with "
      f"inputs.rank={rank}). Received: axis={axis!r} (normalized: {resolved}); pass axes "
      f"between {-rank} and {rank - 1}."
    )
  if len(set(resolved)) != len(resolved):
    raise ValueError(
      f"Duplicate axis: `axis`={axis!r} names the same axis twice once negative values are "
      f"resolved for rank {rank} ({resolved}); list each feature axis once."
    )
  return resolved


def check_renorm_clipping(renorm_clipping: Any) -> None:
  """Checks `renorm_clipping` keys and value types (Keras validates only the keys)."""
  if renorm_clipping is None:
    return
  if not isinstance(renorm_clipping, Mapping):
    raise TypeError(
      f"`renorm_clipping` must be a dict with keys among {list(RENORM_CLIPPING_KEYS)}, but "
      f"received {renorm_clipping!r}; e.g. renorm_clipping={{'rmax': 3.0, 'dmax': 5.0}}."
    )
  bad = set(renorm_clipping) - set(RENORM_CLIPPING_KEYS)
  if bad:
    raise ValueError(
      f"Received invalid keys for `renorm_clipping` argument: {bad}. Supported values: "
      f"{list(RENORM_CLIPPING_KEYS)}."
    )
  for key, value in renorm_clipping.items():
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
      raise TypeError(
        f"`renorm_clipping[{key!r}]`={value!r} must be a real number or None (no clipping); "
        "to change clipping per step under jit, pass traced values to the call through "
        "`renorm_clipping=` instead."
      )


def check_config(
  *,
  momentum: Any,
  epsilon: Any,
  renorm: bool,
  renorm_clipping: Any,
  renorm_momentum: Any,
  fused: Any,
  virtual_batch_size: Any,
  adjustment: Any,
  flags: Mapping[str, Any],
) -> None:
  """Checks every pure-configuration argument of `BatchNormalization`.

  Args:
    momentum, epsilon, renorm, renorm_clipping, renorm_momentum, fused, virtual_batch_size,
    adjustment: the constructor arguments of the same names.
    flags: boolean arguments by name (`center`, `scale`, `renorm`, `trainable`).

  Raises:
    TypeError, ValueError: naming the argument and the fix.
  """
  for name, value in flags.items():
    if not isinstance(value, bool):
      raise TypeError(f"`{name}`={value!r} must be a Python bool (True or False).")
  _check_unit_interval("momentum", momentum)
  if renorm:
    _check_unit_interval("renorm_momentum", renorm_momentum)
    check_renorm_clipping(renorm_clipping)
  if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
    raise TypeError(f"`epsilon`={epsilon!r} must be a real number such as 1e-3.")
  if not epsilon >= 0:
    raise ValueError(
      f"`epsilon`={epsilon!r} must be >= 0; it is added to the variance before the square "
      "root, so use a small positive value such as 1e-3."
    )
  if fused is not None and not isinstance(fused, bool):
    raise TypeError(f"`fused`={fused!r} must be None, True or False.")
  if virtual_batch_size is not None:
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
      raise TypeError(
        f"`virtual_batch_size`={virtual_batch_size!r} must be a positive Python int or None."
      )
    if virtual_batch_size <= 0:
      raise ValueError(
        "`virtual_batch_size` must be a positive integer that divides the true batch size of "
        f"the input tensor. Received: virtual_batch_size={virtual_batch_size}; pass e.g. 32, "
        "or None to disable ghost batches."
      )
    if adjustment is not None:
      raise ValueError(
        "When using `virtual_batch_size`, adjustment cannot be specified; pass "
        "`adjustment=None` or `virtual_batch_size=None`."
      )
  if adjustment is not None and not callable(adjustment):
    raise TypeError(
      f"`adjustment`={adjustment!r} must be a callable `adjustment(shape) -> (scale, bias)`."
    )


def check_optional_bool(name: str, value: Any) -> None:
  """Raises unless `value` is None or a Python bool."""
  if value is not None and not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}`={value!r} must be None, True or False.")


def _check_unit_interval(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"`{name}`={value!r} must be a real number in [0, 1], such as 0.99.")
  if not 0.0 <= value <= 1.0:
    raise ValueError(
      f"`{name}`={value!r} must be in [0, 1]: it is the weight of the old value in the moving "
      f"average (0.99 keeps 99%); pass e.g. {name}=0.99."
    )


def check_ghost_batch_axes(axes: Sequence[int]) -> None:
  """Raises if a feature axis is the batch axis, which ghost batches split."""
  if 0 in axes:
    raise ValueError(
      "When using `virtual_batch_size`, the batch dimension must be 0 and thus axis cannot "
      f"include 0. Received axis={list(axes)}; move the batch to dimension 0 or drop "
      "`virtual_batch_size`."
    )


def check_ghost_batch_size(
  virtual_batch_size: int, batch_size: Any, local_ghost_size: int | None = None
) -> None:
  """Raises if `virtual_batch_size` does not divide the batch size (a training-time check).

  Args:
    virtual_batch_size: the ghost batch size.
    batch_size: this call's (per-device) batch size; symbolic under a shape-polymorphic export.
    local_ghost_size: with ``ghost_batch_scope="global"``, the rows of the global layout that
      each device holds (``virtual_batch_size`` divided by the device count).
  """
  divisor = virtual_batch_size if local_ghost_size is None else local_ghost_size
  if batch_size % divisor == 0:  # also true of a symbolic batch declared as a multiple
    return
  if not isinstance(batch_size, int):
    raise ValueError(
      f"`virtual_batch_size`={virtual_batch_size} must divide the batch size, but the batch "
      f"size is symbolic ({batch_size}), as in a shape-polymorphic `jax.export`. Export with "
      f"a concrete batch size, or declare the batch a multiple of {divisor}, e.g. "
      f'`jax.export.symbolic_shape("{divisor}*k, ...")`.'
    )
  if local_ghost_size is None:
    raise ValueError(
      f"`virtual_batch_size`={virtual_batch_size} must divide the batch size {batch_size}; "
      f"choose a batch size that is a multiple of {virtual_batch_size}."
    )
  devices = virtual_batch_size // local_ghost_size
  raise ValueError(
    f"`virtual_batch_size`={virtual_batch_size} must divide the global batch size "
    f"{batch_size * devices} ({devices} devices x {batch_size}); with "
    f"`ghost_batch_scope`='global' each device's batch must be a multiple of {divisor}."
  )


_V2_FUSED_AXES = (-4, -3, -1, 1, 3, 4)
_V2_FIX = " Pass fused=None (or False) to let the layer choose, as Keras V1 does silently."


def _v2_fused_problems(config: Any) -> list[str]:
  """Keras V2's construction-time reasons why a layer cannot fuse, in Keras's order."""
  axis = config.axis if isinstance(config.axis, tuple) else (config.axis,)
  compute = None if config.dtype is None else jnp.dtype(config.dtype).name
  problems = []
  if config.renorm:
    problems.append("Passing both `fused=True` and `renorm=True` is not supported.")
  if len(axis) > 1 or axis[0] not in _V2_FUSED_AXES:
    problems.append(
      "Passing `fused=True` is only supported when axis is 1 or 3 for input rank = 4 or 1 or "
      f"4 for input rank = 5. Got axis {list(axis)}."
    )
  if config.virtual_batch_size is not None:
    problems.append("Passing `fused=True` is not supported when `virtual_batch_size` is specified.")
  if config.adjustment is not None:
    problems.append("Passing `fused=True` is not supported when `adjustment` is specified.")
  if compute not in (None, "float16", "bfloat16", "float32"):
    problems.append(
      "Passing `fused=True` is only supported when the compute dtype is float16, bfloat16, or "
      f"float32. Got dtype: {compute}."
    )
  return problems


def check_v2_fused(config: Any) -> None:
  """Raises, as Keras V2's constructor does, for an explicit ``fused=True`` that cannot fuse."""
  if config.semantics == "keras_v2" and config.fused is True:
    problems = _v2_fused_problems(config)
    if problems:
      raise ValueError(problems[0] + _V2_FIX)


def v2_fused_allowed(config: Any) -> bool:
  """Whether Keras V2 keeps ``fused`` undecided until build (no construction-time obstacle)."""
  return not _v2_fused_problems(config)


def raise_v2_fused_rank_error(rank: int) -> None:
  """Keras V2's build-time error for an explicit ``fused=True`` on a rank other than 4 or 5."""
  raise ValueError(
    "Batch normalization layers with `fused=True` only support 4D or 5D input tensors. "
    f"Received tensor with rank {rank}." + _V2_FIX
  )


def raise_v2_fused_axis_error(axes: Sequence[int]) -> None:
  """Keras V2's build-time error for a rank-4 fused layer whose axis is not 1 or 3."""
  raise ValueError(
    "Unsupported axis. The use of `fused=True` is only possible with `axis=1` or `axis=3` for "
    f"4D input tensors. Received: axis={tuple(axes)}. Keras V2 raises this even for fused=None "
    "(a negative axis such as -4 that resolves to 0); pass fused=False, or an axis of 1 or 3."
  )


def check_renorm_clipping_keys(renorm_clipping: Any) -> None:
  """Checks the keys of per-call clipping bounds (their values may be traced)."""
  if not isinstance(renorm_clipping, Mapping):
    raise TypeError(
      f"`renorm_clipping`={renorm_clipping!r} must be a dict with keys among "
      f"{list(RENORM_CLIPPING_KEYS)}."
    )
  bad = set(renorm_clipping) - set(RENORM_CLIPPING_KEYS)
  if bad:
    raise ValueError(
      f"Received invalid keys for `renorm_clipping` argument: {bad}. Supported values: "
      f"{list(RENORM_CLIPPING_KEYS)}."
    )


def check_training(training: Any, static_hint: str) -> bool:
  """Returns `training` as a Python bool; traced values and strings are rejected.

  Keras's other spellings are accepted: 0/1, NumPy bools, and ``None``, which Keras resolves to
  the learning phase, 0 (inference) in TF2.

  Args:
    training: the value given.
    static_hint: how the caller's API makes an argument static (in the words of that API).
  """
  if training is None:
    return False
  if isinstance(training, (bool, np.bool_)):
    return bool(training)
  if isinstance(training, numbers.Integral) and training in (0, 1):
    return bool(training)
  if isinstance(training, str):
    raise TypeError(
      f"`training`={training!r} must be a Python bool, not a string: pass True or False (a "
      "non-empty string such as 'False' would read as true)."
    )
  if isinstance(training, jax.core.Tracer):
    raise TypeError(
      f"`training`={training!r} is traced, but it must be a Python bool: it selects the "
      f"computation, so it is static: {static_hint}."
    )
  raise TypeError(
    f"`training`={training!r} must be a Python bool (True or False), 0/1, or None (inference)."
  )


def check_mask_shape(mask_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> None:
  """Raises unless ``expand_dims(mask, -1)`` broadcasts to the input (Keras's rule)."""
  expanded = tuple(mask_shape) + (1,)
  compatible = len(expanded) == len(input_shape) and all(
    m in (1, i) for m, i in zip(expanded, input_shape, strict=True)
  )
  if not compatible:
    raise ValueError(
      f"`mask` of shape {tuple(mask_shape)} does not match inputs of shape "
      f"{tuple(input_shape)}: it must have shape inputs.shape[:-1] = "
      f"{tuple(input_shape[:-1])} (one weight per position, shared by the last axis)."
    )


def check_axis_index_groups(axis_index_groups: Any, virtual_batch_size: int | None) -> None:
  """Checks that `axis_index_groups` is a partition into equal-size groups of indices."""
  if axis_index_groups is None:
    return
  if virtual_batch_size is not None:
    raise ValueError(
      "`axis_index_groups` cannot be combined with `virtual_batch_size`: ghost batches that "
      "span devices form their own groups. Drop `axis_index_groups`."
    )
  if not _is_sequence(axis_index_groups) or not all(_is_sequence(g) for g in axis_index_groups):
    raise TypeError(
      f"`axis_index_groups`={axis_index_groups!r} must be a list of lists of device indices, "
      "e.g. [[0, 1, 2, 3], [4, 5, 6, 7]]."
    )
  groups = [list(group) for group in axis_index_groups]
  flat = [index for group in groups for index in group]
  if (
    not groups
    or any(not isinstance(i, int) or isinstance(i, bool) for i in flat)
    or sorted(flat) != list(range(len(flat)))
    or len({len(group) for group in groups}) != 1
  ):
    raise ValueError(
      f"`axis_index_groups`={axis_index_groups!r} must split the device indices "
      "0..N-1 into groups of equal size, each index once, e.g. [[0, 1, 2, 3], [4, 5, 6, 7]]."
    )


def _is_sequence(value: Any) -> bool:
  return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def check_adjustment_shape(part: str, shape: tuple[int, ...], input_shape: tuple[int, ...]) -> None:
  """Raises unless the adjustment's `part` ("scale" or "bias") broadcasts to the input."""
  fits = len(shape) <= len(input_shape) and all(
    s in (1, i) for s, i in zip(reversed(shape), reversed(input_shape), strict=False)
  )
  if not fits:
    raise ValueError(
      f"`adjustment` returned a {part} of shape {tuple(shape)}, which does not broadcast to "
      f"the input shape {tuple(input_shape)}; return arrays that broadcast to it, e.g. with "
      "the input's sizes on the feature axes and 1 on every other axis."
    )


_INIT_HINT = (
  "Re-run `init` with an input of the new shape, or feed inputs of the shape used at `init`."
)


def check_feature_shape(
  name: str, actual: tuple[int, ...], expected: tuple[int, ...], hint: str = _INIT_HINT
) -> None:
  """Raises if a stored variable was built for other feature sizes than this input has."""
  if tuple(actual) != tuple(expected):
    raise ValueError(
      f"`{name}` has shape {tuple(actual)} but this input's feature axes have size "
      f"{tuple(expected)}; the variables were built for another feature dimension. {hint}"
    )
