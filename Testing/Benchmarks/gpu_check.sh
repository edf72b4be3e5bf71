#!/usr/bin/env bash
# The GPU check: ONE run of at most about 9 minutes on an H100 or H200 (GPU_CHECK_SECONDS, default 510) that
#   1. trains two starter candidates, side by side: the starter's recipe (Testing/StarterModel/starter.yaml, supervised
#      + GA) and the same as CPS + GA + SCDL with the unlabeled CTs (make_starter_model.py; each exports one network at
#      float16 and scores both labeled CTs);
#   2. meanwhile runs the accuracy benchmark (bench_accuracy.py: every configuration, 3 seeds, VNet-12, 64^3 patches,
#      ACCURACY_STEPS steps, JOBS runs at a time on the one GPU: small 3D networks leave most of it idle);
#   3. then, on the quiet GPU, times the training step (bench_train_step.py) and segmentation (bench_segment.py).
# Every part has a time limit; a part that fails or runs out of time is reported and the others still run, and the
# script then exits 1. Results in $OUT (7 files): gpu_check.log, accuracy.md/.json/.png, starter/ (the starter recipe's
# model.json and weights) and extras.tar (the CPS + GA + SCDL candidate, both candidates' curves and
# logs, train_step.md/.json, segment_gpu.md).
#
# The GPU machine has no network and lacks monai and SimpleITK. Here, once, from the repository root:
#   ../shared/device/make-wheels --with-io && rm .whl/slicerio-* .whl/pynrrd-*   # monai + SimpleITK: 52 MiB
#   PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_accuracy.py --data .bench-data --prepare-only   # 7 MiB
# then one device run: command "bash Testing/Benchmarks/gpu_check.sh", carry [".whl", ".bench-data"], timeout_s 570.
# The working tree travels too and everything must stay under 64 MiB: delete the bundled starter model's two files
# from the working tree for that run (10 MiB; the run makes its successor).
# GPU_CHECK_PART=ablation runs only the ablation of SCDL's open choices (10 runs at once, about 5 to 6 minutes on an
# H100), the part the 2026-11-27 run had no time for, then bench_segment.py if a minute of the budget is left.
# GPU_CHECK_PART=third-seed adds seed 2 of the ablation and (b) CPS + GA on seeds 0-2 to the ablation's committed table
# (ADD_TO, default results/ablation_h200.json; 8 runs at once, about 4 minutes on an H200).
# Runs still training at bench_accuracy's --time-limit stop and are scored with the weights reached (past half their
# steps; the table lists them), so a slower machine gives shorter runs rather than none.
# Rehearsal on a CPU machine before spending GPU time (tiny sizes, same steps, ~4 minutes on 2 cores):
#   OUT=/tmp/gpu-check REHEARSAL=1 GPU_CHECK_SECONDS=400 bash Testing/Benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_NUM_THREADS=2 TQDM_MININTERVAL=30  # 16 cores, ~8 processes; calm logs
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${OUT:?OUT must name the folder the results go to}"
data="${BENCH_DATA:-.bench-data}"
budget="${GPU_CHECK_SECONDS:-510}"
train_until=$((budget * 78 / 100))  # training ends here; the timing benchmarks get the rest
accuracy_steps="${ACCURACY_STEPS:-700}"
jobs="${JOBS:-6}"
device=cuda accuracy_size=(--width 12 --patch 64) starter_size=() step_size=() segment_size=()
if [[ "${REHEARSAL:-0}" == 1 ]]; then  # CPU, tiny networks: checks the plumbing, not the numbers
  device=cpu accuracy_steps=4 accuracy_size=(--width 2 --patch 32 --spacing 6)
  starter_size=(--set train.steps=4 --set network.width=2 --set 'train.patch_size=[32,32,32]' --set scdl.grid=4 --set train.device=cpu)
  step_size=(--patch 32 --width 4 --steps 2 --warmup 1) segment_size=(--spacing 6 6 6 --width 2 --patch 32)
fi
work="$(mktemp -d)"
mkdir -p "$work/extras" "$OUT"
failed=()

