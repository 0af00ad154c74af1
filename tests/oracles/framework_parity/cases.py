"""Cases of the framework-parity fixtures (semantics keras_v2, keras3, torch).

Pure data: stdlib only, no TensorFlow, Keras, torch or JAX import, so both the
generators (run in the oracle venv) and the tests (run in the project venv)
can import it. Fixtures are ``fixtures/<semantics>_<name>.npz|json``.

Each case is a dict with the keys

``semantics``    ``"keras_v2"`` | ``"keras3"`` | ``"torch"``.
``name``         snake_case, unique within its semantics.
``config``       JSON constructor kwargs of the real layer: tf_keras V2
                 ``BatchNormalization``, Keras 3 ``keras.layers.BatchNormalization``,
                 or ``torch.nn.BatchNorm{1,2,3}d`` (without ``num_features``,
                 which is ``input_shape[1]``). Keras ``momentum`` is the weight
                 of the old value, torch ``momentum`` the weight of the new one.
``input_shape``  batch dim included. torch: channels at dim 1.
``input_dtype``  ``"float32"`` or ``"float16"``.
``steps``        number of training steps (``training=True`` / ``module.train()``).
``drift``        each step's input distribution shifts in mean and scale.
``mask``         pass a ``(B, T)`` mask (Keras rank-3 cases only).
``random_init``  replace the initial weights/buffers by random values after
                 build (stored as ``w0_*``); otherwise the initializers' values.
``seed``         seeds numpy (inputs) and the framework (initializers).

Optional keys:

``module``        torch only: ``"BatchNorm1d"`` | ``"BatchNorm2d"`` | ``"BatchNorm3d"``.
``input_offset``  constant added to every generated input (large-mean data).
``infer_batch``   batch size of the inference input (default: same as training).
``num_batches_tracked0``  torch only: start value of ``num_batches_tracked``
                  (a state dict loaded from a model that already trained).
``note``          what the case pins down (free text).
"""

from __future__ import annotations

_DEFAULTS = {
  "input_dtype": "float32",
  "steps": 3,
  "drift": True,
  "mask": False,
  "random_init": False,
}

CASES: list[dict] = []


def _case(semantics, name, config, input_shape, seed, **kw):
  case = {
    "semantics": semantics,
    "name": name,
    "config": dict(config),
    "input_shape": tuple(input_shape),
  }
  case.update(_DEFAULTS)
  case.update(kw)
  case["seed"] = seed
  CASES.append(case)


def _const(value):
  return {"class_name": "Constant", "config": {"value": value}}


_CLIP = {"rmax": 1.5, "rmin": 0.75, "dmax": 0.5}

