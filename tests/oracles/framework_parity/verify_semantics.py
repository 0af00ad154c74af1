"""Check the claims of SEMANTICS.md against the committed fixtures (numpy only).

    python tests/oracles/framework_parity/verify_semantics.py

For every fixture it rebuilds outputs, gradients and the statistics after each step from the
float64 reference written in SEMANTICS.md and compares them to the real library's numbers
(tolerance 2e-5, float16 outputs 2e-3). It also evaluates the tempting *wrong* readings
(a frozen layer that uses batch statistics, Bessel on Keras 3 rank 4, a biased torch
running_var at rank 2, ...) and asserts that they do *not* match, so the fixtures really pin
the behaviour down. Needs numpy only; the bit-exact arithmetic checks that need the live
libraries are in ``bitexact_checks.py``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIX = HERE / "fixtures"


def _load_cases_module():
  spec = importlib.util.spec_from_file_location("framework_parity_cases", HERE / "cases.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


F64 = np.float64


def load(stem):
  meta = json.loads((FIX / f"{stem}.json").read_text())
  arr = dict(np.load(FIX / f"{stem}.npz"))
  return meta, arr


def close(a, b, tol):
  a = np.asarray(a, F64)
  b = np.asarray(b, F64)
  return a.shape == b.shape and bool(np.all(np.abs(a - b) <= tol * (1 + np.abs(b))))


def moments(x, axes, w=None):
  if w is None:
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return mean, var
  mean = (w * x).sum(axis=axes, keepdims=True) / w.sum(axis=axes, keepdims=True)
  var = (w * (x - mean) ** 2).sum(axis=axes, keepdims=True) / w.sum(axis=axes, keepdims=True)
  return mean, var


class Ref:
  """Float64 reference of one training step / inference, shared by the three semantics."""

  def __init__(self, sem, meta):
    self.sem = sem
    self.meta = meta
    case = meta["case"]
    cfg = case["config"]
    self.case = case
    rank = len(case["input_shape"])
    if sem == "torch":
      self.axis = 1
      self.m_old = None  # set per step
      self.eps = cfg.get("eps", 1e-5)
    else:
      ax = cfg.get("axis", -1)
      ax = ax[0] if isinstance(ax, list) else ax
      self.axis = ax + rank if ax < 0 else ax
      self.eps = cfg.get("epsilon", 1e-3)
      self.m_old = cfg.get("momentum", 0.99)
    self.rank = rank
    self.axes = tuple(i for i in range(rank) if i != self.axis)
    self.bshape = [1] * rank
    self.bshape[self.axis] = case["input_shape"][self.axis]

  def b(self, v):
    return np.asarray(v, F64).reshape(self.bshape)


def fail(msg):
  raise AssertionError(msg)


# --------------------------------------------------------------------------
# Keras (V2 and Keras 3)
# --------------------------------------------------------------------------
def keras_step(ref, arr, k, w, *, bessel, frozen):
  """(y, dx, dgamma, dbeta, new_weights) of training step k from weights w (float64 dict)."""
  case = ref.case
  cfg = case["config"]
  x = arr[f"x_{k}"].astype(F64)
  dy = arr[f"dy_{k}"].astype(F64)
  g = ref.b(w["gamma"]) if "gamma" in w else 1.0
  bt = ref.b(w["beta"]) if "beta" in w else 0.0
  eps = ref.eps
  new = dict(w)
  if frozen:
    sig = np.sqrt(ref.b(w["moving_variance"]) + eps)
    xh = (x - ref.b(w["moving_mean"])) / sig
    y = xh * g + bt
    dx = dy * g / sig
    return y, dx, (dy * xh).sum(axis=ref.axes), dy.sum(axis=ref.axes), new

  vbs = cfg.get("virtual_batch_size")
  if vbs:
    shp = x.shape
    xv = x.reshape((vbs, -1) + shp[1:])
    axes = tuple(i for i in range(xv.ndim) if i not in (1, ref.axis + 1))
    mean, var = moments(xv, axes)
    sig = np.sqrt(var + eps)
    bsh = [1] * xv.ndim
    bsh[ref.axis + 1] = shp[ref.axis]
    gv = np.asarray(w["gamma"], F64).reshape(bsh)
    bv = np.asarray(w["beta"], F64).reshape(bsh)
    y = ((xv - mean) / sig * gv + bv).reshape(shp)
    m = ref.m_old
    nm = mean.mean(axis=1, keepdims=True)
    nv = var.mean(axis=1, keepdims=True)
    new["moving_mean"] = np.asarray(w["moving_mean"], F64) * m + nm.reshape(
      w["moving_mean"].shape
    ) * (1 - m)
    new["moving_variance"] = np.asarray(w["moving_variance"], F64) * m + nv.reshape(
      w["moving_variance"].shape
    ) * (1 - m)
    return y, None, None, None, new

  wmask = None
  if case["mask"]:
    wmask = arr["mask"].astype(F64)[..., None]
  mean, var = moments(x, ref.axes, wmask)
  n = np.prod([x.shape[i] for i in ref.axes])
  sig = np.sqrt(var + eps)
  xh = (x - mean) / sig
  m = ref.m_old
  if cfg.get("renorm"):
    clip = cfg.get("renorm_clipping") or {}
    rm_m = cfg.get("renorm_momentum", 0.99)
    rs = np.maximum(ref.b(w["renorm_stddev"]), np.sqrt(eps))
    r = sig / rs
    d = (mean - ref.b(w["renorm_mean"])) / rs
    if clip.get("rmin") is not None:
      r = np.maximum(r, clip["rmin"])
    if clip.get("rmax") is not None:
      r = np.minimum(r, clip["rmax"])
    if clip.get("dmax") is not None:
      d = np.clip(d, -clip["dmax"], clip["dmax"])
    y = (xh * r + d) * g + bt
    dxh = dy * g * r
    dgamma = (dy * (xh * r + d)).sum(axis=ref.axes)
    flat = lambda t: t.reshape(-1)  # noqa: E731
    new["renorm_mean"] = np.asarray(w["renorm_mean"], F64) * rm_m + flat(mean) * (1 - rm_m)
    new["renorm_stddev"] = np.asarray(w["renorm_stddev"], F64) * rm_m + flat(sig) * (1 - rm_m)
    new["moving_mean"] = np.asarray(w["moving_mean"], F64) * m + flat(mean) * (1 - m)
    new["moving_stddev"] = np.asarray(w["moving_stddev"], F64) * m + flat(sig) * (1 - m)
    new["moving_variance"] = np.maximum(new["moving_stddev"] ** 2 - eps, 0.0)
  else:
    y = xh * g + bt
    dxh = dy * g
    dgamma = (dy * xh).sum(axis=ref.axes)
    v_upd = var * n / (n - 1) if bessel else var
    new["moving_mean"] = np.asarray(w["moving_mean"], F64) * m + mean.reshape(-1) * (1 - m)
    new["moving_variance"] = np.asarray(w["moving_variance"], F64) * m + v_upd.reshape(-1) * (1 - m)
  if wmask is not None:
    dx = None
  else:
    dx = (
      dxh
      - dxh.mean(axis=ref.axes, keepdims=True)
      - xh * (dxh * xh).mean(axis=ref.axes, keepdims=True)
    ) / sig
  return y, dx, dgamma, dy.sum(axis=ref.axes), new


def check_keras(sem, name, *, bessel, frozen, expect_match=True):
  meta, arr = load(f"{sem}_{name}")
  ref = Ref(sem, meta)
  names = meta["weight_names"]
  w = {n: arr[f"w0_{n}"].astype(F64) for n in names}
  tol = (
    2e-3 if meta["output_dtype"] == "float16" or meta["case"]["input_dtype"] == "float16" else 2e-5
  )
  ok = True
  for k in range(meta["case"]["steps"]):
    y, dx, dg, db, new = keras_step(ref, arr, k, w, bessel=bessel, frozen=frozen)
    ok &= close(arr[f"y_{k}"], y, tol)
    if dx is not None:
      ok &= close(arr[f"grad_x_{k}"], dx, tol)
      if dg is not None and f"grad_gamma_{k}" in arr:
        ok &= close(arr[f"grad_gamma_{k}"], dg, tol)
        ok &= close(arr[f"grad_beta_{k}"], db, tol)
    for n in names:
      ok &= close(arr[f"w{k + 1}_{n}"], new[n], 2e-5)
    w = {n: arr[f"w{k + 1}_{n}"].astype(F64) for n in names}  # continue from the real state
  # inference with the final moving statistics
  x = arr["x_infer"].astype(F64)
  g = ref.b(w["gamma"]) if "gamma" in w else 1.0
  bt = ref.b(w["beta"]) if "beta" in w else 0.0
  y_inf = (x - ref.b(w["moving_mean"])) / np.sqrt(ref.b(w["moving_variance"]) + ref.eps) * g + bt
  ok &= close(arr["y_infer"], y_inf, tol)
  if bool(ok) != expect_match:
    fail(f"{sem}_{name}: bessel={bessel} frozen={frozen} match={bool(ok)}, expected {expect_match}")
  return bool(ok)


# --------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------
def check_torch(name, *, unbiased=True, expect_match=True):
  meta, arr = load(f"torch_{name}")
  ref = Ref("torch", meta)
  cfg = meta["case"]["config"]
  eps = cfg.get("eps", 1e-5)
  mom = cfg.get("momentum", 0.1) if "momentum" in cfg else 0.1
  track = cfg.get("track_running_stats", True)
  affine = cfg.get("affine", True)
  keys = meta["state_dict_keys"]
  s = {k: arr[f"w0_{k}"] for k in keys}
  ok = True
  for k in range(meta["case"]["steps"]):
    x = arr[f"x_{k}"].astype(F64)
    dy = arr[f"dy_{k}"].astype(F64)
    mean, var = moments(x, ref.axes)
    n = x.size // x.shape[1]
    sig = np.sqrt(var + eps)
    xh = (x - mean) / sig
    g = ref.b(s["weight"]) if affine else 1.0
    bt = ref.b(s["bias"]) if affine else 0.0
    y = xh * g + bt
    dxh = dy * g
    dx = (
      dxh
      - dxh.mean(axis=ref.axes, keepdims=True)
      - xh * (dxh * xh).mean(axis=ref.axes, keepdims=True)
    ) / sig
    ok &= close(arr[f"y_{k}"], y, 2e-5) and close(arr[f"grad_x_{k}"], dx, 2e-5)
    if affine:
      ok &= close(arr[f"grad_weight_{k}"], (dy * xh).sum(axis=ref.axes), 2e-5)
      ok &= close(arr[f"grad_bias_{k}"], dy.sum(axis=ref.axes), 2e-5)
    if track:
      nbt = int(s["num_batches_tracked"]) + 1  # increment first ...
      f = 1.0 / nbt if mom is None else mom  # ... then the factor
      v_upd = var.reshape(-1) * (n / (n - 1) if unbiased else 1.0)
      new = {
        "running_mean": (1 - f) * s["running_mean"].astype(F64) + f * mean.reshape(-1),
        "running_var": (1 - f) * s["running_var"].astype(F64) + f * v_upd,
      }
      ok &= int(arr[f"w{k + 1}_num_batches_tracked"]) == nbt
      ok &= (
        arr[f"w{k + 1}_num_batches_tracked"].dtype == np.int64
        and arr[f"w{k + 1}_num_batches_tracked"].shape == ()
      )
      for key in ("running_mean", "running_var"):
        ok &= close(arr[f"w{k + 1}_{key}"], new[key], 2e-5)
    if affine:
      ok &= np.array_equal(arr[f"w{k + 1}_weight"], s["weight"])
    s = {key: arr[f"w{k + 1}_{key}"] for key in keys}
  x = arr["x_infer"].astype(F64)
  if track:
    mu, va = ref.b(s["running_mean"]), ref.b(s["running_var"])
  else:
    mu, va = moments(x, ref.axes)  # eval without buffers: the batch's own statistics
  g = ref.b(s["weight"]) if affine else 1.0
  bt = ref.b(s["bias"]) if affine else 0.0
  ok &= close(arr["y_infer"], (x - mu) / np.sqrt(va + eps) * g + bt, 2e-5)
  if bool(ok) != expect_match:
    fail(f"torch_{name}: unbiased={unbiased} match={bool(ok)}, expected {expect_match}")
  return bool(ok)


def check_synchronized():
  """keras3 r2_synchronized: one-pass E[x^2]-E[x]^2 in float32, not two-pass."""
  meta, arr = load("keras3_r2_synchronized")
  m = meta["case"]["config"]["momentum"]
  w_mv = arr["w0_moving_variance"]
  worst_one, worst_two = 0.0, 0.0
  for k in range(meta["case"]["steps"]):
    x = arr[f"x_{k}"]
    mean32 = x.sum(0, dtype=np.float32) / np.float32(x.shape[0])
    one = np.maximum((x * x).sum(0, dtype=np.float32) / np.float32(x.shape[0]) - mean32 * mean32, 0)
    two = x.astype(F64).var(0)
    got = (arr[f"w{k + 1}_moving_variance"].astype(F64) - w_mv.astype(F64) * m) / (1 - m)
    worst_one = max(worst_one, float(np.abs(got - one).max()))
    worst_two = max(worst_two, float(np.abs(got - two).max()))
    w_mv = arr[f"w{k + 1}_moving_variance"]
  return worst_one, worst_two


def main() -> int:
  cases_mod = _load_cases_module()
  report = []
  for c in cases_mod.CASES:
    sem, name = c["semantics"], c["name"]
    if sem == "torch":
      check_torch(name)
      report.append(f"{sem}_{name}: matches the torch reference (unbiased running_var)")
      continue
    meta, _ = load(f"{sem}_{name}")
    frozen = not c["config"].get("trainable", True)
    fused = meta.get("fused", False)
    if sem == "keras3" and c["config"].get("synchronized"):
      one, two = check_synchronized()
      report.append(
        f"{sem}_{name}: synchronized moving-variance residual: "
        f"one-pass {one:.2e}, two-pass {two:.2e}"
      )
      continue
    check_keras(sem, name, bessel=(sem == "keras_v2" and fused), frozen=frozen)
    msg = f"{sem}_{name}: matches (frozen={frozen}, bessel={sem == 'keras_v2' and fused})"
    # the wrong readings must not match
    if frozen:
      check_keras(sem, name, bessel=False, frozen=False, expect_match=False)
      msg += "; batch-stat reading rejected"
    elif (
      not c["config"].get("renorm")
      and not c["config"].get("virtual_batch_size")
      and len(c["input_shape"]) >= 4
    ):
      check_keras(
        sem, name, bessel=not (sem == "keras_v2" and fused), frozen=False, expect_match=False
      )
      msg += "; opposite Bessel reading rejected"
    report.append(msg)
  for name in ("bn1d_nc", "bn1d_ncl", "bn2d", "bn3d", "bn1d_batch2", "bn1d_cma"):
    check_torch(name, unbiased=False, expect_match=False)
  report.append("torch: the biased running_var reading is rejected at rank 2, 3, 4 and 5")
  print("\n".join(report))
  print(f"all {len(cases_mod.CASES)} fixtures agree with SEMANTICS.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
