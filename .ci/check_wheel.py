"""Checks what the built distributions ship: run by .ci/installed.sh after `python -m build`.

The wheel holds the package and its metadata only (no tests, fixtures, benchmarks or examples),
every module of the checkout's ``kbn_jax/`` and the ``py.typed`` marker; the sdist holds the
package, its marker and the metadata sources.

Usage: python .ci/check_wheel.py DIST/kbn_jax-X-py3-none-any.whl DIST/kbn_jax-X.tar.gz
"""

from __future__ import annotations

import pathlib
import sys
import tarfile
import zipfile

FORBIDDEN_PARTS = ("tests", "fixtures", "benchmarks", "examples", "docs", "__pycache__")


def package_files(root: pathlib.Path) -> set[str]:
  """The checkout's files the package reads at run time, as wheel paths.

  Args:
    root: The repository root.

  Returns:
    ``kbn_jax/...`` paths of every module and of ``py.typed``.
  """
  package = root / "kbn_jax"
  files = {p for p in package.rglob("*.py") if "__pycache__" not in p.parts}
  files.add(package / "py.typed")
  return {p.relative_to(root).as_posix() for p in files}


def wheel_problems(wheel: pathlib.Path, expected: set[str]) -> list[str]:
  """What is wrong with the wheel's file list.

  Args:
    wheel: The built wheel.
    expected: Paths the wheel must hold.

  Returns:
    One line per problem; empty when the wheel is right.
  """
  names = zipfile.ZipFile(wheel).namelist()
  problems = [f"missing from the wheel: {name}" for name in sorted(expected - set(names))]
  for name in names:
    top, *rest = name.split("/")
    if top != "kbn_jax" and not (top.startswith("kbn_jax-") and top.endswith(".dist-info")):
      problems.append(f"outside the package in the wheel: {name}")
    elif any(part in FORBIDDEN_PARTS for part in rest[:-1]):
      problems.append(f"test, data or build file in the wheel: {name}")
  return problems


def sdist_problems(sdist: pathlib.Path, expected: set[str]) -> list[str]:
  """What the sdist lacks of the package and of what builds it.

  Args:
    sdist: The built source distribution.
    expected: Package paths the sdist must hold (under its top folder).

  Returns:
    One line per problem; empty when the sdist is right.
  """
  with tarfile.open(sdist) as archive:
    names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
  needed = expected | {"pyproject.toml", "README.md"}
  return [f"missing from the sdist: {name}" for name in sorted(needed - names)]


def main(argv: list[str]) -> int:
  """Checks the wheel and the sdist named on the command line; prints what is wrong."""
  wheel, sdist = (pathlib.Path(arg) for arg in argv)
  expected = package_files(pathlib.Path(__file__).resolve().parents[1])
  problems = wheel_problems(wheel, expected) + sdist_problems(sdist, expected)
  for problem in problems:
    print(f"check_wheel: {problem}", file=sys.stderr)
  if not problems:
    print(f"check_wheel: {wheel.name} holds the {len(expected)} package files and nothing else")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