# --------------------------------------------------------------------------
# keras_v2: tf_keras.src.layers.normalization.batch_normalization.BatchNormalization
# (what tf.keras / tf_keras.layers.BatchNormalization is in a TF2 process)
# --------------------------------------------------------------------------
V2 = "keras_v2"
_case(
  V2, "r2", {}, (8, 4), 201, note="rank 2 -> fused=None resolves to False; biased moving variance"
)
_case(V2, "r2_momentum09", {"momentum": 0.9}, (8, 3), 202, random_init=True)
_case(
  V2,
  "r4_nhwc",
  {"momentum": 0.9},
  (4, 3, 2, 3),
  203,
  random_init=True,
  note="fused NHWC: Bessel-corrected moving variance",
)
_case(
  V2,
  "r4_nchw",
  {"axis": 1, "momentum": 0.9},
  (4, 3, 2, 3),
  204,
  random_init=True,
  note="fused NCHW (runs on TF CPU)",
)
_case(V2, "r4_default_momentum", {}, (6, 2, 2, 4), 205, note="fused, momentum 0.99")
_case(
  V2,
  "r5_ndhwc",
  {"momentum": 0.9},
  (2, 2, 2, 3, 3),
  206,
  random_init=True,
  note="fused rank 5 channels-last",
)
_case(
  V2,
  "r4_fused_false",
  {"fused": False, "momentum": 0.9},
  (4, 3, 2, 3),
  207,
  random_init=True,
  note="explicit fused=False on rank 4: biased moving variance (get_config does not store fused)",
)
_case(
  V2,
  "r4_axis2",
  {"axis": 2, "momentum": 0.9},
  (4, 3, 5, 2),
  208,
  random_init=True,
  note="rank 4, axis 2: fused=None -> False (axis not 1/3)",
)
_case(
  V2,
  "r2_frozen",
  {"trainable": False, "momentum": 0.9},
  (8, 3),
  209,
  random_init=True,
  note="trainable=False + training=True -> inference: moving stats, no update",
)
_case(
  V2,
  "r4_frozen",
  {"trainable": False, "momentum": 0.9},
  (4, 3, 2, 3),
  210,
  random_init=True,
  note="frozen fused layer: inference, no update",
)
_case(
  V2,
  "r2_renorm",
  {"renorm": True, "renorm_clipping": _CLIP, "renorm_momentum": 0.8, "momentum": 0.9},
  (8, 3),
  211,
  random_init=True,
)
_case(
  V2,
  "r4_renorm",
  {"renorm": True, "renorm_clipping": _CLIP, "renorm_momentum": 0.8, "momentum": 0.9},
  (4, 3, 2, 3),
  212,
  random_init=True,
  note="renorm forces fused=None -> False on rank 4",
)
_case(V2, "r2_vbs", {"virtual_batch_size": 2, "momentum": 0.9}, (8, 3), 213, random_init=True)
_case(
  V2,
  "r4_vbs",
  {"virtual_batch_size": 2, "momentum": 0.9},
  (4, 3, 2, 3),
  214,
  random_init=True,
  note="ghost batches on rank 4: non-fused",
)
_case(V2, "r3_mask", {"momentum": 0.9}, (4, 5, 3), 215, mask=True, random_init=True)
_case(
  V2,
  "r4_synchronized",
  {"synchronized": True, "momentum": 0.9},
  (4, 3, 2, 3),
  216,
  random_init=True,
  note="synchronized=True forces the non-fused path on rank 4: biased moving variance (issue 20)",
)

# --------------------------------------------------------------------------
# keras3: keras.layers.BatchNormalization (Keras 3, backend recorded in each fixture)
# --------------------------------------------------------------------------
K3 = "keras3"
_case(K3, "r2", {}, (8, 4), 301)
_case(K3, "r2_momentum09", {"momentum": 0.9}, (8, 3), 302, random_init=True)
_case(
  K3,
  "r4_axis_last",
  {"momentum": 0.9},
  (4, 3, 2, 3),
  303,
  random_init=True,
  note="never Bessel, also at rank 4",
)
_case(K3, "r4_axis1", {"axis": 1, "momentum": 0.9}, (4, 3, 2, 3), 304, random_init=True)
_case(K3, "r5_axis_last", {"momentum": 0.9}, (2, 2, 2, 3, 3), 305, random_init=True)
_case(K3, "r2_frozen", {"trainable": False, "momentum": 0.9}, (8, 3), 306, random_init=True)
_case(K3, "r4_frozen", {"trainable": False, "momentum": 0.9}, (4, 3, 2, 3), 307, random_init=True)
_case(
  K3,
  "r2_renorm",
  {"renorm": True, "renorm_clipping": _CLIP, "renorm_momentum": 0.8, "momentum": 0.9},
  (8, 3),
  308,
  random_init=True,
)
_case(
  K3,
  "r4_renorm_axis1",
  {"axis": 1, "renorm": True, "renorm_clipping": _CLIP, "renorm_momentum": 0.8, "momentum": 0.9},
  (4, 3, 2, 3),
  309,
  random_init=True,
)
_case(
  K3,
  "r2_renorm_noclip",
  {"renorm": True, "momentum": 0.9},
  (8, 3),
  310,
  note="renorm_clipping=None; renorm_momentum default 0.99",
)
_case(K3, "r3_mask", {"momentum": 0.9}, (4, 5, 3), 311, mask=True, random_init=True)
_case(
  K3,
  "r2_float16_input",
  {"momentum": 0.9},
  (8, 3),
  312,
  input_dtype="float16",
  random_init=True,
  note="float16 input, float32 layer: math and output in float32",
)
_case(
  K3,
  "r4_mixed_float16",
  {"dtype": "mixed_float16", "momentum": 0.9},
  (4, 3, 2, 3),
  313,
  input_dtype="float16",
  random_init=True,
  note="mixed_float16 policy: float32 math, float16 output",
)
_case(
  K3,
  "r2_synchronized",
  {"synchronized": True, "momentum": 0.9},
  (8, 3),
  314,
  input_offset=20.0,
  random_init=True,
  note="TF backend, no strategy: one-pass E[x^2]-E[x]^2 variance (differs visibly at large mean)",
)