main() {
  if [[ ! -f "$data/bench-data.json" ]]; then
    echo "No benchmark data in $data: build it on a machine with network access and carry it (see this script's header)."
    return 2
  fi
  echo "=== installing the carried wheels $(date +%T)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .whl/*.whl || return 2
  export PYTHONPATH="$work/site:$PWD/SCDLCore${PYTHONPATH:+:$PYTHONPATH}"
  export SCDL_CACHE_DIR="$PWD/$data"  # bench_segment.py reads ct_abdomen from the carried sample cache, offline
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv,noheader || true
  python3 -c "import sys, torch, monai, SimpleITK; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '| monai', monai.__version__, '| SimpleITK', SimpleITK.Version_VersionString())" || return 2

  case "${GPU_CHECK_PART:-all}" in
    ablation) ablation_run ;;
    third-seed) third_seed_run ;;
    *) full_run ;;
  esac

  if (( ${#failed[@]} )); then
    printf '=== FAILED: %s\n' "${failed[@]}"
    return 1
  fi
  echo "=== all parts passed"
}

full_run() {  # the starters, the accuracy benchmark beside them, then the timing benchmarks
  starter scdl "$OUT/starter" "${starter_size[@]}"
  starter cps "$work/extras/starter_cps" --set ssl.base=cps --set scdl.enabled=true --set train.unlabeled_batch=2 \
    "${starter_size[@]}"
  part "accuracy: 10 configurations x 3 seeds, $accuracy_steps steps, $jobs at a time" $((train_until - SECONDS + 20)) \
    python3 Testing/Benchmarks/bench_accuracy.py --device "$device" --data "$data" --work "$work/accuracy" --out "$OUT" \
      --seeds 3 --steps "$accuracy_steps" "${accuracy_size[@]}" --no-compile --jobs "$jobs" \
      --time-limit $((train_until - SECONDS - 25))  # runs still training then stop and are scored: 45 s for that
  for variant in scdl cps; do
    wait_starter "$variant"
  done
  local left=$((budget - SECONDS))
  part "train step (CPS + GA + SCDL, 96^3, VNet-16)" $((left - 50 < 90 ? (left - 50 > 40 ? left - 50 : 40) : 90)) \
    python3 Testing/Benchmarks/bench_train_step.py --device "$device" "${step_size[@]}" --out "$work/extras/train_step.md"
  segment_bench 40
}

segment_bench() {  # segment_bench MIN_SECONDS: time segmentation with what is left of the budget, at least MIN_SECONDS
  local left=$((budget - SECONDS))
  part "segment 512x512x300 CT" $((left > $1 ? left : $1)) \
    python3 Testing/Benchmarks/bench_segment.py --device "$device" "${segment_size[@]}" --out "$work/extras/segment_gpu.md"
}

ablation_configs=(cps_ga_scdl scdl_p2e_classes scdl_labeled_only scdl_grid_fine scdl_anchor_ema)  # the base first

ablation_run() {  # SCDL's open choices only, paired with the base on seeds 0-1
  accuracy_part "ablation: 4 choices + the base x 2 seeds, $accuracy_steps steps" 10 "${ablation_configs[@]}" --seeds 2
  if (( budget - SECONDS >= 60 )); then  # segmentation was made faster after the 2026-11-27 run: time it again
    segment_bench 60
  fi
}

third_seed_run() {  # seed 2 of the ablation, and (b) CPS + GA on seeds 0-2, added to the ablation's table (ADD_TO)
  accuracy_part "third seed: (b) x 3 seeds, the base and 4 choices seed 2, $accuracy_steps steps" 8 cps_ga "${ablation_configs[@]}" \
    --seeds 3 --add-to "${ADD_TO:-Testing/Benchmarks/results/ablation_h200.json}"
}

accuracy_part() {  # accuracy_part NAME JOBS CONFIGURATION... [OPTION...]: bench_accuracy.py until 60 s before the budget ends
  local name=$1 jobs=$2
  shift 2
  part "$name" $((budget - SECONDS)) \
    python3 Testing/Benchmarks/bench_accuracy.py --device "$device" --data "$data" --work "$work/accuracy" --out "$OUT" \
      --steps "$accuracy_steps" "${accuracy_size[@]}" --no-compile --jobs "$jobs" --time-limit $((budget - SECONDS - 60)) --configs "$@"
}

declare -A starter_pid starter_started
starter() {  # starter VARIANT DEST [--set ...]: train a starter candidate in the background; it ships what it has
  # reached 30 s before train_until (scoring follows), and is killed 30 s after
  local variant=$1 dest=$2
  shift 2
  echo "=== starter $variant: started in the background $(date +%T)"
  timeout -k 15 $((train_until - SECONDS + 30)) python3 Testing/StarterModel/make_starter_model.py \
    --work "$work/starter_$variant" --data "$data" --out "$dest" --device "$device" --time-limit $((train_until - SECONDS - 30)) "$@" >"$work/extras/starter_$variant.log" 2>&1 &
  starter_pid[$variant]=$!
  starter_started[$variant]=$SECONDS
}

wait_starter() {  # wait_starter VARIANT: its exit status, its log's tail, its curves into extras
  local variant=$1 rc=0
  wait "${starter_pid[$variant]}" || rc=$?
  tail -n 40 "$work/extras/starter_$variant.log"
  cp "$work/starter_$variant/run/curves.png" "$work/extras/starter_${variant}_curves.png" 2>/dev/null || true
  if (( rc == 0 )); then
    echo "=== starter $variant: done in $((SECONDS - starter_started[$variant])) s"
  else
    echo "=== starter $variant: FAILED (exit $rc$( (( rc == 124 )) && echo ', time limit'))"
    failed+=("starter $variant")
  fi
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

pack() {  # what does not fit $OUT's 8 files goes into one archive
  tar -cf "$OUT/extras.tar" -C "$work" extras && echo "=== packed $(du -h "$OUT/extras.tar" | cut -f1) into extras.tar"
}

main 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
pack 2>&1 | tee -a "$OUT/gpu_check.log"
exit "$status"
