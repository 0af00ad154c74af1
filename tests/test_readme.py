"""The README's runnable examples (```python fences) run as written, section by section.

Blocks in one ``##`` section share a namespace, as a reader runs them in order; illustrative
fragments that need a cluster or surrounding code are fenced as ```py and not run.
"""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).parents[1] / "README.md"


def _sections():
  sections = re.split(r"^## ", README.read_text(), flags=re.MULTILINE)[1:]
  for section in sections:
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    if blocks:
      yield section.splitlines()[0], blocks


SECTIONS = dict(_sections())


def test_readme_has_runnable_examples():
  assert {"A Flax training step", "Coming from Keras", "Multi-device and multi-host"} <= set(
    SECTIONS
  )


@pytest.mark.parametrize("title", sorted(SECTIONS))
def test_readme_section_runs(title):
  namespace = {}
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    for block in SECTIONS[title]:  # user code runs under JAX's default configuration
      exec(compile(block, f"{README}: {title}", "exec"), namespace)
