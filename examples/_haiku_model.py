"""The digits CNN of `_common.CNN` written with Haiku and `kbn_jax.haiku.BatchNormalization`,
and a trainer with the interface `_common.fit` drives (``init``, ``step``, ``evaluate``)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import optax
from _common import BN_CHOICES, NUM_CLASSES

import kbn_jax.haiku


def haiku_cnn(
  x: jax.Array,
  is_training: bool,
  renorm_clipping: Mapping[str, jax.Array] | None = None,
  *,
  bn: str,
  momentum: float = 0.99,
  virtual_batch_size: int = 8,
) -> jax.Array:
  """``(conv 3x3 -> batch norm -> relu) x 2 -> dense`` for 8x8x1 images, as `_common.CNN`.

  Args:
    x: NHWC images.
    is_training: batch statistics and updates, or inference with the moving statistics.
    renorm_clipping: per-call renorm clipping bounds (``bn="renorm"``).
    bn: ``"keras_v1"``, ``"renorm"``, ``"ghost"`` or ``"none"`` (see `_common.CNN`).
    momentum: batch-norm momentum (also renorm's).
    virtual_batch_size: ghost batch size for ``bn="ghost"``.
  """
  if bn not in BN_CHOICES:
    raise ValueError(f"`bn`={bn!r} must be one of {BN_CHOICES}.")
  for i, features in enumerate((32, 64)):
    x = hk.Conv2D(features, 3, with_bias=bn == "none")(x)
    if bn != "none":
      norm = kbn_jax.haiku.BatchNormalization(
        momentum=momentum,
        renorm=bn == "renorm",
        renorm_momentum=momentum,
        virtual_batch_size=virtual_batch_size if bn == "ghost" else None,
      )
      clipping = {"renorm_clipping": renorm_clipping} if bn == "renorm" else {}
      x = norm(x, is_training, **clipping)
    x = jax.nn.relu(x)
    if i == 0:
      x = hk.avg_pool(x, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="VALID")
  return hk.Linear(NUM_CLASSES)(x.reshape((x.shape[0], -1)))


@dataclasses.dataclass
class HaikuTrainer:
  """`_common.Trainer` for `haiku_cnn` in ``hk.transform_with_state``: jitted steps with optax.

  The training state is ``(params, state, opt_state, step)``.
  """

  bn: str
  learning_rate: float = 3e-3
  clipping_schedule: Callable[[jax.Array], Mapping[str, jax.Array]] | None = None

  def __post_init__(self):
    self.model = hk.transform_with_state(functools.partial(haiku_cnn, bn=self.bn))
    self.tx = optax.adam(self.learning_rate)
    schedule = self.clipping_schedule if self.bn == "renorm" else None

    def train_step(train_state, x, y):
      params, state, opt_state, step = train_state
      clipping = None if schedule is None else schedule(step)

      def loss_fn(params):
        logits, new_state = self.model.apply(params, state, None, x, True, clipping)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

      (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), state, opt_state, step + 1), loss

    def accuracy(train_state, x, y):
      params, state, _, _ = train_state
      logits, _ = self.model.apply(params, state, None, x, False)
      return jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))

    self.step = jax.jit(train_step)
    self.evaluate = jax.jit(accuracy)

  def init(self, seed: int, x: Any):
    params, state = jax.jit(self.model.init, static_argnums=2)(
      jax.random.key(seed), jnp.asarray(x), True
    )
    return params, state, self.tx.init(params), jnp.zeros((), jnp.int32)
