"""`BatchNormConfig`: the validated, hashable configuration of one batch-normalization layer.

Every front-end (linen, NNX, Equinox, Haiku, raw JAX through `kbn_jax.functional`) and the Keras
side describe a layer with this one object, so validation happens once, at construction, with
one set of messages: a config is its validation. Every message names the argument, the value
received, what is allowed, and the fix. It imports neither Flax nor optax.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import jax.numpy as jnp

from kbn_jax import constraints, initializers, regularizers

SEMANTICS = ("keras_v1", "keras_v2", "keras3", "torch")
GHOST_BATCH_SCOPES = ("device", "global")

INITIALIZER_ARGS = (
  "beta_initializer",
  "gamma_initializer",
  "moving_mean_initializer",
  "moving_variance_initializer",
)
REGULARIZER_ARGS = ("beta_regularizer", "gamma_regularizer")
CONSTRAINT_ARGS = ("beta_constraint", "gamma_constraint")
# Lists and dicts (Keras configs, axes, clipping bounds, groups) are frozen so configs hash.
HASHABLE_ARGS = (
  ("axis", "renorm_clipping", "axis_index_groups")
  + INITIALIZER_ARGS
  + REGULARIZER_ARGS
  + CONSTRAINT_ARGS
)


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
  """Everything that defines a batch-normalization layer except its variables.

  The fields are the Keras ``BatchNormalization`` arguments (same names and defaults) plus the
  JAX ones; `kbn_jax.BatchNormalization` documents each. Construction validates every field
  and freezes lists and dicts, so a config is hashable (a static argument of `jax.jit`).

  Example::

    >>> from kbn_jax import functional
    >>> config = functional.BatchNormConfig(momentum=0.9, axis=[1, 3])
    >>> config.axis, hash(config) == hash(functional.BatchNormConfig(momentum=0.9, axis=(1, 3)))
    ((1, 3), True)

  Attributes:
    semantics: whose layer is reproduced: ``"keras_v1"`` (default), ``"keras_v2"`` (TF2
      tf.keras: ``trainable=False`` runs in inference mode), ``"keras3"`` (also never a Bessel
      correction) or ``"torch"`` (unbiased running variance, ``momentum=None`` is PyTorch's
      cumulative average).
    ghost_batch_scope: where ghost batches live under `axis_name`: ``"device"`` (each device
      splits its own batch, as Keras under tf.distribute) or ``"global"`` (the one-device
      layout of the whole global batch).
  """

  axis: int | Sequence[int] = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-3
  center: bool = True
  scale: bool = True
  beta_initializer: Any = "zeros"
  gamma_initializer: Any = "ones"
  moving_mean_initializer: Any = "zeros"
  moving_variance_initializer: Any = "ones"
  beta_regularizer: Any = None
  gamma_regularizer: Any = None
  beta_constraint: Any = None
  gamma_constraint: Any = None
  renorm: bool = False
  renorm_clipping: Mapping[str, float] | None = None
  renorm_momentum: float = 0.99
  fused: bool | None = None
  trainable: bool = True
  virtual_batch_size: int | None = None
  adjustment: Callable[..., tuple[Any, Any]] | None = None
  axis_name: Any = None
  axis_index_groups: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  semantics: str = "keras_v1"
  ghost_batch_scope: str = "device"

  def __post_init__(self) -> None:
    check_semantics(self.semantics, self.ghost_batch_scope, self.momentum, self.renorm)
    canonicalize_axis(self.axis)
    check_config(
      semantics=self.semantics,
      momentum=0.0 if self.momentum is None else self.momentum,
      epsilon=self.epsilon,
      renorm=self.renorm,
      renorm_clipping=self.renorm_clipping,
      renorm_momentum=self.renorm_momentum,
      fused=self.fused,
      virtual_batch_size=self.virtual_batch_size,
      adjustment=self.adjustment,
      flags={
        "center": self.center,
        "scale": self.scale,
        "renorm": self.renorm,
        "trainable": self.trainable,
      },
    )
    check_axis_index_groups(self.axis_index_groups, self.virtual_batch_size)
    for name in INITIALIZER_ARGS:
      initializers.get(getattr(self, name), argument=name)
    for name in REGULARIZER_ARGS:
      regularizers.get(getattr(self, name), argument=name)
    for name in CONSTRAINT_ARGS:
      constraints.get(getattr(self, name), argument=name)
    for name in HASHABLE_ARGS:  # after validation, so errors show the values as given
      object.__setattr__(self, name, freeze(getattr(self, name)))
    dtype = canonicalize_dtype(self.dtype, argument="dtype", allow_policy=True)
    param_dtype = canonicalize_dtype(self.param_dtype, argument="param_dtype")
    object.__setattr__(self, "dtype", dtype)
    object.__setattr__(self, "param_dtype", param_dtype)
    check_v2_fused(self)

  @classmethod
  def from_attributes(cls, owner: Any) -> BatchNormConfig:
    """The config of a front-end object whose attributes carry the field names."""
    return cls(**{field.name: getattr(owner, field.name) for field in dataclasses.fields(cls)})

  @property
  def frozen_layer_is_inference(self) -> bool:
    """Whether ``trainable=False`` turns training calls into inference (V2, Keras 3)."""
    return not self.trainable and self.semantics in ("keras_v2", "keras3")

  def replace(self, **changes: Any) -> BatchNormConfig:
    """A copy with `changes` applied (and validated)."""
    return dataclasses.replace(self, **changes)


FIELD_NAMES = tuple(field.name for field in dataclasses.fields(BatchNormConfig))


def from_front_end_arguments(
  kwargs: Mapping[str, Any], *, layer: str, also: str, **fixed: Any
) -> BatchNormConfig:
  """The config of a front-end built with Keras's keyword arguments; unknown names raise.

  Args:
    kwargs: the keyword arguments the front-end received for the config.
    layer: the front-end's name, for the message (e.g. ``"kbn_jax.nnx.BatchNormalization"``).
    also: the front-end's own arguments, for the message.
    **fixed: config fields the front-end takes as its own arguments (e.g. ``axis_name``).
  """
  unknown = sorted(set(kwargs) - set(FIELD_NAMES))
  if unknown:
    raise TypeError(
      f"Unknown arguments {unknown} for {layer}; it takes {also} and the Keras arguments "
      f"{list(FIELD_NAMES)}."
    )
  return BatchNormConfig(**kwargs, **fixed)


def add_config_views(cls: type) -> None:
  """Gives a front-end class read-only properties for every config field, as on linen's."""
  for name in FIELD_NAMES:
    setattr(cls, name, _config_view(name))


