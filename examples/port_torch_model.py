"""Port a whole PyTorch ResNet-18 state dict to a Flax NNX model, and check it against PyTorch.

    python examples/port_torch_model.py           # the committed state dict
    python examples/port_torch_model.py --quick   # the same (it is quick)

The user's side of a port is two pieces: the architecture in Flax NNX (`ResNet18`, mirroring
``torchvision.models.resnet18`` with PyTorch's attribute names, lists as ``nnx.List``) and
`port`, which fills it from ``model.state_dict()``. Batch norms come from
`torch_compat.load_batch_norms` (a state dict holds no ``momentum``/``eps``: they are passed as
the modules were built) and are placed by `torch_compat.graft_batch_norms`, which checks that
every batch norm of the state dict found its place (``"layer1.0.bn1"`` -> ``layer1[0].bn1``)
with the same size and settings. The other weights are transposed to Flax's layouts:

* ``Conv2d`` weights ``(out, in, kh, kw)`` become ``(kh, kw, in, out)``;
* ``Linear`` weights ``(out, in)`` become ``(in, out)``;
* PyTorch's NCHW input is transposed once to NHWC, so the batch norms use ``axis=-1``.

The committed state dict (``tests/oracles/model_ports/resnet18_w8.npz``: torchvision's ResNet-18 at
base width 8, trained three SGD steps by torch 2.13; see ``generate_torch.py`` there) is loaded
without torch, and the logits in eval and train mode and every buffer after the train-mode call
are compared with PyTorch's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kbn_jax.nnx
from kbn_jax import torch_compat

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "oracles" / "model_ports"
MOMENTUM, EPS = 0.1, 1e-5  # torchvision's BatchNorm2d defaults (PyTorch's convention)


def batch_norm(features: int, rngs: nnx.Rngs) -> kbn_jax.nnx.BatchNormalization:
  return kbn_jax.nnx.BatchNormalization(
    features, momentum=1 - MOMENTUM, epsilon=EPS, semantics="torch", rngs=rngs
  )


def conv(inputs: int, features: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  padding = [(kernel // 2, kernel // 2)] * 2
  kwargs = {"strides": stride, "padding": padding, "use_bias": False}
  return nnx.Conv(inputs, features, (kernel, kernel), **kwargs, rngs=rngs)


class BasicBlock(nnx.Module):
  def __init__(self, inplanes: int, planes: int, stride: int, rngs: nnx.Rngs):
    self.conv1, self.bn1 = conv(inplanes, planes, 3, stride, rngs), batch_norm(planes, rngs)
    self.conv2, self.bn2 = conv(planes, planes, 3, 1, rngs), batch_norm(planes, rngs)
    shortcut = stride != 1 or inplanes != planes  # a 1x1 conv and a batch norm, or nothing
    self.downsample = (
      nnx.List([conv(inplanes, planes, 1, stride, rngs), batch_norm(planes, rngs)])
      if shortcut
      else None
    )

  def __call__(self, x):
    identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
    out = nnx.relu(self.bn1(self.conv1(x)))
    return nnx.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nnx.Module):
  """torchvision's resnet18 (names and structure) at base width `width`; NCHW input."""

  def __init__(self, width: int = 8, classes: int = 5, *, rngs: nnx.Rngs):
    self.conv1, self.bn1 = conv(3, width, 7, 2, rngs), batch_norm(width, rngs)
    inplanes, widths = width, (width, 2 * width, 4 * width, 8 * width)
    for index, (planes, stride) in enumerate(zip(widths, (1, 2, 2, 2), strict=True), start=1):
      blocks = [BasicBlock(inplanes, planes, stride, rngs), BasicBlock(planes, planes, 1, rngs)]
      setattr(self, f"layer{index}", nnx.List(blocks))
      inplanes = planes
    self.fc = nnx.Linear(inplanes, classes, rngs=rngs)

  def __call__(self, x):
    x = jnp.transpose(x, (0, 2, 3, 1))  # NCHW -> NHWC
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in layer:
        x = block(x)
    return self.fc(jnp.mean(x, axis=(1, 2)))


def port(state_dict, width: int = 8, classes: int = 5) -> ResNet18:
  """The NNX model with every weight and buffer of a PyTorch ResNet-18 state dict."""
  # Shapes only: every variable is set below (a random init would only be overwritten).
  model = nnx.eval_shape(lambda: ResNet18(width, classes, rngs=nnx.Rngs(0)))
  batch_norms = torch_compat.load_batch_norms(state_dict, momentum=MOMENTUM, eps=EPS)
  torch_compat.graft_batch_norms(batch_norms, model)
  for path, node in nnx.iter_graph(model):
    name = ".".join(str(p) for p in path)
    if isinstance(node, nnx.Conv):  # (out, in, kh, kw) -> (kh, kw, in, out)
      node.kernel.set_value(jnp.asarray(np.transpose(state_dict[f"{name}.weight"], (2, 3, 1, 0))))
    elif isinstance(node, nnx.Linear):  # (out, in) -> (in, out)
      node.kernel.set_value(jnp.asarray(state_dict[f"{name}.weight"]).T)
      node.bias.set_value(jnp.asarray(state_dict[f"{name}.bias"]))
  return model


def largest_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected) / (1.0 + np.abs(expected))))


def check_against_torch(model: ResNet18, reference) -> dict[str, float]:
  """The largest relative differences from PyTorch: logits (eval, train), buffers."""
  x = jnp.asarray(reference["x"])
  forward = nnx.jit(lambda model, x: model(x))
  model.eval()
  errors = {"eval": largest_error(forward(model, x), reference["logits_eval"])}
  model.train()
  errors["train"] = largest_error(forward(model, x), reference["logits_train"])
  names = {"running_mean": "moving_mean", "running_var": "moving_variance"}
  names["num_batches_tracked"] = "num_batches_tracked"
  buffers = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, kbn_jax.nnx.BatchNormalization):
      prefix = "after/" + ".".join(str(p) for p in path)
      for theirs, ours in names.items():
        value = getattr(node, ours).get_value()
        buffers.append(largest_error(value, reference[f"{prefix}.{theirs}"]))
  errors["statistics"] = max(buffers)
  return errors


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="accepted for the smoke tests")
  parser.parse_args(argv)
  with np.load(FIXTURES / "resnet18_w8.npz") as data:
    state_dict = dict(data)  # torch.load("model.pth") gives the same names (torch tensors)
  model = port(state_dict)
  with np.load(FIXTURES / "resnet18_w8_ref.npz") as data:
    errors = check_against_torch(model, dict(data))
  count = len(torch_compat.batch_norm_prefixes(state_dict))
  print(f"resnet18_w8.npz: {count} batch norms, semantics torch")
  print(
    "  largest relative difference from PyTorch: "
    + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
  )
  assert max(errors.values()) < 1e-4, errors


if __name__ == "__main__":
  main()
