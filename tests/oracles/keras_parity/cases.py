"""Parity cases for the Keras V1 ``BatchNormalization`` oracle fixtures.

Pure data: stdlib only, no TensorFlow and no JAX import, so both the fixture
generator (run in the oracle venv) and the parity tests (run in the project
venv) can import it.

Each case is a dict with the keys

``name``         unique snake_case name; fixtures are ``fixtures/<name>.npz|json``.
``config``       JSON-serializable Keras V1 constructor kwargs (``adjustment``
                 is never in here; see ``adjustment``).
``input_shape``  tuple, batch dim included.
``input_dtype``  ``"float32"`` or ``"float16"``.
``steps``        number of training steps (``training=True`` calls).
``drift``        each step's input distribution shifts in mean and scale.
``adjustment``   use a constant per-feature ``adjustment`` callable returning
                 ``(adj_scale, adj_bias)`` (stored in the fixture).
``mask``         pass a ``(B, T)`` 0/1 mask (non-fused rank-3 cases only).
``seed``         seeds numpy (inputs) and Keras (initializers).

Optional keys:

``input_offset`` constant added to every generated input (large-mean data).
``infer_batch``  batch size of the inference input (default: same as training).
``inputs``       explicit per-step inputs (list of nested lists, one per step);
                 overrides the generated ones.
``infer_input``  explicit inference input (nested list).
"""

from __future__ import annotations

_DEFAULTS = {
  "input_dtype": "float32",
  "steps": 2,
  "drift": False,
  "adjustment": False,
  "mask": False,
}

_CASES: list[dict] = []


def _case(name, config, input_shape, seed, **kw):
  case = {"name": name, "config": dict(config), "input_shape": tuple(input_shape)}
  case.update(_DEFAULTS)
  case.update(kw)
  case["seed"] = seed
  _CASES.append(case)


def _const(value):
  return {"class_name": "Constant", "config": {"value": value}}


