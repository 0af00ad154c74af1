"""The digits CNN of `_common.CNN` written with Flax NNX and `kbn_jax.nnx.BatchNormalization`,
and a trainer with the interface `_common.fit` drives (``init``, ``step``, ``evaluate``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from _common import BN_CHOICES, NUM_CLASSES
from flax import nnx

import kbn_jax.nnx


class NnxCNN(nnx.Module):
  """``(conv 3x3 -> batch norm -> relu) x 2 -> dense`` for 8x8x1 images, as `_common.CNN`.

  Args:
    bn: ``"keras_v1"``, ``"renorm"``, ``"ghost"`` or ``"none"`` (see `_common.CNN`).
    momentum: batch-norm momentum (also renorm's).
    virtual_batch_size: ghost batch size for ``bn="ghost"``.
    rngs: parameter initialization.
  """

  def __init__(self, bn: str, *, momentum: float = 0.99, virtual_batch_size: int = 8, rngs):
    if bn not in BN_CHOICES:
      raise ValueError(f"`bn`={bn!r} must be one of {BN_CHOICES}.")
    self.renorm = bn == "renorm"
    self.convs, self.norms = nnx.List(), nnx.List()
    for features_in, features in ((1, 32), (32, 64)):
      self.convs.append(nnx.Conv(features_in, features, (3, 3), use_bias=bn == "none", rngs=rngs))
      if bn != "none":
        self.norms.append(
          kbn_jax.nnx.BatchNormalization(
            features,
            momentum=momentum,
            renorm=self.renorm,
            renorm_momentum=momentum,
            virtual_batch_size=virtual_batch_size if bn == "ghost" else None,
            rngs=rngs,
          )
        )
    self.head = nnx.Linear(4 * 4 * 64, NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array, renorm_clipping: Mapping[str, jax.Array] | None = None):
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if self.norms:
        clipping = {"renorm_clipping": renorm_clipping} if self.renorm else {}
        x = self.norms[i](x, **clipping)  # the mode comes from model.train() / model.eval()
      x = nnx.relu(x)
      if i == 0:
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    return self.head(x.reshape((x.shape[0], -1)))


@dataclasses.dataclass
class NnxTrainer:
  """`_common.Trainer` for `NnxCNN`: ``nnx.Optimizer`` and ``nnx.jit`` steps.

  The training state is ``(model, optimizer)``, updated in place by each step.
  """

  bn: str
  learning_rate: float = 3e-3
  clipping_schedule: Callable[[jax.Array], Mapping[str, jax.Array]] | None = None

  def init(self, seed: int, x: Any) -> tuple[NnxCNN, nnx.Optimizer]:
    del x  # NNX layers know their sizes from the constructor
    model = NnxCNN(self.bn, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adam(self.learning_rate), wrt=nnx.Param)

  def step(self, state, x, y):
    model, optimizer = state
    model.train()
    return state, _train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y), self._schedule())

  def evaluate(self, state, x, y) -> jax.Array:
    model, _ = state
    model.eval()  # inference: the moving statistics
    return _accuracy(model, jnp.asarray(x), jnp.asarray(y))

  def _schedule(self):
    return self.clipping_schedule if self.bn == "renorm" else None


@nnx.jit(static_argnums=4)
def _train_step(model, optimizer, x, y, clipping_schedule):
  clipping = None if clipping_schedule is None else clipping_schedule(optimizer.step[...])

  def loss_fn(model):
    logits = model(x, renorm_clipping=clipping)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def _accuracy(model, x, y):
  return jnp.mean((jnp.argmax(model(x), axis=-1) == y).astype(jnp.float32))
