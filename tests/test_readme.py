"""The README's Python examples run as written."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
  runnable = [block for block in blocks if "import kbn_jax" in block]
  assert runnable
  for block in runnable:
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
      exec(compile(block, str(README), "exec"), {})  # user code runs under default JAX config
