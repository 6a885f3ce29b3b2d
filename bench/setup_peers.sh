#!/usr/bin/env bash
# Create the isolated virtual environments of the tools the benchmarks compare against.
# Usage: bash bench/setup_peers.sh   (from anywhere; idempotent)
# .venv-img2dataset: img2dataset and its own pins, kept apart from the project's venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
venv="$root/.venv-img2dataset"
if [ ! -x "$venv/bin/img2dataset" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "img2dataset==1.47.0"
fi
"$venv/bin/python" -c "import img2dataset, cv2; print('img2dataset ready, opencv', cv2.__version__)"
