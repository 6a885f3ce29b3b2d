#!/usr/bin/env bash
# Create the isolated virtual environments of the tools the benchmarks compare against.
# Usage: bash bench/setup_peers.sh [all|ingest|ann] [--force]   (from anywhere; idempotent)
#
# ingest (bench/ingest_throughput.py):
#   .venv-img2dataset : img2dataset and its own pins, kept apart from the project's venv.
# ann (bench/ann.py):
#   .venv-diskann     : diskannpy 0.7.0 (needs numpy 1.x)
#   .venv-peers       : faiss-cpu 1.15 + hnswlib 0.8.0 (numpy 2)
#   .venv-diskann-rust: diskannpy-rust 0.49.1 (Microsoft's Rust DiskANN; same module name as
#                       diskannpy, so it cannot share .venv-diskann)
#   .venv-lancedb     : lancedb 0.40.0 (IVF-PQ with refine, on disk)
# The ANN environments are separate because their numpy pins and module names clash; none
# of them touches the project's .venv. Everything comes from pip.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
what=all
force=0
for arg in "$@"; do
  case "$arg" in
    all|ingest|ann) what=$arg ;;
    --force) force=1 ;;
    *) echo "usage: $0 [all|ingest|ann] [--force]" >&2; exit 2 ;;
  esac
done

# make_venv DIR CHECK PACKAGES...: (re)create DIR unless `python -c CHECK` already passes there.
make_venv() {
  local dir="$1" check="$2"; shift 2
  if [[ $force == 0 && -x "$dir/bin/python" ]] && "$dir/bin/python" -c "$check" 2>/dev/null; then
    return
  fi
  rm -rf "$dir"
  echo "[setup_peers] creating $dir: $*"
  "$python" -m venv "$dir"
  "$dir/bin/pip" install --quiet --upgrade pip
  "$dir/bin/pip" install --quiet "$@"
  "$dir/bin/python" -c "$check"
}

if [[ $what == all || $what == ingest ]]; then
  venv="$root/.venv-img2dataset"
  if [[ $force == 1 || ! -x "$venv/bin/img2dataset" ]]; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "img2dataset==1.47.0"
  fi
  "$venv/bin/python" -c "import img2dataset, cv2; print('img2dataset ready, opencv', cv2.__version__)"
fi

if [[ $what == all || $what == ann ]]; then
  make_venv "$root/.venv-diskann" \
    "import diskannpy, numpy; assert numpy.__version__.startswith('1.')" \
    "diskannpy==0.7.0" "numpy<2" "psutil"
  # hnswlib 0.8.0 is a source distribution: pip compiles it with the system C++ compiler.
  make_venv "$root/.venv-peers" \
    "import faiss, hnswlib, numpy; assert numpy.__version__.startswith('2.')" \
    "faiss-cpu==1.15.*" "hnswlib==0.8.0" "numpy>=2,<3" "psutil"
  make_venv "$root/.venv-diskann-rust" \
    "import diskannpy; from importlib.metadata import version; assert version('diskannpy-rust') == '0.49.1'" \
    "diskannpy-rust==0.49.1" "psutil"
  make_venv "$root/.venv-lancedb" "import lancedb, pyarrow, numpy" "lancedb==0.40.0" "pyarrow" "numpy>=2,<3" "psutil"
  "$root/.venv-diskann/bin/python" -c "import diskannpy, numpy; print('diskannpy 0.7.0 ready, numpy', numpy.__version__)"
  "$root/.venv-diskann-rust/bin/python" -c "import numpy; print('diskannpy-rust 0.49.1 ready, numpy', numpy.__version__)"
  "$root/.venv-lancedb/bin/python" -c "import lancedb; print('lancedb', lancedb.__version__, 'ready')"
  "$root/.venv-peers/bin/python" -c "import faiss, hnswlib, numpy; print('faiss', faiss.__version__, '+ hnswlib 0.8.0 ready, numpy', numpy.__version__)"
fi