# --------------------------------------------------------------------------
# torch: torch.nn.BatchNorm{1,2,3}d (CPU, float32)
# --------------------------------------------------------------------------
T = "torch"
_case(
  T,
  "bn1d_nc",
  {},
  (8, 4),
  401,
  module="BatchNorm1d",
  random_init=True,
  note="rank 2: running_var gets the unbiased variance (n/(n-1))",
)
_case(T, "bn1d_ncl", {}, (4, 3, 5), 402, module="BatchNorm1d", random_init=True)
_case(T, "bn2d", {}, (4, 3, 2, 3), 403, module="BatchNorm2d", random_init=True)
_case(T, "bn3d", {}, (2, 3, 2, 2, 3), 404, module="BatchNorm3d", random_init=True)
_case(T, "bn2d_default_init", {}, (4, 3, 2, 3), 405, module="BatchNorm2d")
_case(
  T,
  "bn2d_momentum03_eps1e3",
  {"momentum": 0.3, "eps": 1e-3},
  (4, 3, 2, 3),
  406,
  module="BatchNorm2d",
  random_init=True,
)
_case(
  T,
  "bn1d_cma",
  {"momentum": None},
  (8, 3),
  407,
  module="BatchNorm1d",
  steps=4,
  random_init=True,
  note="momentum=None: cumulative average, factor 1/num_batches_tracked after the increment",
)
_case(
  T,
  "bn2d_cma",
  {"momentum": None},
  (4, 3, 2, 3),
  408,
  module="BatchNorm2d",
  steps=4,
  random_init=True,
)
_case(
  T,
  "bn2d_cma_nbt5",
  {"momentum": None},
  (4, 3, 2, 3),
  409,
  module="BatchNorm2d",
  steps=3,
  random_init=True,
  num_batches_tracked0=5,
  note="loaded state: factors 1/6, 1/7, 1/8",
)
_case(
  T,
  "bn2d_affine_false",
  {"affine": False},
  (4, 3, 2, 3),
  410,
  module="BatchNorm2d",
  random_init=True,
)
_case(
  T,
  "bn1d_batch2",
  {},
  (2, 3),
  411,
  module="BatchNorm1d",
  random_init=True,
  note="n=2 per channel: unbiased = 2 * biased",
)
_case(
  T,
  "bn2d_no_running_stats",
  {"track_running_stats": False},
  (4, 3, 2, 3),
  412,
  module="BatchNorm2d",
  random_init=True,
  note="no buffers; eval also normalizes with the batch's own statistics",
)
_case(
  T,
  "bn1d_no_running_stats_affine_false",
  {"track_running_stats": False, "affine": False},
  (8, 3),
  413,
  module="BatchNorm1d",
)
_case(
  T,
  "bn2d_momentum09",
  {"momentum": 0.9},
  (4, 3, 2, 3),
  414,
  module="BatchNorm2d",
  random_init=True,
  note="torch momentum 0.9 = Keras momentum 0.1",
)
