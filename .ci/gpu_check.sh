#!/usr/bin/env bash
# One-command check of the CUDA-only paths on one NVIDIA GPU (written for an H200; under 5 minutes).
# Run from anywhere:   bash .ci/gpu_check.sh
# Checks: a measured bf16 matmul peak (the MFU denominator); the CUDA-only tests of test_model.py
# (grouped vs padded experts, values and gradients; real vs emulated FP8 GEMM at M = 1, 7, 100,
# 4096; the FP8 training step); `python train.py` for a few steps in bf16 (the small preset at its
# default 32 x 1024) and with --fp8 (scaled_mm calls counted: there must be some on Hopper), each
# with tokens/s, MFU, peak memory and the dry run's estimate of that peak; infer.py eager,
# --compile, --speculative and --dtype fp8 on the checkpoint just trained, with tokens/s.
# Prints "PASS|FAIL|SKIP|INFO <item>: detail" lines and a summary; exit 1 if anything failed.
# Env: PYTHON (default python), SMOKE_DEVICE (cuda; cpu shrinks every run to the tiny preset, to
# debug this script without a GPU), SMOKE_BUDGET (seconds, default 285: items that would start
# past it are skipped).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEV=${SMOKE_DEVICE:-cuda}
BUDGET=${SMOKE_BUDGET:-285}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
START=$(date +%s)
export PYTHONUNBUFFERED=1 SMOKE_DEVICE=$DEV
: > "$TMP/summary"

