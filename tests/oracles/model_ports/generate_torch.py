"""Generate the whole-model fixture of a reduced-width PyTorch ResNet-18 (issue 20).

torchvision's ResNet-18, built by hand with torchvision's module names (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.bn1``, ``layer2.0.downsample.0/1``, ``fc``) but base width 8
instead of 64, so that the state dict stays small. It is trained a few SGD steps on random data;
then one batch is recorded: the logits in eval and in train mode, and every buffer after that
train-mode call. Run from the repository root in the oracle environment (torch 2.13 CPU)::

    python tests/oracles/model_ports/generate_torch.py   # resnet18_w8.npz, _ref.npz, .json

The state dict is saved as ``.npz`` (PyTorch's key names) so that the tests read it without
torch; ``torch.save(model.state_dict(), "m.pth")`` and ``torch.load`` give the same dict.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
WIDTH, CLASSES, SHAPE, BATCH, TRAIN_STEPS, SEED = 8, 5, (3, 32, 32), 8, 3, 30


class BasicBlock(nn.Module):
  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
      )

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
  """torchvision.models.resnet18's structure and names, widths (w, 2w, 4w, 8w)."""

  def __init__(self, width: int = WIDTH, classes: int = CLASSES):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for index, (planes, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), start=1):
      blocks = [
        BasicBlock(inplanes, planes * width, stride),
        BasicBlock(planes * width, planes * width, 1),
      ]
      setattr(self, f"layer{index}", nn.Sequential(*blocks))
      inplanes = planes * width
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(inplanes, classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for index in range(1, 5):
      x = getattr(self, f"layer{index}")(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


def main() -> int:
  torch.manual_seed(SEED)
  torch.set_num_threads(1)
  model = ResNet18()
  rng = np.random.default_rng(SEED)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
  model.train()
  for _ in range(TRAIN_STEPS):
    x = torch.from_numpy(rng.normal(size=(BATCH, *SHAPE)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, CLASSES, BATCH))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  np.savez_compressed(HERE / "resnet18_w8.npz", **state)

  x = (rng.normal(size=(BATCH, *SHAPE)) * 2 + 0.5).astype(np.float32)
  out = {"x": x}
  with torch.no_grad():
    model.eval()
    out["logits_eval"] = model(torch.from_numpy(x)).numpy()
    model.train()
    out["logits_train"] = model(torch.from_numpy(x)).numpy()  # moves the running statistics
  for key, value in model.state_dict().items():
    if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
      out[f"after/{key}"] = value.numpy()
  np.savez_compressed(HERE / "resnet18_w8_ref.npz", **out)
  meta = {
    "model": f"torchvision resnet18 structure and names, base width {WIDTH}, {CLASSES} classes",
    "training": f"SGD(0.05), {TRAIN_STEPS} steps of batch {BATCH} on random data, seed {SEED}",
    "recorded": "logits of x in eval mode, then in train mode; buffers after that call",
    "batch_norms": sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
    "momentum": 0.1,
    "eps": 1e-5,
    "torch_version": torch.__version__,
  }
  (HERE / "resnet18_w8.json").write_text(json.dumps(meta, indent=1) + "\n")
  print("resnet18_w8.npz", (HERE / "resnet18_w8.npz").stat().st_size, "bytes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
