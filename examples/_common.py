"""Shared pieces of the examples: the digits data, small networks, and a jit-able train step.

The data is scikit-learn's bundled copy of the UCI 8x8 handwritten digits (1797 images), so the
examples run offline. Install the extras with ``pip install -e ".[examples]"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kbn_jax

BN_CHOICES = ("keras_v1", "renorm", "ghost", "none")
NUM_CLASSES = 10


class Digits(NamedTuple):
  """Train and test splits, images as float32 ``(N, 8, 8, 1)`` in [0, 1], labels as int32."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Digits:
  """Loads scikit-learn's bundled digits and makes a stratified train/test split.

  Args:
    test_fraction: share of the 1797 images held out for testing.
    seed: seed of the split.

  Returns:
    The split as `Digits`.
  """
  from sklearn.datasets import load_digits as sklearn_digits  # noqa: PLC0415 (optional extra)
  from sklearn.model_selection import train_test_split  # noqa: PLC0415

  data = sklearn_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images, labels, test_size=test_fraction, random_state=seed, stratify=labels
  )
  return Digits(x_train, y_train, x_test, y_test)


def renorm_warmup(step: jax.typing.ArrayLike, hold_steps: int) -> dict[str, jax.Array]:
  """The clipping warm-up of Ioffe (2017), section 4.1, scaled to a short run.

  The paper keeps ``rmax = 1, dmax = 0`` (plain batch norm) for the first 5k steps, then relaxes
  them linearly to ``rmax = 3`` at 40k steps and ``dmax = 5`` at 25k steps. Here the hold lasts
  `hold_steps` and the ramps end at ``8 * hold_steps`` and ``5 * hold_steps``, the same
  proportions. The result is a dict of traced scalars for
  ``BatchNormalization.__call__(..., renorm_clipping=...)``, so a jitted step does not recompile
  as they change.

  Args:
    step: the current step (a traced integer under ``jit``).
    hold_steps: steps of plain batch norm before the bounds start to relax (> 0).

  Returns:
    ``{"rmax": ..., "rmin": 1 / rmax, "dmax": ...}`` as float32 scalars.
  """
  step = jnp.asarray(step, jnp.float32)

  def ramp(end_steps: int) -> jax.Array:
    return jnp.clip((step - hold_steps) / (end_steps - hold_steps), 0.0, 1.0)

  rmax = 1.0 + 2.0 * ramp(8 * hold_steps)
  return {"rmax": rmax, "rmin": 1.0 / rmax, "dmax": 5.0 * ramp(5 * hold_steps)}


class _BatchNormNet(nn.Module):
  """Fields and the ``batch norm -> relu`` block shared by `CNN` and `MLP`.

  Attributes:
    bn: ``"keras_v1"`` (Keras V1 batch norm), ``"renorm"`` (batch renormalization, clipping given
      per call), ``"ghost"`` (ghost batches of `virtual_batch_size`) or ``"none"`` (linear layers
      with a bias and no normalization; this is also the layout of a BN-folded model).
    momentum: batch-norm momentum (Keras's default is 0.99), also renorm's.
    virtual_batch_size: ghost batch size for ``bn="ghost"``.
  """

  bn: str = "keras_v1"
  momentum: float = 0.99
  virtual_batch_size: int = 8

  def __post_init__(self):
    if self.bn not in BN_CHOICES:
      raise ValueError(f"`bn`={self.bn!r} must be one of {BN_CHOICES}.")
    super().__post_init__()

  def _bn_relu(self, x, index, training, renorm_clipping):
    bn = batch_norm_layer(self, name=f"bn{index}")
    if bn is not None:
      clipping = {"renorm_clipping": renorm_clipping} if self.bn == "renorm" else {}
      x = bn(x, training=training, **clipping)
    return nn.relu(x)


class CNN(_BatchNormNet):
  """``(conv 3x3 -> batch norm -> relu) x 2 -> dense`` for 8x8x1 images, with an average pool.

  Attributes:
    features: channels of the two convolutions (the other fields: see `_BatchNormNet`).
  """

  features: tuple[int, ...] = (32, 64)

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    training: bool = False,
    renorm_clipping: Mapping[str, jax.Array] | None = None,
  ) -> jax.Array:
    for i, features in enumerate(self.features):
      x = nn.Conv(features, (3, 3), use_bias=self.bn == "none", name=f"conv{i}")(x)
      x = self._bn_relu(x, i, training, renorm_clipping)
      if i == 0:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(NUM_CLASSES, name="head")(x)


class MLP(_BatchNormNet):
  """``(dense -> batch norm -> relu) x 2 -> dense`` on the flattened image.

  Batch norm after a dense layer has only the minibatch to average over (after a convolution it
  also averages over positions), so it shows the effect of small or skewed minibatches clearly.

  Attributes:
    features: widths of the hidden layers (the other fields: see `_BatchNormNet`).
  """

  features: tuple[int, ...] = (128, 128)

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    training: bool = False,
    renorm_clipping: Mapping[str, jax.Array] | None = None,
  ) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i, features in enumerate(self.features):
      x = nn.Dense(features, use_bias=self.bn == "none", name=f"dense{i}")(x)
      x = self._bn_relu(x, i, training, renorm_clipping)
    return nn.Dense(NUM_CLASSES, name="head")(x)