say() { echo "$1" | tee -a "$TMP/summary"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# check NAME MAXSECONDS CMD...: the command's "RESULT <status> <detail>" lines become summary lines;
# a non-zero exit (or a timeout) is a FAIL
check() {
  local name=$1 max=$2; shift 2
  local t=$(( $(left) < max ? $(left) : max ))
  if [ "$t" -lt 10 ]; then say "SKIP $name: time budget spent"; return; fi
  echo "=== $name (at most ${t}s)"
  local t0=$(date +%s)
  timeout -k 5 "$t" "$@" > "$TMP/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  grep -v '^RESULT ' "$TMP/$name.log" | tail -n 3 | cut -c1-200 | sed 's/^/    /'
  grep '^RESULT ' "$TMP/$name.log" | while read -r _ status detail; do say "$status $name: $detail (${dt}s)"; done
  if [ $rc -ne 0 ]; then
    say "FAIL $name: exit $rc$([ $rc -ge 124 ] && echo ' (timeout)') after ${dt}s; log $TMP/$name.log"
    tail -n 12 "$TMP/$name.log" | sed 's/^/    /'
  fi
}

# the bf16 matmul peak that MFU is measured against: the best of a few square products
check matmul_peak 30 "$PY" - "$TMP/peak" <<'EOF'
import os, sys, time, torch
dev = os.environ["SMOKE_DEVICE"]
n, reps = (8192, 20) if dev == "cuda" else (1024, 3)
a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
best = 0.0
for _ in range(3):
    a @ b; sync(); t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(); best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
open(sys.argv[1], "w").write(str(best))
name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
import model
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {name}, fp8_real_available={model.fp8_real_available(dev)}")
print(f"RESULT INFO {name}: bf16 matmul {n}^3 at {best / 1e12:.1f} TFLOP/s")
EOF

# CUDA-only tests (they skip without a GPU, then reported as SKIP here)
check cuda_tests 90 bash -c "$PY -m pytest -q -rs test_model.py -k 'on_cuda or on_hopper or any_row_count' > '$TMP/pytest.out' 2>&1; rc=\$?; tail -n 15 '$TMP/pytest.out'
  line=\$(tail -n 1 '$TMP/pytest.out'); if [ \$rc -ne 0 ]; then echo \"RESULT FAIL \$line\"; exit 1
  elif echo \"\$line\" | grep -q skipped && [ $DEV = cuda ]; then echo \"RESULT FAIL a test skipped on the GPU: \$line\"
  elif echo \"\$line\" | grep -q passed; then echo \"RESULT PASS \$line\"; else echo \"RESULT SKIP \$line\"; fi"

# train.main in-process: scaled_mm calls counted, peak memory, tokens/s and MFU, the dry run's peak
TRAIN_HELPER=$(cat <<'EOF'
import contextlib, io, json, math, os, sys, time, torch
import model, train
dev, argv = os.environ["SMOKE_DEVICE"], sys.argv[2:]
calls = [0]
real = model.fp8_scaled_mm
def counted(*a, **kw):
    calls[0] += 1
    return real(*a, **kw)
model.fp8_scaled_mm = counted          # fp8_gemm looks the name up at each call
with contextlib.redirect_stdout(io.StringIO()):
    est = train.main(argv + ["--dry-run"])
if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
train.main(argv)
out = argv[argv.index("--out") + 1]
recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
a, margs = train.parse_args(argv)
tok_s = sorted(r["tokens_per_s"] for r in recs[1:] or recs)[len(recs[1:] or recs) // 2]  # median, first step left out
flops = model.accounting(margs, a.seq_len)["flops_per_token"]
mfu = tok_s * flops / float(open(sys.argv[1]).read())
if dev == "cuda":
    peak = torch.cuda.max_memory_allocated()
else:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
need_fp8 = "--fp8" in argv and model.fp8_real_available(dev)
ok = all(math.isfinite(r["loss"]) for r in recs) and len(recs) == a.max_steps and (calls[0] > 0 or not need_fp8)
print(f"RESULT {'PASS' if ok else 'FAIL'} {a.preset} {a.batch_size}x{a.seq_len}, loss {recs[0]['loss']:.3f} -> "
      f"{recs[-1]['loss']:.3f}, {tok_s:,.0f} tokens/s, MFU {mfu:.1%} of the measured bf16 peak, peak memory "
      f"{peak / 2**30:.2f} GiB {'allocated' if dev == 'cuda' else 'RSS'} (dry run's estimate {est['peak'] / 2**30:.2f} GiB), "
      f"scaled_mm calls {calls[0]}{' (Hopper: must be > 0)' if need_fp8 else ''}")
sys.exit(0 if ok else 1)
EOF
)
CK="$TMP/ck"
COMMON=(--max-steps 4 --eval-interval 4 --eval-batches 1 --save-interval 1000 --sample-bytes 0)
if [ "$DEV" = cpu ]; then SHRINK=(--preset tiny --batch-size 2 --seq-len 64); else SHRINK=(--preset small); fi
# `python train.py` on a GPU: small preset at its defaults (32 x 1024, bf16 autocast)
check train_bf16 100 "$PY" -c "$TRAIN_HELPER" "$TMP/peak" --device "$DEV" --out "$CK" "${COMMON[@]}" "${SHRINK[@]}"
# --fp8: the dry run says 32 x 1024 needs ~118 GiB (float32 activations, padded experts); 8 x 1024 here
FP8_BATCH=(--batch-size 8); [ "$DEV" = cpu ] && FP8_BATCH=()
check train_fp8 100 "$PY" -c "$TRAIN_HELPER" "$TMP/peak" --device "$DEV" --out "$TMP/fp8" --fp8 "${COMMON[@]}" "${SHRINK[@]}" ${FP8_BATCH[@]+"${FP8_BATCH[@]}"}

# infer.py on the bf16 checkpoint: its last stderr line carries decode tokens/s and peak memory
infer() {
  local name=$1; shift
  check "$name" 120 bash -c "$PY infer.py --ckpt '$CK' --device $DEV --prompt 'def ' --max-new-tokens 64 --temperature 0 $* \
    > '$TMP/$name.stdout' 2> '$TMP/$name.stderr'; rc=\$?; tail -n 5 '$TMP/$name.stderr'
    line=\$(grep 'decode' '$TMP/$name.stderr' | tail -n 1)
    if [ \$rc -eq 0 ] && [ -n \"\$line\" ]; then echo \"RESULT PASS \$line\"; else echo \"RESULT FAIL exit \$rc\"; exit 1; fi"
}
infer infer_eager
infer infer_speculative --speculative
infer infer_fp8_weights --dtype fp8
infer infer_compile --compile
if [ ! -s "$TMP/infer_eager.stdout" ] || [ ! -s "$TMP/infer_speculative.stdout" ]; then
  say "SKIP speculative_vs_eager: a run is missing"
elif cmp -s "$TMP/infer_eager.stdout" "$TMP/infer_speculative.stdout"; then
  say "PASS speculative_vs_eager: same greedy text"
else
  say "INFO speculative_vs_eager: greedy texts differ (bf16 near-ties can flip an argmax)"
fi

echo
echo "==== summary ($(( $(date +%s) - START )) s on $DEV; logs in $TMP)"
cat "$TMP/summary"
echo "==== $(grep -c '^PASS' "$TMP/summary") PASS, $(grep -c '^FAIL' "$TMP/summary") FAIL, $(grep -c '^SKIP' "$TMP/summary") SKIP"
! grep -q '^FAIL' "$TMP/summary"
