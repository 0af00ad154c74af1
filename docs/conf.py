"""Sphinx configuration: guides in Markdown (MyST), API reference from the docstrings.

Build (warnings are errors, as in CI):

  python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import pathlib
import re
import sys

# Document the checkout this file lives in, even without `pip install -e .`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # importing the modules needs no accelerator

import kbn_jax  # noqa: E402

project = "kbn_jax"
author = "kbn_jax authors"
copyright = "kbn_jax authors"  # noqa: A001
release = version = kbn_jax.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Docstrings write `name` for an object: link it when Sphinx knows it, plain code otherwise.
default_role = "py:obj"

# Google-style docstrings (Args:, Returns:, Raises:, Attributes:), RST markup inside.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_class_signature = "separated"

# Markdown guides: GitHub-style anchors for headings, so `page.md#a-heading` links resolve here
# as on GitHub.
myst_heading_anchors = 4
myst_enable_extensions = ["dollarmath"]

html_theme = "furo"
html_title = f"kbn_jax {release}"

# Guides link to files of the repository outside docs/ (the README, benchmarks/results.md, ...)
# with relative links, which GitHub follows. Sphinx builds only docs/: such a link becomes a link
# to a copy of the file (MyST's `path:` scheme), without its `#anchor`.
_REPOSITORY_LINK = re.compile(r"\]\((\.\./[^)#\s]+)(#[^)\s]*)?\)")


def _link_repository_files(app, docname, source):
  source[0] = _REPOSITORY_LINK.sub(lambda match: f"](path:{match.group(1)})", source[0])


def setup(app):
  app.connect("source-read", _link_repository_files)
