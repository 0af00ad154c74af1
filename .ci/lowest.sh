#!/usr/bin/env bash
# Lowest-versions lane: every runtime dependency and every runtime extra (keras, equinox, haiku)
# installed at exactly the lower bound pyproject.toml declares, in a fresh virtual environment,
# then a representative subset of the default tier (linen, NNX, the pure function, the Equinox and
# Haiku front-ends, the Keras/PyTorch/Flax loaders, the training helpers). The pins are read from
# pyproject.toml, so a bound raised or lowered there is what this lane tests.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${KBN_LOWEST_VENV:-$(mktemp -d)/lowest}"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install --quiet --upgrade pip

# `name>=X` of [project.dependencies] and the runtime extras becomes the constraint `name==X`.
constraints="$(dirname "$venv")/lowest-constraints.txt"
python - "$constraints" <<'EOF'
import re, sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
requirements = project["dependencies"] + extras["keras"] + extras["equinox"] + extras["haiku"]
pins = {}
for requirement in requirements:
  match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)(,\s*<.*)?", requirement)
  if match is None:
    sys.exit(f"lowest.sh: {requirement!r} has no `>=` lower bound to pin; declare one.")
  pins[match.group(1).lower()] = match.group(2)
with open(sys.argv[1], "w") as f:
  f.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))
EOF
echo "Lowest declared versions:" && cat "$constraints"

# The test tools float (pip picks the newest that the pinned versions allow).
python -m pip install --quiet -c "$constraints" ".[keras,equinox,haiku]" pytest pytest-xdist chex hypothesis flatbuffers
python -m pip list --format=freeze | grep -iE "^($(cut -d= -f1 "$constraints" | paste -sd'|'))==" \
  | sort -f | diff -i <(sort -f "$constraints") - \
  || { echo "lowest.sh: installed versions differ from the pins above" >&2; exit 1; }

subset=(
  tests/test_layer.py tests/test_linen.py tests/test_nnx.py tests/test_flax_compat.py
  tests/test_keras_files.py tests/test_load_batch_norms.py tests/test_keras_compat.py
  tests/test_torch_compat.py tests/test_training_helpers.py tests/test_equinox.py
  tests/test_haiku.py
)
python -m pytest -p no:cacheprovider "${subset[@]}"
