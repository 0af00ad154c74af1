"""`BatchNormConfig`: the validated, hashable configuration of one batch-normalization layer.

Every front-end (the linen Module, the NNX Module, raw JAX through `kbn_jax.functional`) and
`kbn_jax.keras_compat` describe a layer with this one object, so validation happens once, at
construction, with one set of messages. It imports neither Flax nor optax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from kbn_jax import _validation, constraints, initializers, regularizers

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

  def __post_init__(self):
    check_semantics(self.semantics, self.ghost_batch_scope, self.momentum, self.renorm)
    _validation.canonicalize_axis(self.axis)
    _validation.check_config(
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
    _validation.check_axis_index_groups(self.axis_index_groups, self.virtual_batch_size)
    for name in INITIALIZER_ARGS:
      initializers.get(getattr(self, name), argument=name)
    for name in REGULARIZER_ARGS:
      regularizers.get(getattr(self, name), argument=name)
    for name in CONSTRAINT_ARGS:
      constraints.get(getattr(self, name), argument=name)
    for name in HASHABLE_ARGS:  # after validation, so errors show the values as given
      object.__setattr__(self, name, _validation.freeze(getattr(self, name)))
    dtype = _validation.canonicalize_dtype(self.dtype, argument="dtype", allow_policy=True)
    param_dtype = _validation.canonicalize_dtype(self.param_dtype, argument="param_dtype")
    object.__setattr__(self, "dtype", dtype)
    object.__setattr__(self, "param_dtype", param_dtype)
    _validation.check_v2_fused(self)

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
