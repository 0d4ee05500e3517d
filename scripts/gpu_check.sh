#!/usr/bin/env bash
# A GPU run in one command: build, prove the CUDA path, take the measurements.
#
#   scripts/gpu_check.sh OUT_DIR [STEP ...]      # from the checkout's root; default: every step below
#
# Written for a machine with one H200 (16 cores, torch 2.11.0+cu130, Python 3.12, nvcc 13.0,
# no package registry) and a budget of 8 minutes for the whole script, leaving time for one rerun
# of the failed steps after a fix (`scripts/gpu_check.sh OUT_DIR2 build selftest`, say). The script
# stops itself: every step runs under `timeout`, cut to what is left of DEADLINE after the steps
# before it, so it ends within 8 minutes whatever hangs (DEADLINE: 470 s, or GPU_CHECK_SECONDS;
# SELFTEST_SECONDS sets the self-test's --budget, 180 s by default). Each step's output goes to its own log,
# kept whatever a later step does; OUT_DIR/summary.md lists every step (exit code, seconds) and
# OUT_DIR/logs.tar.gz (refreshed after every step) holds everything, for a device tool that brings
# back only a few files: copy those two.
#
# Estimated time per step on that machine, and the cap each runs under. Measured there once: the
# build of an earlier, smaller tree took 58 s (MAX_JOBS=16). The rest are estimates: the build's from
# CPU times on the 2-core development machine (the longest compile, csrc/cuda/l2_penalty_kernel.cu,
# 64 s of CPU time; every other file <= 38 s, side by side with MAX_JOBS=16); the self-test's from
# its checks' own estimates (`python -m l2fast.selftest --list`); the rest from what each step runs.
#   step       what                                                          estimate   cap
#   versions   nvidia-smi (GPU, driver, clocks, MIG), torch, CUDA, nvcc, tools      5 s     20 s
#   build      pip install --no-index --no-build-isolation --no-deps .             90 s    240 s
#   selftest   python -m l2fast.selftest --device cuda --skip bench --budget 180  180 s    195 s
#              (skips and reports what would not fit; its 4 compute-sanitizer runs
#              and 4 training-parity runs start beside its in-process checks)
#   tests      the CUDA tests (pytest -k cuda -m "not slow"), beside selftest     (120 s)  195 s
#   measure    scripts/gpu_measure.py: the H200 targets (kernel vs same-bytes     90 s    120 s
#              copy at 1e8 fp32/bf16, MLP launches and host/GPU µs, 5 epochs with
#              --cuda-graphs vs the CPU's losses, one-process NCCL FSDP)
#   optim      python -m l2fast.bench optim --device cuda, mlp..100M values        30 s     45 s
#   train      python -m l2fast.bench train --device cuda, then --cuda-graphs      25 s     60 s
#   penalty    python -m l2fast.bench penalty --device cuda --sizes mlp,1M,100M    45 s     90 s
#   total                                                                       ~ 465 s    470 s
# Optional, not in the default list: `ncu` (Nsight Compute, SpeedOfLight + Occupancy of the kernel
# at 1e8 values, --clock-control none; ~40 s).
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR [STEP ...]  (steps: versions build selftest tests measure penalty optim train ncu)" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(versions build selftest tests measure penalty optim train)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
CORES=$(nproc)
BUDGET=${GPU_CHECK_SECONDS:-470}
DEADLINE=$((SECONDS + BUDGET))
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs"
printf '# scripts/gpu_check.sh\n\nstarted %s in %s; steps: %s\n\n| step | exit | seconds | log |\n|---|---|---|---|\n' \
    "$(date -u +%FT%TZ)" "$ROOT" "${STEPS[*]}" > "$OUT/summary.md"

