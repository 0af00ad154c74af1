"""The digits CNN of `_common.CNN` written with Equinox and `kbn_jax.equinox.BatchNormalization`,
and a trainer with the interface `_common.fit` drives (``init``, ``step``, ``evaluate``).

The model is written as Equinox teaches: per example (channels first), ``jax.vmap`` with an
``axis_name`` around the whole model, the statistics in an ``eqx.nn.State``, inference by
``eqx.nn.inference_mode``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _common import BN_CHOICES, NUM_CLASSES

import kbn_jax.equinox

_AXIS = "batch"


class EquinoxCNN(eqx.Module):
  """``(conv 3x3 -> batch norm -> relu) x 2 -> dense`` for one 1x8x8 image, as `_common.CNN`.

  Args:
    bn: ``"keras_v1"``, ``"renorm"`` or ``"none"`` (see `_common.CNN`); ghost batches split the
      batch, which a per-example model does not see (use the linen or Haiku example).
    key: parameter initialization.
    momentum: batch-norm momentum (also renorm's).
  """

  convs: list[eqx.nn.Conv2d]
  norms: list[kbn_jax.equinox.BatchNormalization]
  head: eqx.nn.Linear
  pool: eqx.nn.AvgPool2d
  renorm: bool = eqx.field(static=True)

  def __init__(self, bn: str, *, key: jax.Array, momentum: float = 0.99):
    if bn not in BN_CHOICES or bn == "ghost":
      raise ValueError(f"`bn`={bn!r} must be one of {[b for b in BN_CHOICES if b != 'ghost']}.")
    self.renorm = bn == "renorm"
    keys = jax.random.split(key, 3)
    self.convs = [
      eqx.nn.Conv2d(c_in, c_out, 3, padding="SAME", use_bias=bn == "none", key=k)
      for (c_in, c_out), k in zip(((1, 32), (32, 64)), keys[:2], strict=True)
    ]
    self.norms = []
    if bn != "none":
      self.norms = [
        kbn_jax.equinox.BatchNormalization(
          c, _AXIS, axis=0, momentum=momentum, renorm=self.renorm, renorm_momentum=momentum
        )
        for c in (32, 64)
      ]
    self.pool = eqx.nn.AvgPool2d(2, 2)
    self.head = eqx.nn.Linear(4 * 4 * 64, NUM_CLASSES, key=keys[2])

  def __call__(self, x, state, renorm_clipping: Mapping[str, jax.Array] | None = None):
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if self.norms:
        clipping = {"renorm_clipping": renorm_clipping} if self.renorm else {}
        x, state = self.norms[i](x, state, **clipping)
      x = jax.nn.relu(x)
      if i == 0:
        x = self.pool(x)
    return self.head(x.reshape(-1)), state


def _batched(model):
  """The per-example model over a batch: statistics across the vmap axis, one state."""
  return jax.vmap(model, axis_name=_AXIS, in_axes=(0, None, None), out_axes=(0, None))


def _channels_first(x) -> jax.Array:
  return jnp.moveaxis(jnp.asarray(x), -1, 1)  # NHWC digits -> per-example (C, H, W)


@dataclasses.dataclass
class EquinoxTrainer:
  """`_common.Trainer` for `EquinoxCNN`: an ``eqx.filter_jit`` step with optax.

  The training state is ``(model, state, opt_state, step)``.
  """

  bn: str
  learning_rate: float = 3e-3
  clipping_schedule: Callable[[jax.Array], Mapping[str, jax.Array]] | None = None

  def __post_init__(self):
    self.tx = optax.adam(self.learning_rate)

  def init(self, seed: int, x: Any):
    del x  # Equinox layers know their sizes from the constructor
    model, state = eqx.nn.make_with_state(EquinoxCNN)(self.bn, key=jax.random.key(seed))
    opt_state = self.tx.init(eqx.filter(model, eqx.is_inexact_array))
    return model, state, opt_state, jnp.zeros((), jnp.int32)

  def step(self, train_state, x, y):
    schedule = self.clipping_schedule if self.bn == "renorm" else None
    return _train_step(train_state, _channels_first(x), jnp.asarray(y), self.tx, schedule)

  def evaluate(self, train_state, x, y) -> jax.Array:
    model, state, _, _ = train_state
    return _accuracy(eqx.nn.inference_mode(model), state, _channels_first(x), jnp.asarray(y))


@eqx.filter_jit
def _train_step(train_state, x, y, tx, clipping_schedule):
  model, state, opt_state, step = train_state
  clipping = None if clipping_schedule is None else clipping_schedule(step)

  def loss_fn(model, state):
    logits, state = _batched(model)(x, state, clipping)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

  (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
  updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
  return (eqx.apply_updates(model, updates), state, opt_state, step + 1), loss


@eqx.filter_jit
def _accuracy(model, state, x, y):
  logits, _ = _batched(model)(x, state, None)
  return jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