# --------------------------------------------------------------------------
# Rank 2 (always non-fused)
# --------------------------------------------------------------------------
_case("r2_default", {}, (8, 4), 101, steps=3, drift=True)
_case("r2_axis0", {"axis": 0, "momentum": 0.9}, (6, 3), 102)
_case("r2_fused_true_fallback", {"fused": True, "momentum": 0.9}, (8, 3), 103, steps=3, drift=True)
_case("r2_batch1", {"momentum": 0.5}, (1, 4), 104)
_case("r2_momentum0_eps01", {"momentum": 0.0, "epsilon": 0.1}, (6, 4), 105, steps=3, drift=True)
_case("r2_momentum05_eps1e5", {"momentum": 0.5, "epsilon": 1e-5}, (8, 5), 106, steps=3, drift=True)
_case("r2_large_mean", {"momentum": 0.9, "epsilon": 1e-5}, (8, 3), 107, steps=3, input_offset=100.0)
_case("r2_center_off", {"center": False, "momentum": 0.9}, (6, 3), 108)
_case("r2_scale_off", {"scale": False, "momentum": 0.9}, (6, 3), 109)
_case("r2_no_affine", {"center": False, "scale": False, "momentum": 0.9}, (6, 3), 110)
_case(
  "r2_trainable_false",
  {
    "trainable": False,
    "momentum": 0.9,
    "gamma_initializer": _const(1.5),
    "moving_mean_initializer": _const(0.25),
  },
  (8, 3),
  111,
  steps=2,
  drift=True,
)
_case(
  "r2_float16_input", {"momentum": 0.9}, (8, 4), 112, input_dtype="float16", steps=2, drift=True
)
_case(
  "r2_dtype_float16",
  {"dtype": "float16", "momentum": 0.9},
  (8, 4),
  113,
  input_dtype="float16",
  steps=2,
  drift=True,
)
_case(
  "r2_initializer_configs",
  {
    "momentum": 0.9,
    "gamma_initializer": _const(0.5),
    "beta_initializer": {
      "class_name": "RandomNormal",
      "config": {"mean": 0.0, "stddev": 0.3, "seed": 7},
    },
    "moving_mean_initializer": {
      "class_name": "RandomUniform",
      "config": {"minval": -0.5, "maxval": 0.5, "seed": 11},
    },
    "moving_variance_initializer": _const(2.0),
  },
  (6, 4),
  114,
)
_case(
  "r2_initializer_names",
  {
    "momentum": 0.9,
    "gamma_initializer": "glorot_uniform",
    "beta_initializer": "random_normal",
    "moving_mean_initializer": "truncated_normal",
    "moving_variance_initializer": "ones",
  },
  (6, 4),
  115,
)
_case("r2_adjustment", {"momentum": 0.9}, (6, 4), 116, adjustment=True, steps=3, drift=True)
# renorm: clipping variants and renorm_momentum variety
_case(
  "r2_renorm_noclip",
  {"renorm": True, "momentum": 0.9, "renorm_momentum": 0.9},
  (8, 3),
  120,
  steps=4,
  drift=True,
)
_case(
  "r2_renorm_rmax",
  {"renorm": True, "renorm_clipping": {"rmax": 1.2}, "momentum": 0.9, "renorm_momentum": 0.5},
  (8, 3),
  121,
  steps=3,
  drift=True,
)
_case(
  "r2_renorm_rmin",
  {"renorm": True, "renorm_clipping": {"rmin": 0.8}, "momentum": 0.9, "renorm_momentum": 0.5},
  (8, 3),
  122,
  steps=3,
  drift=True,
)
_case(
  "r2_renorm_dmax",
  {"renorm": True, "renorm_clipping": {"dmax": 0.1}, "momentum": 0.9, "renorm_momentum": 0.5},
  (8, 3),
  123,
  steps=3,
  drift=True,
)
_case(
  "r2_renorm_all_clips",
  {
    "renorm": True,
    "renorm_clipping": {"rmax": 1.1, "rmin": 0.9, "dmax": 0.1},
    "momentum": 0.99,
    "renorm_momentum": 0.8,
    "gamma_initializer": _const(2.0),
    "beta_initializer": _const(3.0),
  },
  (4, 3),
  124,
  steps=4,
  drift=True,
)
_case(
  "r2_renorm_default_momenta",
  {"renorm": True, "renorm_clipping": {}},
  (8, 3),
  125,
  steps=2,
  drift=True,
)
_case(
  "r2_renorm_mv_init",
  {
    "renorm": True,
    "momentum": 0.5,
    "renorm_momentum": 0.0,
    "moving_variance_initializer": _const(2.0),
    "moving_mean_initializer": _const(0.5),
  },
  (6, 3),
  126,
  steps=3,
  drift=True,
)
_case(
  "r2_renorm_adjustment",
  {
    "renorm": True,
    "renorm_clipping": {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5},
    "momentum": 0.9,
    "renorm_momentum": 0.5,
  },
  (6, 4),
  127,
  adjustment=True,
  steps=3,
  drift=True,
)
# ghost batches
_case(
  "r2_ghost",
  {"virtual_batch_size": 2, "momentum": 0.8},
  (8, 3),
  130,
  steps=3,
  drift=True,
  infer_batch=3,
)
_case(
  "r2_ghost_renorm",
  {
    "virtual_batch_size": 3,
    "renorm": True,
    "renorm_clipping": {"rmax": 1.5, "dmax": 0.5},
    "momentum": 0.9,
    "renorm_momentum": 0.5,
  },
  (6, 3),
  131,
  steps=3,
  drift=True,
)

# --------------------------------------------------------------------------
# Rank 3 (never fused)
# --------------------------------------------------------------------------
_case("r3_axis_last", {"momentum": 0.9}, (5, 4, 3), 201, steps=2, drift=True)
_case("r3_axis1", {"axis": 1, "epsilon": 1e-5, "momentum": 0.9}, (5, 4, 3), 202)
_case("r3_axis_m2", {"axis": -2, "momentum": 0.5}, (4, 3, 5), 203)
_case("r3_fused_true_fallback", {"fused": True, "momentum": 0.9}, (4, 5, 3), 204)
_case("r3_multi12", {"axis": [1, 2], "momentum": 0.5}, (5, 4, 3), 205, steps=2, drift=True)
_case(
  "r3_multi12_renorm",
  {
    "axis": [1, 2],
    "renorm": True,
    "momentum": 0.9,
    "renorm_momentum": 0.9,
    "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
  },
  (6, 3, 2),
  206,
  steps=3,
  drift=True,
)
_case("r3_ghost", {"virtual_batch_size": 3, "momentum": 0.9}, (6, 4, 3), 207, steps=2, drift=True)
_case(
  "r3_multi12_ghost",
  {"axis": [1, 2], "virtual_batch_size": 2, "momentum": 0.9},
  (6, 4, 3),
  208,
  steps=2,
  drift=True,
)
_case("r3_mask", {"momentum": 0.9}, (6, 5, 3), 209, mask=True, steps=2, drift=True)
_case(
  "r3_mask_renorm",
  {
    "renorm": True,
    "renorm_clipping": {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5},
    "momentum": 0.9,
    "renorm_momentum": 0.5,
  },
  (6, 5, 3),
  210,
  mask=True,
  steps=3,
  drift=True,
)
_case("r3_mask_adjustment", {"momentum": 0.5}, (4, 5, 3), 211, mask=True, adjustment=True)
_case(
  "r3_dtype_mixed_float16", {"dtype": "mixed_float16", "momentum": 0.9}, (4, 5, 3), 213, drift=True
)
_case("r3_adjustment_axis1", {"axis": 1, "momentum": 0.9}, (4, 3, 5), 212, adjustment=True)