def batch_norm_layer(
  model: _BatchNormNet, name: str | None = None
) -> kbn_jax.BatchNormalization | None:
  """The batch-norm layer `model` uses (``None`` for ``bn="none"``); also for folding."""
  if model.bn == "none":
    return None
  return kbn_jax.BatchNormalization(
    momentum=model.momentum,
    renorm=model.bn == "renorm",
    renorm_momentum=model.momentum,
    virtual_batch_size=model.virtual_batch_size if model.bn == "ghost" else None,
    name=name,
  )


class SyncedCNN(nn.Module):
  """``(conv 3x3 -> batch norm -> relu) x 2 -> dense`` for 8x8x1 images (second conv strided),
  the model of the data-parallel examples.

  Attributes:
    axis_name: the mapped or mesh axis the batch statistics are synchronized over (``None``
      under sharded jit, where the batch is one global array).
  """

  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, training: bool = False) -> jax.Array:
    for features, stride in ((16, 1), (32, 2)):
      x = nn.Conv(features, (3, 3), strides=stride, use_bias=False)(x)
      x = kbn_jax.BatchNormalization(momentum=0.9, axis_name=self.axis_name)(x, training=training)
      x = nn.relu(x)
    return nn.Dense(NUM_CLASSES)(x.reshape((x.shape[0], -1)))


class TrainState(NamedTuple):
  """Everything a train step carries: a pytree, so it can be scanned and vmapped."""

  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array


def make_key(seed: int) -> jax.Array:
  """A PRNG key for initialization.

  It uses ``impl="rbg"`` (XLA's RngBitGenerator): on CPU, programs that draw from it compile
  several times faster than with the default threefry, which matters for short runs.
  """
  return jax.random.key(seed, impl="rbg")


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  clipping_schedule: Callable[[jax.Array], Mapping[str, jax.Array]] | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
  """Builds ``step(state, x, y) -> (state, loss)``, pure and ready for ``jit``/``scan``/``vmap``.

  Args:
    model: the network.
    tx: the optimizer.
    clipping_schedule: for ``bn="renorm"``: ``step -> renorm_clipping`` (e.g. `renorm_warmup`),
      evaluated on the traced step count, so changing bounds never trigger a recompilation.

  Returns:
    The step function (not yet jitted).
  """

  def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
    clipping = None if clipping_schedule is None else clipping_schedule(state.step)

    def loss_fn(params):
      logits, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        x,
        training=True,
        renorm_clipping=clipping,
        mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates.get("batch_stats", {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, batch_stats, opt_state, state.step + 1), loss

  return step


def accuracy(model: nn.Module, state: TrainState, x: jax.Array, y: jax.Array) -> jax.Array:
  """Inference-mode accuracy (moving statistics, nothing mutated), as a float32 scalar."""
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x)
  return jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))


@dataclasses.dataclass
class Trainer:
  """A jitted train step and evaluation for one model, driven from Python (one step per call).

  Attributes:
    model: the network.
    learning_rate: Adam's learning rate.
    clipping_schedule: the renorm clipping schedule (ignored unless ``model.bn == "renorm"``).
  """

  model: nn.Module
  learning_rate: float = 3e-3
  clipping_schedule: Callable[[jax.Array], Mapping[str, jax.Array]] | None = None

  def __post_init__(self):
    self.tx = optax.adam(self.learning_rate)
    schedule = self.clipping_schedule if self.model.bn == "renorm" else None
    self.step = jax.jit(make_train_step(self.model, self.tx, schedule))
    self.evaluate = jax.jit(lambda state, x, y: accuracy(self.model, state, x, y))
    # One compiled call each instead of many eager operations; kept so that they compile once.
    self._init_variables = jax.jit(self.model.init)
    self._init_optimizer = jax.jit(self.tx.init)

  def init(self, seed: int, x: np.ndarray) -> TrainState:
    """Parameters, moving statistics and optimizer state for `seed`; `x` is a sample batch."""
    variables = self._init_variables(make_key(seed), jnp.asarray(x))
    params = variables["params"]
    return TrainState(
      params,
      variables.get("batch_stats", {}),
      self._init_optimizer(params),
      jnp.zeros((), jnp.int32),
    )


def epoch_batches(num_examples: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
  """Indices of one shuffled epoch, ``(num_examples // batch_size, batch_size)``; the last
  partial batch is dropped so that every step has the same shape (no recompilation)."""
  order = rng.permutation(num_examples)
  steps = num_examples // batch_size
  return order[: steps * batch_size].reshape(steps, batch_size)


def fit(
  trainer: Trainer,
  data: Digits,
  *,
  epochs: int,
  batch_size: int,
  seed: int = 0,
  max_steps_per_epoch: int | None = None,
) -> tuple[TrainState, float]:
  """Trains with one tqdm progress bar per epoch and evaluates on the test set after each.

  Returns:
    The final state and its inference-mode test accuracy.
  """
  from tqdm import tqdm  # noqa: PLC0415 (optional extra)

  state = trainer.init(seed, data.x_train[:batch_size])
  rng = np.random.default_rng(seed)
  test_accuracy = float("nan")
  for epoch in range(1, epochs + 1):
    batches = epoch_batches(len(data.x_train), batch_size, rng)[:max_steps_per_epoch]
    with tqdm(total=len(batches), desc=f"epoch {epoch}/{epochs}", unit="step") as bar:
      for indices in batches:
        state, loss = trainer.step(state, data.x_train[indices], data.y_train[indices])
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
        bar.update()
      test_accuracy = float(trainer.evaluate(state, data.x_test, data.y_test))
      bar.set_postfix(loss=f"{float(loss):.3f}", test_acc=f"{test_accuracy:.2%}")
  return state, test_accuracy