def _config_view(name: str) -> property:
  def view(self: Any) -> Any:
    return getattr(self.config, name)

  return property(view, doc=f"The layer's `{name}`.")


def check_semantics(semantics: Any, ghost_batch_scope: Any, momentum: Any, renorm: Any) -> None:
  """Checks `semantics`, `ghost_batch_scope`, PyTorch's ``momentum=None`` and renorm."""
  if semantics not in SEMANTICS:
    raise ValueError(
      f"`semantics`={semantics!r} is not one of {list(SEMANTICS)}; pass 'keras_v1' (the Keras "
      "2.x V1 layer, default), 'keras_v2' (TF2 tf.keras), 'keras3' or 'torch'."
    )
  if ghost_batch_scope not in GHOST_BATCH_SCOPES:
    raise ValueError(
      f"`ghost_batch_scope`={ghost_batch_scope!r} is not one of {list(GHOST_BATCH_SCOPES)}; "
      "pass 'device' (each device splits its own batch) or 'global' (the one-device layout "
      "of the whole global batch)."
    )
  if renorm and semantics == "torch":
    raise ValueError(
      "`renorm`=True has no PyTorch counterpart; with `semantics`='torch' pass renorm=False, "
      "or pick a Keras semantics for Batch Renormalization."
    )
  if momentum is None and semantics != "torch":
    raise ValueError(
      "`momentum`=None (PyTorch's cumulative moving average) needs `semantics`='torch'; "
      "pass a momentum in [0, 1] such as 0.99, or semantics='torch'."
    )


RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


class FrozenMapping(Mapping[str, Any]):
  """An immutable, hashable dict (equal to any mapping with the same items)."""

  def __init__(self, items: Mapping[str, Any]):
    self._items = dict(items)

  def __getitem__(self, key: str) -> Any:
    return self._items[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __hash__(self) -> int:
    return hash(tuple(sorted(self._items.items(), key=lambda item: str(item[0]))))

  def __repr__(self) -> str:
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


def check_renorm_clipping(renorm_clipping: Any, semantics: str) -> None:
  """Checks `renorm_clipping`: its keys, finite real values, and Keras 3's order checks.

  Keras 2 validates only the keys; a NaN bound would train to NaN, so it is refused here too.
  """
  if renorm_clipping is None:
    return
  check_renorm_clipping_keys(renorm_clipping)
  for key, value in renorm_clipping.items():
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
      raise TypeError(_clipping_type_message(key, value))
    if value is not None and math.isnan(value):
      raise ValueError(
        f"`renorm_clipping[{key!r}]` is NaN, which would make every output NaN; pass a number, "
        "or leave the key out (no clipping)."
      )
  if semantics == "keras3":
    rmax, rmin, dmax = (renorm_clipping.get(key) for key in RENORM_CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
      raise ValueError(
        "rmax should be greater than rmin in the `renorm_clipping` argument. "
        f"Received: rmax={rmax}, rmin={rmin}."
      )
    if dmax is not None and dmax < 0:
      raise ValueError(
        f"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}."
      )


def _clipping_type_message(key: str, value: Any) -> str:
  return (
    f"`renorm_clipping[{key!r}]`={value!r} must be a real number or None (no clipping); to "
    "change clipping per step under jit, pass traced values to the call through "
    "`renorm_clipping=` instead."
  )


def check_config(
  *,
  semantics: str,
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
    semantics, momentum, epsilon, renorm, renorm_clipping, renorm_momentum, fused,
    virtual_batch_size, adjustment: the constructor arguments of the same names.
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
    check_renorm_clipping(renorm_clipping, semantics)
  if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
    raise TypeError(f"`epsilon`={epsilon!r} must be a real number such as 1e-3.")
  if not cast(float, epsilon) >= 0:
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


def _check_unit_interval(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"`{name}`={value!r} must be a real number in [0, 1], such as 0.99.")
  if not 0.0 <= cast(float, value) <= 1.0:
    raise ValueError(
      f"`{name}`={value!r} must be in [0, 1]: it is the weight of the old value in the moving "
      f"average (0.99 keeps 99%); pass e.g. {name}=0.99."
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


def check_renorm_clipping_keys(renorm_clipping: Any) -> None:
  """Checks the keys of clipping bounds (per-call values may be traced)."""
  if not isinstance(renorm_clipping, Mapping):
    raise TypeError(
      f"`renorm_clipping`={renorm_clipping!r} must be a dict with keys among "
      f"{list(RENORM_CLIPPING_KEYS)}, e.g. renorm_clipping={{'rmax': 3.0, 'dmax': 5.0}}."
    )
  bad = set(renorm_clipping) - set(RENORM_CLIPPING_KEYS)
  if bad:
    raise ValueError(
      f"Received invalid keys for `renorm_clipping` argument: {bad}. Supported values: "
      f"{list(RENORM_CLIPPING_KEYS)}."
    )
