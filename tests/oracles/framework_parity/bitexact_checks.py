"""Bit-exact checks of the moving-average arithmetic, against the live libraries.

Run in the oracle environment (tensorflow-cpu, tf-keras, torch), from the repository root::

    python tests/oracles/framework_parity/bitexact_checks.py

Each check draws random float32 statistics, lets the real code update a variable, and counts
how many float32 results equal each candidate formula exactly. The counts are quoted in
SEMANTICS.md. Nothing here is written to disk.
"""

from __future__ import annotations

import os

import numpy as np

# The libraries are imported in _import_libraries(), so that importing this module (pytest's
# --doctest-modules does) needs numpy only.
keras = tf = torch = V2 = None


def _import_libraries():
  global keras, tf, torch, V2
  os.environ["KERAS_BACKEND"] = "tensorflow"
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
  import keras as _keras
  import tensorflow as _tf
  import torch as _torch
  from tf_keras.src.layers.normalization.batch_normalization import BatchNormalization as _V2

  keras, tf, torch, V2 = _keras, _tf, _torch, _V2
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  torch.set_num_threads(1)


f32 = np.float32
MOMENTA = (0.99, 0.9, 0.7, 1 / 3, 0.123)


def _cands(old, new, m):
  """Candidate float32 update formulas (old: moving value, new: batch value, m: Keras momentum)."""
  return {
    "old*f32(m) + new*f32(1-m)   [Keras 3 source]": old * f32(m) + new * f32(1.0 - m),
    "old - (old-new)*f32(1-m)    [assign_sub]": old - (old - new) * f32(1.0 - m),
    "f32(1-m)*new + (1-f32(1-m))*old": f32(1.0 - m) * new + (f32(1) - f32(1.0 - m)) * old,
    "float64 then round": (old.astype(np.float64) * m + new.astype(np.float64) * (1 - m)).astype(
      f32
    ),
  }


def _tally(results, cands, got):
  for k, v in cands.items():
    results[k] = results.get(k, 0) + int(np.sum(v == got))


def keras3_update(trials=60):
  res, tot = {}, 0
  rs = np.random.RandomState(0)
  for t in range(trials):
    m = MOMENTA[t % len(MOMENTA)]
    x = (rs.randn(16, 5) * rs.uniform(0.5, 3) + rs.uniform(-2, 2)).astype(f32)
    layer = keras.layers.BatchNormalization(momentum=m)
    layer.build(x.shape)
    mm0 = rs.uniform(-1, 1, 5).astype(f32)
    mv0 = rs.uniform(0.5, 2, 5).astype(f32)
    layer.set_weights([np.ones(5, f32), np.zeros(5, f32), mm0, mv0])
    layer(x, training=True)
    mean, var = (np.asarray(v) for v in keras.ops.moments(tf.constant(x), axes=[0]))
    _, _, mm1, mv1 = layer.get_weights()
    _tally(res, _cands(mm0, mean, m), mm1)
    _tally(res, _cands(mv0, var, m), mv1)
    tot += 10
  return tot, res


def v2_nonfused_update(trials=60):
  res, tot = {}, 0
  rs = np.random.RandomState(1)
  for t in range(trials):
    m = MOMENTA[t % len(MOMENTA)]
    x = (rs.randn(16, 5) * rs.uniform(0.5, 3) + rs.uniform(-2, 2)).astype(f32)
    layer = V2(momentum=m)
    layer.build(x.shape)
    mm0 = rs.uniform(-1, 1, 5).astype(f32)
    mv0 = rs.uniform(0.5, 2, 5).astype(f32)
    layer.set_weights([np.ones(5, f32), np.zeros(5, f32), mm0, mv0])
    layer(x, training=True)
    mean, var = (v.numpy() for v in tf.nn.moments(tf.constant(x), axes=[0]))
    _, _, mm1, mv1 = layer.get_weights()
    _tally(res, _cands(mm0, mean, m), mm1)
    _tally(res, _cands(mv0, var, m), mv1)
    tot += 10
  return tot, res


