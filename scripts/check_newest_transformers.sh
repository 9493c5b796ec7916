#!/usr/bin/env bash
# Does the newest transformers release break ort_trainer? Installs it in a scratch virtual environment, even outside
# the tested range that setup.py pins, runs the tests that touch transformers' internals and prints which fail.
# Not part of CI: run it before widening the range in ort_trainer/transformers_compat.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
. "$scratch/venv/bin/activate"
pip install -q torch==2.13.0 -e ".[training-cpu,tests]"
newest=$(pip index versions transformers 2>/dev/null | sed -n 's/^transformers (\(.*\))$/\1/p')
if ! pip install -q "transformers==$newest" >"$scratch/install.log" 2>&1; then
  echo "transformers $newest, the newest release, does not install here, so it is not tested:" \
    "$(grep -m1 '^ERROR' "$scratch/install.log" | sed 's/ (from versions:.*//')"
  exit 1
fi
echo "transformers $(python -c 'import transformers; print(transformers.__version__)'), tested range:" \
  "$(python -c 'from ort_trainer.transformers_compat import TESTED_TRANSFORMERS; print(TESTED_TRANSFORMERS)')"
python -m pytest -q -p no:warnings -rf tests/test_transformers_compat.py tests/test_generation.py \
  tests/test_inference.py tests/test_parity.py -k "not inside_the_tested_range" && echo "All passed."