# --------------------------------------------------------------------------
# Rank 4 (fused by default for axis -1/3/1/-3)
# --------------------------------------------------------------------------
_case("r4_nhwc_fused", {"momentum": 0.9}, (4, 3, 3, 2), 301, steps=3, drift=True)
_case("r4_nhwc_nonfused", {"momentum": 0.9, "fused": False}, (4, 3, 3, 2), 301, steps=3, drift=True)
_case("r4_axis3_fused", {"axis": 3, "momentum": 0.99}, (3, 2, 4, 3), 302)
_case("r4_nchw_fused", {"axis": 1, "momentum": 0.9}, (4, 2, 3, 3), 303, steps=3, drift=True)
_case(
  "r4_nchw_nonfused",
  {"axis": 1, "momentum": 0.9, "fused": False},
  (4, 2, 3, 3),
  303,
  steps=3,
  drift=True,
)
_case("r4_axis_m3_fused", {"axis": -3, "momentum": 0.5, "epsilon": 1e-5}, (3, 2, 4, 4), 304)
_case(
  "r4_axis2_fused_true_fallback", {"axis": 2, "fused": True, "momentum": 0.9}, (4, 3, 2, 2), 305
)
_case("r4_axis_m4", {"axis": -4, "momentum": 0.9}, (4, 2, 2, 3), 306)
_case("r4_multi13", {"axis": [1, 3], "momentum": 0.9}, (4, 3, 2, 5), 307, steps=2, drift=True)
_case(
  "r4_ghost_axis3",
  {"virtual_batch_size": 2, "momentum": 0.8},
  (6, 3, 3, 2),
  308,
  steps=2,
  drift=True,
)
_case(
  "r4_ghost_axis1",
  {"axis": 1, "virtual_batch_size": 3, "fused": False, "momentum": 0.8},
  (6, 2, 3, 3),
  309,
  steps=2,
  drift=True,
)
_case(
  "r4_renorm_fused_true_fallback",
  {"renorm": True, "fused": True, "momentum": 0.9, "renorm_momentum": 0.9},
  (4, 2, 2, 3),
  310,
  steps=3,
  drift=True,
)
_case("r4_batch1_n1_fused", {"momentum": 0.5}, (1, 1, 1, 3), 311)
_case("r4_batch1_fused", {"momentum": 0.5}, (1, 2, 2, 3), 312)
_case("r4_fused_center_off", {"center": False, "momentum": 0.9}, (4, 2, 2, 3), 313)
_case("r4_fused_scale_off", {"scale": False, "momentum": 0.9}, (4, 2, 2, 3), 314)
_case(
  "r4_fused_no_affine",
  {"center": False, "scale": False, "axis": 1, "momentum": 0.9},
  (4, 3, 2, 2),
  315,
)
_case(
  "r4_fused_float16_input", {"momentum": 0.9}, (4, 3, 3, 2), 316, input_dtype="float16", drift=True
)
_case(
  "r4_fused_dtype_float16",
  {"dtype": "float16", "momentum": 0.9},
  (4, 3, 3, 2),
  317,
  input_dtype="float16",
  drift=True,
)
_case(
  "r4_fused_trainable_false", {"trainable": False, "momentum": 0.9}, (4, 2, 2, 3), 318, drift=True
)
_case(
  "r4_fused_momentum0_eps01",
  {"momentum": 0.0, "epsilon": 0.1},
  (4, 2, 2, 3),
  319,
  steps=3,
  drift=True,
)
_case(
  "r4_fused_large_mean",
  {"momentum": 0.9, "epsilon": 1e-5},
  (4, 3, 3, 2),
  320,
  steps=3,
  input_offset=100.0,
)
_case(
  "r4_fused_nonfused_large_mean",
  {"momentum": 0.9, "epsilon": 1e-5, "fused": False},
  (4, 3, 3, 2),
  320,
  steps=3,
  input_offset=100.0,
)
_case(
  "r4_fused_initializers",
  {
    "momentum": 0.9,
    "gamma_initializer": "he_normal",
    "beta_initializer": {"class_name": "GlorotUniform", "config": {"seed": 5}},
    "moving_mean_initializer": _const(-0.5),
    "moving_variance_initializer": {
      "class_name": "RandomUniform",
      "config": {"minval": 0.5, "maxval": 1.5, "seed": 9},
    },
  },
  (4, 2, 2, 3),
  321,
)
_case("r4_adjustment", {"momentum": 0.9}, (4, 2, 2, 3), 322, adjustment=True, drift=True)

