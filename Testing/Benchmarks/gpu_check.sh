#!/usr/bin/env bash
# The GPU check, one run of at most about 9 minutes on an H100 or H200: train-step speed, segmentation speed, a reduced
# accuracy benchmark (1 seed; CPS + GA, CPS + GA + SCDL, the naive floor) and the CUDA tests if any exist.
# Every part has a time limit; a part that fails or runs out of time is reported, the others still run, and the
# script then exits 1. Results go to $OUT (7 files): gpu_check.log, train_step.md/.json, segment_gpu.md,
# accuracy.md/.json/.png.
#
# The GPU machine has no network and lacks monai and SimpleITK. Here, once, from the repository root:
#   ../shared/device/make-wheels --with-io                   # .whl/: monai, SimpleITK, slicerio, pynrrd (53 MiB)
#   grep -qx '/.bench-data/' .git/info/exclude || echo '/.bench-data/' >> .git/info/exclude
#   PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_accuracy.py --data .bench-data --prepare-only   # 7 MiB
# then one device run, carrying both (working tree + carried paths must stay under 64 MiB):
#   command "bash Testing/Benchmarks/gpu_check.sh", carry [".whl", ".bench-data"], timeout_s 600
# Tunables (environment): BENCH_DATA (default .bench-data), ACCURACY_STEPS (default 800).
set -euo pipefail
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${OUT:?OUT must name the folder the results go to}"
data="${BENCH_DATA:-.bench-data}"
accuracy_steps="${ACCURACY_STEPS:-800}"

main() {
  if [[ ! -f "$data/bench-data.json" ]]; then
    echo "No benchmark data in $data: build it on a machine with network access and carry it (see this script's header)."
    return 2
  fi
  local site
  site="$(mktemp -d)/site"
  echo "=== installing the carried wheels into $site $(date +%T)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD/SCDLCore${PYTHONPATH:+:$PYTHONPATH}"
  export SCDL_CACHE_DIR="$PWD/$data"  # bench_segment.py fetches ct_abdomen from the carried sample cache, offline
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import sys, torch, monai, SimpleITK; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '| monai', monai.__version__, '| SimpleITK', SimpleITK.Version_VersionString())"

  failed=()
  part "train step (CPS + GA + SCDL, 96^3, VNet-16)" 150 \
    python3 Testing/Benchmarks/bench_train_step.py --device cuda --out "$OUT/train_step.md"
  part "segment 512x512x300 CT" 100 \
    python3 Testing/Benchmarks/bench_segment.py --device cuda --out "$OUT/segment_gpu.md"
  part "accuracy, reduced: 1 seed, $accuracy_steps steps" 240 \
    python3 Testing/Benchmarks/bench_accuracy.py --device cuda --data "$data" --work "$(mktemp -d)" --out "$OUT" \
      --configs cps_ga cps_ga_scdl floor --seeds 1 --steps "$accuracy_steps" --no-compile
  part "CUDA tests" 30 bash -c cuda_tests

  if (( ${#failed[@]} )); then
    printf '=== FAILED: %s\n' "${failed[@]}"
    return 1
  fi
  echo "=== all parts passed"
}

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit; on failure record NAME and go on
  local name=$1 seconds=$2 start=$SECONDS rc=0
  shift 2
  echo "=== $name (limit ${seconds} s) $(date +%T)"
  timeout -k 15 "$seconds" "$@" || rc=$?
  if (( rc == 0 )); then
    echo "=== $name: done in $((SECONDS - start)) s"
  else
    echo "=== $name: FAILED (exit $rc$( (( rc == 124 )) && echo ', time limit')) after $((SECONDS - start)) s"
    failed+=("$name")
  fi
}

cuda_tests() {  # the tests named for CUDA/GPU; pytest's exit 5 means none exist, which is no failure
  local rc=0
  python3 -m pytest SCDLCore/tests -q -p no:cacheprovider -k "cuda or gpu" || rc=$?
  if (( rc == 5 )); then
    echo "no CUDA tests in the suite"
    return 0
  fi
  return "$rc"
}
export -f cuda_tests

mkdir -p "$OUT"
main 2>&1 | tee "$OUT/gpu_check.log"