wanted() { local s; for s in "${STEPS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

pack() {  # may run in two steps at once: each through its own temporary name
    local tmp="$OUT/.logs.$BASHPID.tgz"
    tar -czf "$tmp" -C "$OUT" --exclude logs.tar.gz --exclude '.logs.*' . 2>/dev/null && mv -f "$tmp" "$OUT/logs.tar.gz"
}

# cap NAME SECONDS: the seconds step NAME may run, at most SECONDS and what is left before DEADLINE.
cap() { local left=$((DEADLINE - SECONDS)); [ "$2" -lt "$left" ] && echo "$2" || echo "$left"; }

# run NAME SECONDS CMD...: CMD under timeout, its output in logs/NAME.log, a row in summary.md.
run() {
    local name=$1 limit start rc
    limit=$(cap "$1" "$2")
    shift 2
    if [ "$limit" -lt 10 ]; then
        echo "| $name | skipped: $limit s left of the $BUDGET s budget | 0 | |" >> "$OUT/summary.md"
        return 0
    fi
    start=$SECONDS
    echo "== $name (cap ${limit} s)"
    timeout -k 5 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "[stopped by gpu_check.sh after ${limit} s]" >> "$OUT/logs/$name.log"
    echo "| $name | $rc$([ $rc -eq 124 ] && echo ' (timed out)') | $((SECONDS - start)) | logs/$name.log |" >> "$OUT/summary.md"
    echo "   $name: exit $rc in $((SECONDS - start)) s"
    pack
    return 0
}

VERSIONS='nvidia-smi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,mig.mode.current --format=csv
"$PY" -c "import torch, sys; p = torch.cuda.get_device_properties(0); print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| CUDA\", torch.version.cuda, \"|\", p.name, p.multi_processor_count, \"SMs\", round(p.total_memory / 2**30), \"GiB\")"
nvcc --version | tail -2
for tool in compute-sanitizer ncu; do command -v $tool > /dev/null && $tool --version | tail -1 || echo "$tool: not on PATH"; done
echo "cores: $(nproc)"; free -g | head -2'
export PY
wanted versions && run versions 20 bash -c "$VERSIONS"
wanted build && run build 240 env MAX_JOBS="$CORES" "$PY" -m pip install --no-index --no-build-isolation --no-deps -v .

# The self-test and the CUDA tests share nothing but the GPU: run them side by side.
if wanted selftest || wanted tests; then
    pids=()
    if wanted selftest; then
        run selftest 195 "$PY" -m l2fast.selftest --device cuda --skip bench --budget "${SELFTEST_SECONDS:-180}" --out "$OUT/selftest" &
        pids+=($!)
    fi
    if wanted tests; then
        run tests 195 bash -c "cd tests && exec $PY -m pytest -q -rs -p no:cacheprovider -k cuda -m 'not slow'" &
        pids+=($!)
    fi
    wait "${pids[@]}"
fi

wanted measure && run measure 120 "$PY" scripts/gpu_measure.py --out "$OUT/measure"
wanted optim && run optim 45 "$PY" -m l2fast.bench optim --device cuda --sizes mlp,1M,10M,100M
if wanted train; then
    run train 60 bash -c "$PY -m l2fast.bench train --device cuda --steps 200 && $PY -m l2fast.bench train --device cuda --cuda-graphs --steps 200"
fi
wanted penalty && run penalty 90 "$PY" -m l2fast.bench penalty --device cuda --sizes mlp,1M,100M
if wanted ncu; then
    run ncu 90 ncu --clock-control none --section SpeedOfLight --section Occupancy -k regex:l2_penalty_kernel -c 3 \
        "$PY" -c "import torch, l2fast.ops; p = [torch.randn(10**8, device='cuda')]; g = [torch.zeros_like(p[0])]; [torch.ops.l2fast.l2_penalty_(p, g, 1e-4, []) for _ in range(3)]; torch.cuda.synchronize()"
fi

echo "" >> "$OUT/summary.md"
[ -f "$OUT/selftest/report.md" ] && sed -n '3p' "$OUT/selftest/report.md" | sed 's/^/selftest: /' >> "$OUT/summary.md"
[ -f "$OUT/measure/measure.md" ] && cat "$OUT/measure/measure.md" >> "$OUT/summary.md"
echo "finished after $SECONDS s" >> "$OUT/summary.md"
pack
cat "$OUT/summary.md"
