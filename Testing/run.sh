#!/usr/bin/env bash
# The two quick-start commands of the README, on a fresh machine:
#   bash Testing/run.sh demo    segment the bundled sample CT with the bundled model, write and show the overview PNG
#   bash Testing/run.sh tests   lint (ruff check, ruff format --check), then the whole test suite
#   bash Testing/run.sh fast    lint, then the fast tier (tests not marked slow: under a minute on 2 cores)
# Both first make sure .venv holds SCDLCore and what it needs (CPU build of torch unless a torch is already there).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
python="$venv/bin/python"

ensure_environment() {
  if [[ ! -x "$python" ]]; then
    python3 -m venv "$venv"
  fi
  if ! "$python" -c "import torch" 2>/dev/null; then
    # The CPU build: a plain `torch` requirement would pull a CUDA build of several GB.
    "$python" -m pip install -q "torch==2.13.0"
  fi
  if ! "$python" -c "import scdlcore, pytest, slicerio, PySide6, slicer_core" 2>/dev/null || [[ ! -x "$venv/bin/ruff" ]]; then
    "$python" -m pip install -q -e "$root/SCDLCore[test]"
  fi
}

case "${1:-}" in
  demo)
    ensure_environment
    out="$root/demo-output"
    mkdir -p "$out"
    image="$("$venv/bin/scdl" sample-data ct_abdomen --image-path)"
    "$venv/bin/scdl" segment "$image" -o "$out/ct_abdomen.seg.nrrd" --overview "$out/ct_abdomen_overview.png"
    echo "Segmentation: $out/ct_abdomen.seg.nrrd (open it in 3D Slicer); overview: $out/ct_abdomen_overview.png"
    if [[ -n "${DISPLAY:-}" ]] && command -v xdg-open >/dev/null; then
      xdg-open "$out/ct_abdomen_overview.png" >/dev/null 2>&1 &
    fi
    ;;
  tests|fast)
    ensure_environment
    "$venv/bin/ruff" check .
    "$venv/bin/ruff" format --check .
    export QT_QPA_PLATFORM=offscreen
    tier=()
    [[ "$1" == fast ]] && tier=(-m "not slow")
    "$python" -m pytest SCDLCore/tests Testing -q -p no:cacheprovider "${tier[@]}"
    ;;
  *)
    echo "usage: bash Testing/run.sh demo|tests|fast" >&2
    exit 2
    ;;
esac
