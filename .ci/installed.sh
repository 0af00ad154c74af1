#!/usr/bin/env bash
# Tested as installed: build the sdist and the wheel, check what the wheel ships, install the wheel
# (not editable) with its test extra into a fresh virtual environment, and run the default tier
# from a copy of the tests in which the checkout's kbn_jax/ cannot be imported.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

work="${KBN_INSTALLED_DIR:-$(mktemp -d)}"
python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(echo "$work"/dist/kbn_jax-*.whl)
sdist=$(echo "$work"/dist/kbn_jax-*.tar.gz)
echo "Built $(basename "$sdist") and $(basename "$wheel")"
python .ci/check_wheel.py "$wheel" "$sdist"

python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "$wheel[test,keras,equinox,haiku]"

# The suite reads the tests, the examples, the docs and what they link to: a copy of the checkout
# without kbn_jax/, so that the package can only come from site-packages.
mkdir "$work/run"
tar -C "$repo" --exclude=./kbn_jax --exclude=./.git --exclude=./.venv --exclude=./docs/_build \
  -cf - . | tar -C "$work/run" -xf -
cd "$work/run"
python - <<'PY'
import pathlib, sysconfig
import kbn_jax

where = pathlib.Path(kbn_jax.__file__).resolve()
site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
if site not in where.parents:
  raise SystemExit(f"installed.sh: kbn_jax imported from {where}, not from the wheel in {site}")
print(f"kbn_jax {kbn_jax.__version__} imported from {where.parent}")
PY
# test_layout.py reads the checkout's kbn_jax/ sources (its import floors), not an installation.
KBN_EXPECT_INSTALLED=1 python -m pytest -p no:cacheprovider tests --ignore=tests/test_layout.py
