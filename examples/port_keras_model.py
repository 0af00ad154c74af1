"""Port a whole keras.applications MobileNetV2 file to a Flax model, and check it against Keras.

    python examples/port_keras_model.py                 # the committed tf_keras and Keras 3 files
    python examples/port_keras_model.py --file m.keras  # your own (alpha 0.35, 32x32, 5 classes)
    python examples/port_keras_model.py --quick         # the tf_keras file only

The user's side of a port is two pieces: the architecture written in Flax (`MobileNetV2`,
mirroring ``keras.applications.mobilenet_v2`` with Keras's layer names) and `port`, which reads
every weight from the file. Batch norms come from `keras_compat.load_batch_norms` (with the
semantics the file was saved with) and are placed by `keras_compat.graft_batch_norms`, which
checks that every batch norm of the file found its place; every other layer's weights come from
`keras_compat.load_layer_weights` (the same safe reader). Layer by layer:

* ``Conv2D`` kernels ``(kh, kw, in, out)`` are Flax's layout as they are;
* ``DepthwiseConv2D`` kernels ``(kh, kw, C, 1)`` become ``(kh, kw, 1, C)`` for ``nn.Conv`` with
  ``feature_group_count=C``;
* ``padding="same"`` is ``"SAME"`` (TensorFlow's rule, the same in XLA); the stride-2 blocks'
  ``ZeroPadding2D(correct_pad(x, 3))`` + ``"valid"`` is an explicit padding;
* ``ReLU(6.)`` is ``clip(x, 0, 6)``, ``Add`` is ``+``, ``GlobalAveragePooling2D`` a mean.

For the committed files (``tests/oracles/model_ports``, written by tf_keras 2.21 and Keras 3.15.1
after
three SGD steps; see ``generate_keras.py`` there), the Flax model's logits in inference and
training mode and every moving statistic after the training-mode call are compared with
Keras's own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kbn_jax
from kbn_jax import keras_compat

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "oracles" / "model_ports"
COMMITTED = ("mobilenet_v2_tf_keras.h5", "mobilenet_v2_keras3.keras")
# (expansion, filters, stride) of blocks 0..16, as keras.applications.mobilenet_v2 builds them.
BLOCKS = [(1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1), (6, 32, 1)]
BLOCKS += [(6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1), (6, 96, 1), (6, 96, 1), (6, 96, 1)]
BLOCKS += [(6, 160, 2), (6, 160, 1), (6, 160, 1), (6, 320, 1)]


def make_divisible(value: float, divisor: int = 8) -> int:
  """Keras's `_make_divisible`: the nearest multiple of 8, never 10% below `value`."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class MobileNetV2(nn.Module):
  """keras.applications.MobileNetV2 (channels last, logits), with Keras's layer names."""

  alpha: float = 0.35
  classes: int = 5
  semantics: str = "keras_v2"  # what load_batch_norms detected in the file

  @nn.compact
  def __call__(self, x, training: bool = False):
    def bn(name, x):
      layer = kbn_jax.BatchNormalization(
        momentum=0.999, epsilon=1e-3, semantics=self.semantics, name=name
      )
      return layer(x, training=training)

    def conv(name, x, features, kernel=1, stride=1):
      return nn.Conv(features, (kernel, kernel), stride, "SAME", use_bias=False, name=name)(x)

    def depthwise(name, x, stride):
      size = x.shape[1:3]  # Keras's correct_pad(x, 3) before a stride-2 "valid" convolution
      padding = "SAME" if stride == 1 else [(s % 2, 1) for s in size]
      channels = x.shape[-1]
      layer = nn.Conv(
        channels, (3, 3), stride, padding, feature_group_count=channels, use_bias=False, name=name
      )
      return layer(x)

    relu6 = lambda x: jnp.clip(x, 0.0, 6.0)  # noqa: E731
    x = relu6(bn("bn_Conv1", conv("Conv1", x, make_divisible(32 * self.alpha), 3, 2)))
    for block_id, (expansion, filters, stride) in enumerate(BLOCKS):
      prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
      y = x
      if block_id:
        y = relu6(bn(prefix + "expand_BN", conv(prefix + "expand", y, expansion * x.shape[-1])))
      y = relu6(bn(prefix + "depthwise_BN", depthwise(prefix + "depthwise", y, stride)))
      out = make_divisible(int(filters * self.alpha))
      y = bn(prefix + "project_BN", conv(prefix + "project", y, out))
      x = x + y if stride == 1 and x.shape[-1] == out else y
    x = relu6(bn("Conv_1_bn", conv("Conv_1", x, 1280)))
    return nn.Dense(self.classes, name="predictions")(jnp.mean(x, axis=(1, 2)))


def port(path: Path, input_shape=(1, 32, 32, 3)) -> tuple[MobileNetV2, dict]:
  """The Flax model and its complete variables, every weight read from the Keras file."""
  batch_norms = keras_compat.load_batch_norms(path)  # {name: (module, variables)}
  settings = {(m.momentum, m.epsilon, m.semantics) for m, _ in batch_norms.values()}
  (momentum, epsilon, semantics), *others = settings
  assert not others and (momentum, epsilon) == (0.999, 1e-3), settings  # as the model builds
  model = MobileNetV2(semantics=semantics)
  # Shapes only: every variable is read from the file (and init would compile the model).
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape))
  params = dict(shapes["params"])
  for name, layer in params.items():
    if name in batch_norms:
      continue
    kernel, *bias = keras_compat.load_layer_weights(path, name)
    if name.endswith("depthwise"):
      kernel = np.transpose(kernel, (0, 1, 3, 2))  # (kh, kw, C, 1) -> (kh, kw, 1, C)
    assert kernel.shape == layer["kernel"].shape, (name, kernel.shape, layer["kernel"].shape)
    params[name] = {"kernel": jnp.asarray(kernel), **dict(zip(["bias"], bias, strict=False))}
  variables = {"params": params, "batch_stats": shapes["batch_stats"]}
  return model, keras_compat.graft_batch_norms(batch_norms, variables)


def largest_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected) / (1.0 + np.abs(expected))))


def check_against_keras(model, variables, reference) -> dict[str, float]:
  """The largest relative differences from Keras: logits (inference, training), statistics."""
  x = jnp.asarray(reference["x"])
  apply = jax.jit(model.apply, static_argnames=("training", "mutable"))
  logits_train, updates = apply(variables, x, training=True, mutable=("batch_stats",))
  stats = updates["batch_stats"]
  statistics = [
    largest_error(stats[key.split("/", 1)[1]][key.split("/", 1)[0]], value)
    for key, value in reference.items()
    if key.startswith(("moving_mean/", "moving_variance/"))
  ]
  return {
    "inference": largest_error(apply(variables, x), reference["logits_infer"]),
    "training": largest_error(logits_train, reference["logits_train"]),
    "statistics": max(statistics),
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--file", type=Path, help="a MobileNetV2 .h5 or .keras file of your own")
  parser.add_argument("--quick", action="store_true", help="accepted for the smoke tests")
  args = parser.parse_args(argv)
  committed = COMMITTED[:1] if args.quick else COMMITTED
  for path in [args.file] if args.file else [FIXTURES / name for name in committed]:
    model, variables = port(path)
    print(f"{path.name}: {len(variables['batch_stats'])} batch norms, semantics {model.semantics}")
    reference_path = path.with_suffix(".npz")
    if reference_path.exists():
      with np.load(reference_path) as data:
        errors = check_against_keras(model, variables, dict(data))
      print(
        "  largest relative difference from Keras: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
      )
      assert max(errors.values()) < 1e-4, errors


if __name__ == "__main__":
  main()
