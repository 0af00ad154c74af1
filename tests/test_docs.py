"""The README and the guides in docs/: every ```python block runs on its own; every link resolves.

Each ```python block runs in a fresh namespace, as a reader who copies that one block would run
it, so every block is self-contained (imports and data included). Illustrative fragments that
need a cluster or surrounding code are fenced as ```py and not run. Relative links must point to
an existing file, and a ``#anchor`` to a heading of the target, by GitHub's slug rule (which
the Sphinx build follows too, with ``myst_heading_anchors``).
"""

from __future__ import annotations

import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")


def _name(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix()


def _split(path: pathlib.Path):
  """Yields ("text", line, text) and ("code", line, info, body) chunks of a Markdown file."""
  lines = path.read_text(encoding="utf-8").splitlines()
  fence = None
  for number, line in enumerate(lines, start=1):
    if fence is None:
      match = _FENCE.match(line)
      if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):  # CommonMark
        fence = (match.group(1), match.group(2).strip(), number, [])
      else:
        yield ("text", number, line)
    elif line.strip() == fence[0]:  # a closing fence: the same marker
      yield ("code", fence[2], fence[1], "\n".join(fence[3]) + "\n")
      fence = None
    else:
      fence[3].append(line)
  assert fence is None, f"{_name(path)}:{fence[2]}: code fence never closed"


def _python_blocks():
  for path in PAGES:
    for chunk in _split(path):
      if chunk[0] == "code" and chunk[2] == "python":
        yield pytest.param(path, chunk[1], chunk[3], id=f"{_name(path)}:{chunk[1]}")


BLOCKS = list(_python_blocks())


def test_the_readme_and_the_guides_have_runnable_examples():
  files = {_name(param.values[0]) for param in BLOCKS}
  assert {"README.md", "docs/linen.md", "docs/keras.md", "docs/multi_device.md"} <= files
  readme = [param for param in BLOCKS if _name(param.values[0]) == "README.md"]
  assert len(readme) >= 2  # the linen and the NNX training steps


@pytest.mark.parametrize(("path", "line", "code"), BLOCKS)
def test_block_runs_on_its_own(path, line, code):
  # Blank lines in front make tracebacks give the line numbers of the Markdown file.
  source = "\n" * line + code
  namespace = {"__name__": "__docs__"}
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    exec(compile(source, str(path), "exec"), namespace)  # user code: JAX's default configuration


# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------

_CODE_SPAN = re.compile(r"(`+)(?!`)[\s\S]*?(?<!`)\1(?!`)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _github_slug(heading: str) -> str:
  """GitHub's anchor for a heading: its text, lowercased, punctuation dropped, spaces to '-'."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
  text = re.sub(r"<[^>]+>", "", text).strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_' (Unicode too)
  return text.replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
  anchors, seen = set(), {}
  for chunk in _split(path):
    match = chunk[0] == "text" and _HEADING.match(chunk[2])
    if match:
      slug = _github_slug(match.group(2))
      count = seen.get(slug, 0)
      seen[slug] = count + 1
      anchors.add(slug if count == 0 else f"{slug}-{count}")
  return anchors


def _links():
  for path in PAGES:
    # The text with code blocks blanked out, line for line (a link may span lines).
    lines = {chunk[1]: chunk[2] for chunk in _split(path) if chunk[0] == "text"}
    text = "\n".join(lines.get(number, "") for number in range(1, max(lines, default=0) + 1))
    text = _CODE_SPAN.sub(lambda match: re.sub(r"[^\n]", "c", match.group(0)), text)
    for match in _LINK.finditer(text):
      target = match.group(1)
      if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto:, ...
        continue
      yield path, text.count("\n", 0, match.start()) + 1, target


LINKS = list(_links())


def test_pages_have_links_to_check():
  assert any(_name(path) == "README.md" for path, _, _ in LINKS)
  assert any(target.startswith("docs/") for _, _, target in LINKS)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
  broken = []
  for path, line, target in LINKS:
    if path != page:
      continue
    file, _, anchor = target.partition("#")
    resolved = (path.parent / file).resolve() if file else path
    if not resolved.exists():
      broken.append(f"{_name(path)}:{line}: {target} (no such file)")
    elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
      broken.append(f"{_name(path)}:{line}: {target} (no heading with anchor #{anchor})")
  assert not broken, "\n".join(broken)


def test_github_slugs():
  assert _github_slug("`jax.shard_map` (recommended)") == "jaxshard_map-recommended"
  assert _github_slug("The mode: `training` and `use_running_average`") == (
    "the-mode-training-and-use_running_average"
  )
  assert _github_slug("Several processes (`jax.distributed`)") == "several-processes-jaxdistributed"
  assert _github_slug("What is synchronized, and what it costs") == (
    "what-is-synchronized-and-what-it-costs"
  )