# --------------------------------------------------------------------------
# Rank 5 (fused by default for axis -1/4/1/-4)
# --------------------------------------------------------------------------
_case("r5_ndhwc_fused", {"momentum": 0.9}, (2, 3, 2, 2, 3), 401, steps=2, drift=True)
_case(
  "r5_ndhwc_nonfused", {"momentum": 0.9, "fused": False}, (2, 3, 2, 2, 3), 401, steps=2, drift=True
)
_case("r5_ncdhw_fused", {"axis": 1, "momentum": 0.9}, (2, 3, 2, 2, 2), 402, steps=2, drift=True)
_case("r5_axis_m4_fused", {"axis": -4, "momentum": 0.5}, (2, 2, 3, 2, 2), 403)
_case("r5_axis3_fallback", {"axis": 3, "momentum": 0.9}, (2, 2, 2, 3, 2), 404)
_case("r5_multi14", {"axis": [1, 4], "momentum": 0.9}, (2, 3, 2, 2, 4), 405, steps=2, drift=True)
_case(
  "r5_ghost", {"virtual_batch_size": 2, "momentum": 0.8}, (4, 2, 2, 2, 3), 406, steps=2, drift=True
)
_case(
  "r5_multi14_ghost",
  {"axis": [1, 4], "virtual_batch_size": 3, "fused": False, "momentum": 0.8},
  (6, 3, 2, 2, 4),
  407,
  steps=2,
  drift=True,
)

# --------------------------------------------------------------------------
# Golden values of docs/keras_bn_v1_spec.md section 10 (checked by generate.py)
# --------------------------------------------------------------------------
_G1_X = [[1.0, 2.0], [3.0, 6.0], [5.0, 10.0], [7.0, 14.0]]
_G2_X = [[[[0.0, 1.0]]], [[[2.0, 5.0]]]]
_G3_X = [[0.0], [1.0], [2.0], [3.0]]
_G5_X = [
  [[float(v) ** 1.5 for v in range(r * 4, r * 4 + 4)] for r in range(c * 3, c * 3 + 3)]
  for c in range(2)
]

_case("golden_g1", {"momentum": 0.9}, (4, 2), 1, steps=1, inputs=[_G1_X], infer_input=_G1_X)
_case("golden_g2", {"momentum": 0.9}, (2, 1, 1, 2), 2, steps=1, inputs=[_G2_X])
_case(
  "golden_g2_nonfused", {"momentum": 0.9, "fused": False}, (2, 1, 1, 2), 2, steps=1, inputs=[_G2_X]
)
_case("golden_g3", {"virtual_batch_size": 2, "momentum": 0.0}, (4, 1), 3, steps=1, inputs=[_G3_X])
_case(
  "golden_g4",
  {
    "momentum": 0.9,
    "renorm": True,
    "renorm_momentum": 0.5,
    "renorm_clipping": {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5},
  },
  (4, 2),
  4,
  steps=2,
  inputs=[_G1_X, [[2.0 * v + 1.0 for v in row] for row in _G1_X]],
  infer_input=_G1_X,
)
_case("golden_g5", {"axis": [1, 2], "momentum": 0.5}, (2, 3, 4), 5, steps=1, inputs=[_G5_X])

CASES: tuple[dict, ...] = tuple(_CASES)
CASES_BY_NAME: dict[str, dict] = {c["name"]: c for c in CASES}


def _validate() -> None:
  import re

  assert len(CASES_BY_NAME) == len(CASES), "duplicate case names"
  for c in CASES:
    assert re.fullmatch(r"[a-z0-9_]+", c["name"]), c["name"]
    assert c["input_dtype"] in ("float32", "float16"), c["name"]
    if c["mask"]:
      assert len(c["input_shape"]) == 3, c["name"]
    if "inputs" in c:
      assert len(c["inputs"]) == c["steps"], c["name"]


_validate()