def v2_fused_update(trials=60):
  """Fused (eager): the kernel's exponential_avg_factor update. The kernel's own batch mean and
  biased batch variance are its reserve_space_1/2 outputs (FusedBatchNormV3, CPU)."""
  res, tot = {}, 0
  rs = np.random.RandomState(2)
  for t in range(trials):
    m = MOMENTA[t % len(MOMENTA)]
    x = (rs.randn(4, 3, 2, 5) * rs.uniform(0.5, 3) + rs.uniform(-2, 2)).astype(f32)
    n = 4 * 3 * 2
    layer = V2(momentum=m)
    layer.build(x.shape)
    assert layer.fused
    mm0 = rs.uniform(-1, 1, 5).astype(f32)
    mv0 = rs.uniform(0.5, 2, 5).astype(f32)
    layer.set_weights([np.ones(5, f32), np.zeros(5, f32), mm0, mv0])
    layer(x, training=True)
    o = tf.raw_ops.FusedBatchNormV3(
      x=x,
      scale=np.ones(5, f32),
      offset=np.zeros(5, f32),
      mean=mm0,
      variance=mv0,
      epsilon=1e-3,
      exponential_avg_factor=1.0,
      data_format="NHWC",
      is_training=True,
    )
    bmean, bvar_biased = o.reserve_space_1.numpy(), o.reserve_space_2.numpy()
    _, _, mm1, mv1 = layer.get_weights()
    fa = f32(1.0 - m)  # exponential_avg_factor as float32
    adj = f32(n / (n - 1))  # rest_size_adjust
    _tally(
      res,
      {
        "mean: (1-fa)*old + fa*mean                 [kernel]": (f32(1) - fa) * mm0 + fa * bmean,
        "mean: old*f32(m) + mean*f32(1-m)": mm0 * f32(m) + bmean * fa,
        "mean: old - (old-mean)*f32(1-m)": mm0 - (mm0 - bmean) * fa,
      },
      mm1,
    )
    _tally(
      res,
      {
        "var:  (1-fa)*old + (fa*adj)*biased_var     [kernel]": (f32(1) - fa) * mv0
        + (fa * adj) * bvar_biased,
        "var:  (1-fa)*old + fa*(biased_var*adj)": (f32(1) - fa) * mv0 + fa * (bvar_biased * adj),
        "var:  old - (old-biased_var*adj)*f32(1-m)": mv0 - (mv0 - bvar_biased * adj) * fa,
      },
      mv1,
    )
    tot += 5
  return tot, res


def torch_update(trials=300):
  """Integer inputs, n = 8: the batch mean and the sum of squares are exact in float32."""
  res, tot = {}, 0
  rs = np.random.RandomState(3)
  for t in range(trials):
    mt = (0.1, 0.3, 0.01, 1 / 3, 0.7)[t % 5]
    x = rs.randint(-8, 9, size=(8, 5)).astype(f32)
    rm0 = rs.uniform(-1, 1, 5).astype(f32)
    rv0 = rs.uniform(0.5, 2, 5).astype(f32)
    bn = torch.nn.BatchNorm1d(5, momentum=mt)
    with torch.no_grad():
      bn.running_mean.copy_(torch.from_numpy(rm0))
      bn.running_var.copy_(torch.from_numpy(rv0))
    bn(torch.from_numpy(x))
    mean = x.astype(np.float64).mean(0).astype(f32)  # exact
    ub = (((x.astype(np.float64) - mean) ** 2).sum(0)).astype(f32) / f32(7)
    got_m, got_v = bn.running_mean.numpy(), bn.running_var.numpy()
    fm = f32(mt)
    for label, (old, new, got) in (("mean", (rm0, mean, got_m)), ("var", (rv0, ub, got_v))):
      c = {
        f"{label}: f32(m)*new + (1-f32(m))*old   [float32]": fm * new + (f32(1) - fm) * old,
        f"{label}: f32(m)*new + f32(1-m)*old": fm * new + f32(1 - mt) * old,
        f"{label}: float64 m*new + (1-m)*old, rounded": (
          mt * new.astype(np.float64) + (1 - mt) * old.astype(np.float64)
        ).astype(f32),
      }
      _tally(res, c, got)
      if label == "var":
        ulp = np.abs(got.view(np.int32) - (fm * new + (f32(1) - fm) * old).view(np.int32))
        res["var: max ulp from the float32 formula"] = max(
          res.get("var: max ulp from the float32 formula", 0), int(ulp.max())
        )
    tot += 5
  return tot, res


def main():
  _import_libraries()
  for title, fn in (
    ("Keras 3 (TF backend), non-renorm update", keras3_update),
    ("tf_keras V2 non-fused update", v2_nonfused_update),
    ("tf_keras V2 fused (eager) update", v2_fused_update),
    ("torch BatchNorm1d CPU update (per statistic)", torch_update),
  ):
    tot, res = fn()
    print(f"{title}: {tot} values")
    for k, v in res.items():
      print(f"   {v:5d}  {k}")


if __name__ == "__main__":
  main()
