"""Generate PyTorch BatchNorm fixtures (semantics "torch").

The oracle is ``torch.nn.BatchNorm1d/2d/3d`` on CPU, float32 (torch 2.13.0+cpu for the
committed fixtures). Run from the repository root in an environment with torch::

    python tests/oracles/framework_parity/generate_torch.py  # all torch cases + edge cases
    python tests/oracles/framework_parity/generate_torch.py bn2d bn1d_cma

Writes ``fixtures/torch_<name>.npz|json`` and ``fixtures/torch_edge_cases.json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

# state-dict key -> init_* array of _common.make_arrays
_INIT = {
  "weight": "init_gamma",
  "bias": "init_beta",
  "running_mean": "init_moving_mean",
  "running_var": "init_moving_variance",
}


def _versions() -> dict:
  return {"torch_version": torch.__version__, "torch_num_threads": torch.get_num_threads()}


def _state(module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def run_case(case: dict):
  arrays = _common.make_arrays(case)
  torch.manual_seed(case["seed"])
  cls = getattr(torch.nn, case["module"])
  num_features = case["input_shape"][1]
  module = cls(num_features, **case["config"])
  with torch.no_grad():
    if case["random_init"]:
      for key, src in _INIT.items():
        t = getattr(module, key, None)
        if t is not None:
          t.copy_(torch.from_numpy(arrays[src]))
    if case.get("num_batches_tracked0") is not None:
      module.num_batches_tracked.fill_(int(case["num_batches_tracked0"]))

  out = {k: v for k, v in arrays.items() if not k.startswith("init_")}
  state_keys = list(module.state_dict().keys())
  for key, value in _state(module).items():
    out[f"w0_{key}"] = value

  module.train()
  params = [(n, p) for n, p in (("weight", module.weight), ("bias", module.bias)) if p is not None]
  factors = []
  for k in range(case["steps"]):
    x = torch.from_numpy(arrays[f"x_{k}"]).requires_grad_(True)
    dy = torch.from_numpy(arrays[f"dy_{k}"])
    for _, p in params:
      p.grad = None
    y = module(x)
    loss = (y.float() * dy).sum()
    loss.backward()
    out[f"y_{k}"] = y.detach().numpy()
    out[f"grad_x_{k}"] = x.grad.numpy()
    for n, p in params:
      out[f"grad_{n}_{k}"] = p.grad.detach().numpy().copy()
    for key, value in _state(module).items():
      out[f"w{k + 1}_{key}"] = value
    if module.momentum is None and module.track_running_stats:
      factors.append(1.0 / float(module.num_batches_tracked))

  module.eval()
  with torch.no_grad():
    out["y_infer"] = module(torch.from_numpy(arrays["x_infer"])).numpy()

  meta = {
    "case": case,
    "semantics": "torch",
    "module_class": f"torch.nn.{case['module']}",
    "module_repr": repr(module),
    "num_features": num_features,
    "state_dict_keys": state_keys,
    "state_dict_dtypes": {k: str(v.dtype) for k, v in module.state_dict().items()},
    "state_dict_shapes": {k: list(v.shape) for k, v in module.state_dict().items()},
    "momentum": module.momentum,
    "eps": module.eps,
    "affine": module.affine,
    "track_running_stats": module.track_running_stats,
    "cma_factors": factors,
    "output_dtype": out["y_0"].dtype.name,
    **_versions(),
  }
  return out, meta


def edge_cases() -> dict:
  res = {}
  # n = 1 value per channel while training: the module raises, after incrementing
  # num_batches_tracked.
  bn = torch.nn.BatchNorm1d(3)
  try:
    bn(torch.ones(1, 3))
    res["bn1d_n1_train"] = {"result": "ok"}
  except Exception as e:  # noqa: BLE001
    res["bn1d_n1_train"] = {
      "result": "raises",
      "exception": type(e).__name__,
      "message": str(e),
      "num_batches_tracked_after": int(bn.num_batches_tracked),
      "running_var_after": bn.running_var.tolist(),
    }
  bn = torch.nn.BatchNorm2d(3)
  try:
    bn(torch.ones(1, 3, 1, 1))
  except Exception as e:  # noqa: BLE001
    res["bn2d_1x1_n1_train"] = {"exception": type(e).__name__, "message": str(e)}
  # (1, C, L) with L > 1 is allowed: n = L
  bn = torch.nn.BatchNorm1d(2)
  x = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
  bn(x)
  res["bn1d_batch1_length2"] = {
    "input": x.tolist(),
    "running_mean": bn.running_mean.tolist(),
    "running_var": bn.running_var.tolist(),
    "note": "n = 1*2 = 2 per channel: unbiased var = 2*biased",
  }
  # The functional op itself with n = 1 (no Python check): running_var becomes NaN (0/0).
  rm, rv = torch.zeros(2), torch.ones(2)
  y = torch.batch_norm(torch.tensor([[1.0, 2.0]]), None, None, rm, rv, True, 0.1, 1e-5, False)
  res["torch_batch_norm_op_n1"] = {
    "y": y.tolist(),
    "running_mean": rm.tolist(),
    "running_var": rv.tolist(),
  }
  # eval with track_running_stats=False normalizes with batch statistics
  bn = torch.nn.BatchNorm1d(2, track_running_stats=False).eval()
  x = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
  res["no_running_stats_eval"] = {
    "input": x.tolist(),
    "y": bn(x).tolist(),
    "state_dict_keys": list(bn.state_dict()),
  }
  # momentum=None in eval: no update, no increment
  bn = torch.nn.BatchNorm1d(2, momentum=None).eval()
  bn(x)
  res["cma_eval_no_increment"] = {"num_batches_tracked": int(bn.num_batches_tracked)}
  # num_batches_tracked increments with a float momentum too
  bn = torch.nn.BatchNorm1d(2)
  bn(x)
  bn(x)
  res["ema_increments_num_batches_tracked"] = {
    "num_batches_tracked": int(bn.num_batches_tracked),
    "dtype": str(bn.num_batches_tracked.dtype),
    "shape": list(bn.num_batches_tracked.shape),
  }
  # affine=False / track_running_stats=False state dicts
  res["state_dict_keys"] = {
    "default": list(torch.nn.BatchNorm2d(2).state_dict()),
    "affine=False": list(torch.nn.BatchNorm2d(2, affine=False).state_dict()),
    "track_running_stats=False": list(
      torch.nn.BatchNorm2d(2, track_running_stats=False).state_dict()
    ),
    "bias=False": list(torch.nn.BatchNorm2d(2, bias=False).state_dict()),
  }
  # input rank checks
  for cls, shape in (
    ("BatchNorm1d", (2, 3, 2, 2)),
    ("BatchNorm2d", (2, 3)),
    ("BatchNorm3d", (2, 3, 2, 2)),
  ):
    try:
      getattr(torch.nn, cls)(3)(torch.ones(*shape))
    except Exception as e:  # noqa: BLE001
      res[f"{cls}_rank_check"] = {
        "input_shape": list(shape),
        "exception": type(e).__name__,
        "message": str(e),
      }
  # eps must be positive in training
  try:
    torch.nn.BatchNorm1d(2, eps=0.0)(x)
  except Exception as e:  # noqa: BLE001
    res["eps0_train"] = {"exception": type(e).__name__, "message": str(e)}
  res.update(_versions())
  return res


def main(argv: list[str]) -> int:
  cases = _common.select(_common.load_cases("torch"), argv)
  for case in cases:
    out, meta = run_case(case)
    _common.write_fixture(f"torch_{case['name']}", out, meta)
    last = case["steps"]
    rv = out.get(f"w{last}_running_var")
    rv_s = [round(float(v), 5) for v in rv.ravel()[:3]] if rv is not None else None
    nbt = (
      int(out[f"w{last}_num_batches_tracked"]) if f"w{last}_num_batches_tracked" in out else None
    )
    print(f"torch_{case['name']:36s} keys={meta['state_dict_keys']} nbt={nbt} rv[{last}]={rv_s}")
  if not argv:
    _common.write_json("torch_edge_cases.json", edge_cases())
    print("wrote torch_edge_cases.json")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
