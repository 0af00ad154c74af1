"""Strict, multi-device test environment; set up before anything imports jax."""

import os
import pathlib

# Eight CPU devices for pmap / shard_map / sharded-jit tests (must precede the jax import).
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_report_header(config):
  """Names the kbn_jax under test (the checkout's, or an installed wheel's)."""
  import kbn_jax  # noqa: PLC0415 (after the jax configuration above)

  return f"kbn_jax {kbn_jax.__version__} from {pathlib.Path(kbn_jax.__file__).parent}"


def pytest_sessionstart(session):
  """With KBN_EXPECT_INSTALLED=1 (.ci/installed.sh), refuses to test anything but site-packages."""
  import kbn_jax  # noqa: PLC0415

  where = pathlib.Path(kbn_jax.__file__).resolve()
  if os.environ.get("KBN_EXPECT_INSTALLED") == "1" and "site-packages" not in where.parts:
    raise pytest.UsageError(f"KBN_EXPECT_INSTALLED=1 but kbn_jax was imported from {where}")


# The default tier (the README's `python -m pytest`, at most 3 minutes on 2 cores) keeps at least
# one test of every behaviour; these repeats move to the slow tier, which CI also runs. Exact node
# ids, or a test function's id for all of its parameters.
SLOW_TIER = (
  # Integration runs whose behaviour a quicker default test also covers.
  "tests/test_examples.py::test_raw_jax_example_imports_neither_flax_nor_optax",
  "tests/test_normalize.py::test_check_grads_first_and_second_order",
  "tests/test_normalize.py::test_jacfwd_equals_jacrev",
  "tests/test_nnx.py::test_jit_optimizer_training_and_eval_match_linen",
  "tests/test_equinox.py::test_filter_jit_grad_and_optax_train_a_per_example_model",
  "tests/test_nnx.py::test_vmap_ensemble_forward_matches_each_member",
  "tests/test_nnx.py::test_vmap_ensemble_training_matches_each_member",
  "tests/test_nnx.py::test_scan_over_stacked_layers_equals_unrolled_loop",
  "tests/test_nnx.py::test_orbax_checkpoint_resumes_exactly",
  "tests/test_nnx.py::test_jax_shard_map_matches_one_device",
  "tests/test_nnx.py::test_jax_export_inference_equals_direct_call",
  "tests/test_nnx.py::test_sharded_nnx_jit_matches_one_device",
  "tests/test_equinox.py::test_filter_vmap_ensemble_of_sequentials",
  # Guide blocks that train or map over devices (the README's and the shorter ones stay).
  "tests/test_docs.py::test_block_runs_on_its_own[docs/haiku.md:9]",
  "tests/test_docs.py::test_block_runs_on_its_own[docs/equinox.md:9]",
  "tests/test_docs.py::test_block_runs_on_its_own[docs/raw_jax.md:54]",
  "tests/test_docs.py::test_block_runs_on_its_own[docs/raw_jax.md:89]",
  "tests/test_docs.py::test_block_runs_on_its_own[docs/keras.md:59]",
  "tests/test_docs.py::test_block_runs_on_its_own[docs/multi_device.md:216]",
  # Further parameters of a parametrized check whose first cases stay.
  "tests/test_layer.py::ReferenceTest::test_inference_call_matches_float64_reference_adjustment__without_jit",
  "tests/test_layer.py::ReferenceTest::test_inference_call_matches_float64_reference_fused__without_jit",
  "tests/test_layer.py::ReferenceTest::test_inference_call_matches_float64_reference_fused_nchw__without_jit",
  "tests/test_layer.py::ReferenceTest::test_inference_call_matches_float64_reference_ghost__without_jit",
  "tests/test_layer.py::ReferenceTest::test_inference_call_matches_float64_reference_ghost_renorm__without_jit",
  "tests/test_layer.py::ReferenceTest::test_inference_call_matches_float64_reference_mask__without_jit",
  "tests/test_layer.py::ReferenceTest::test_inference_call_matches_float64_reference_renorm__without_jit",
  "tests/test_layer.py::ReferenceTest::test_training_call_matches_float64_reference_adjustment__without_jit",
  "tests/test_layer.py::ReferenceTest::test_training_call_matches_float64_reference_fused__without_jit",
  "tests/test_layer.py::ReferenceTest::test_training_call_matches_float64_reference_fused_nchw__without_jit",
  "tests/test_layer.py::ReferenceTest::test_training_call_matches_float64_reference_ghost__without_jit",
  "tests/test_layer.py::ReferenceTest::test_training_call_matches_float64_reference_ghost_renorm__without_jit",
  "tests/test_layer.py::ReferenceTest::test_training_call_matches_float64_reference_renorm__without_jit",
  "tests/test_layer.py::test_jvp_agrees_with_vjp[fused_nchw-functional]",
  "tests/test_layer.py::test_jvp_agrees_with_vjp[ghost-functional]",
  "tests/test_layer.py::test_linearize_equals_jvp[fused_nchw-functional]",
  "tests/test_layer.py::test_linearize_equals_jvp[plain-functional]",
  "tests/test_layer.py::test_shard_map_equals_one_device[fused_nchw]",
  "tests/test_layer.py::test_shard_map_equals_one_device[masked]",
  "tests/test_layer.py::test_shard_map_equals_one_device[renorm]",
  "tests/test_distributed.py::test_shard_map_matches_one_device[bfloat16]",
  "tests/test_distributed.py::test_shard_map_matches_one_device[fused_nhwc]",
  "tests/test_distributed.py::test_shard_map_matches_one_device[multi_axis]",
  "tests/test_distributed.py::test_sharded_jit_matches_one_device[fused_nhwc]",
  "tests/test_distributed.py::test_sharded_jit_matches_one_device[multi_axis]",
  "tests/test_distributed.py::test_sharded_jit_matches_one_device[renorm]",
  "tests/test_equinox.py::test_per_example_equals_batched[torch_nchw]",
  "tests/test_equinox.py::test_per_example_equals_batched[v1_nchw_fused]",
  "tests/test_keras_ported.py::test_convergence[shape1-2-False]",
  "tests/test_keras_ported.py::test_convergence[shape3-2-False]",
  "tests/test_keras_ported.py::test_convergence[shape4-3-False]",
  "tests/test_keras_ported.py::test_convergence[shape7-axis7-False]",
  "tests/test_keras_ported.py::test_convergence[shape8-axis8-False]",
  "tests/test_keras_ported.py::test_ghost_batch_norm[shape1-3-2-0.01]",
  "tests/test_keras_ported.py::test_ghost_batch_norm[shape3-axis3-3-0.01]",
  "tests/test_linen.py::test_fused_resolution_follows_v1[shape1-kwargs1-True]",
  "tests/test_linen.py::test_fused_resolution_follows_v1[shape2-kwargs2-True]",
  "tests/test_linen.py::test_fused_resolution_follows_v1[shape4-kwargs4-False]",
  "tests/test_linen.py::test_fused_resolution_follows_v1[shape6-kwargs6-True]",
  "tests/test_linen.py::test_fused_resolution_follows_v1[shape7-kwargs7-False]",
  "tests/test_linen.py::test_fused_resolution_follows_v1[shape8-kwargs8-False]",
  "tests/test_linen.py::test_fused_resolution_follows_v1[shape10-kwargs10-False]",
  "tests/test_linen.py::test_fused_resolution_follows_v1[shape11-kwargs11-False]",
  "tests/test_normalize.py::test_forward_mode_agrees_with_reverse_mode[shape1-axes1]",
  "tests/test_normalize.py::test_large_mean_gradients_as_accurate_as_two_pass_autodiff[1000.0]",
  "tests/test_normalize.py::test_shard_map_gradients_equal_one_device[groups1]",
  "tests/test_layer.py::test_linearize_equals_jvp[ghost-functional]",
  "tests/test_normalize.py::test_gradients_match_autodiff_of_functional[shape1-axes1-False]",
  "tests/test_normalize.py::test_gradients_match_autodiff_of_functional[shape2-axes2-False]",
  "tests/test_normalize.py::test_gradients_match_autodiff_of_functional[shape1-axes1-True]",
)


def _in_slow_tier(item) -> bool:
  """Whether `item` is in `SLOW_TIER`, or replays a V1 fixture beyond the representative ones."""
  node = item.nodeid
  if any(node == entry or node.startswith(entry + "[") for entry in SLOW_TIER):
    return True
  if node.startswith("tests/oracles/keras_parity/test_parity.py::test_matches_keras_v1["):
    from tests.replay import REPRESENTATIVE_V1  # noqa: PLC0415 (test code, at collection)

    return node.split("[", 1)[1].rstrip("]") not in REPRESENTATIVE_V1
  return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Marks the `SLOW_TIER` repeats slow before `-m 'not slow'` deselects."""
  for item in items:
    if _in_slow_tier(item):
      item.add_marker(pytest.mark.slow)


@pytest.fixture
def rng():
  """A NumPy generator with a fixed seed, fresh for each test."""
  return np.random.default_rng(0)
