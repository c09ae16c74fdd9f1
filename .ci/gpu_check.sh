#!/usr/bin/env bash
# One-command check of the CUDA-only paths on one NVIDIA GPU, under 8 minutes by construction:
# each item below is killed at its own budget (BUDGET, their sum checked at the start).
# Run from anywhere:   bash .ci/gpu_check.sh
# Items, in this order (the compiled decoding early, where a slow item cannot crowd it out):
#   matmul_peak        a measured bf16 matmul peak (the MFU denominator)
#   train_bf16         `python train.py` on the GPU with its own defaults (small, 32 x 1024, bf16)
#                      for a few steps: loss, tokens/s, MFU; its measured peak memory must be within
#                      the dry run's estimate + 10%, under a cap of 80 GB on a larger card (an H200),
#                      so that what would not fit an 80 GB GPU fails here too
#   infer_compile      infer.py --compile on that checkpoint (compiled static-shape decoding)
#   infer_fp8_compile  infer.py --dtype fp8 --compile (FP8-stored weights in a compiled step)
#   cuda_tests         the CUDA-only tests of test_model.py (expert back-ends on CUDA; real vs
#                      emulated FP8 GEMM at M = 1, 7, 100, 4096; the FP8 training step)
#   train_fp8          `python train.py --fp8` with its own defaults (16 x 1024 x --grad-accum 2):
#                      the same checks, and scaled_mm calls counted (on Hopper there must be some)
#   infer_bench        infer.py --bench: plain and speculative greedy decoding, tokens/s, same text
#   infer_fp8          infer.py --dtype fp8, eager
# Prints "PASS|FAIL|SKIP|INFO <item>: detail" lines and a summary; exits 1 if anything failed or,
# on a GPU, was skipped. Env: PYTHON (default: the README's .venv, else python3, else python),
# SMOKE_DEVICE (cuda; cpu runs every item on the tiny preset with budgets x4, to debug this script
# without a GPU).
set -u
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON                    # the README installs into .venv
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PY=$VIRTUAL_ENV/bin/python
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
elif command -v python3 > /dev/null; then PY=python3        # stock images often have only python3
else PY=python; fi
DEV=${SMOKE_DEVICE:-cuda}
SCALE=1; [ "$DEV" = cpu ] && SCALE=4
declare -A BUDGET=([matmul_peak]=15 [train_bf16]=70 [infer_compile]=90 [infer_fp8_compile]=90
                   [cuda_tests]=40 [train_fp8]=75 [infer_bench]=25 [infer_fp8]=20)
KILL_AFTER=5  # a command that ignores the TERM at its budget is killed this much later
total=0; for item in "${!BUDGET[@]}"; do total=$(( total + BUDGET[$item] + KILL_AFTER )); done
if [ $total -gt 470 ]; then echo "gpu_check.sh: the item budgets add up to ${total} s, over 8 minutes"; exit 2; fi
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
START=$(date +%s)
export PYTHONUNBUFFERED=1 SMOKE_DEVICE=$DEV
: > "$TMP/summary"
echo "python: $PY; items budgeted ${total} s in all on a GPU (x$SCALE here)"

say() { echo "$1" | tee -a "$TMP/summary"; }

# check NAME CMD...: runs CMD for at most BUDGET[NAME] seconds; its "RESULT <status> <detail>" lines
# become summary lines; a non-zero exit (or a timeout) is a FAIL
check() {
  local name=$1; shift
  local t=$(( BUDGET[$name] * SCALE ))
  echo "=== $name (at most ${t}s)"
  local t0=$(date +%s)
  timeout -k $KILL_AFTER "$t" "$@" > "$TMP/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  grep -v '^RESULT ' "$TMP/$name.log" | tail -n 3 | cut -c1-200 | sed 's/^/    /'
  grep '^RESULT ' "$TMP/$name.log" | while read -r _ status detail; do say "$status $name: $detail (${dt}s)"; done
  if [ $rc -ne 0 ]; then
    say "FAIL $name: exit $rc$([ $rc -ge 124 ] && echo " (timeout: over its ${t} s budget)") after ${dt}s; log $TMP/$name.log"
    tail -n 12 "$TMP/$name.log" | sed 's/^/    /'
  fi
}

# the bf16 matmul peak that MFU is measured against: the best of a few square products
check matmul_peak "$PY" - "$TMP/peak" <<'EOF'
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

# train.main in-process: scaled_mm calls counted, peak memory against the dry run, tokens/s and MFU
TRAIN_HELPER=$(cat <<'EOF'
import contextlib, io, json, math, os, sys, time, torch
import model, train
dev, argv = os.environ["SMOKE_DEVICE"], sys.argv[2:]
H100 = 81559 * 2**20   # an "80 GB" H100 as torch reports it (79.65 GiB)
cap = ""
if dev == "cuda":
    free, total = torch.cuda.mem_get_info()
    if total > H100:   # a larger card (H200): allow this process what an 80 GB card would leave it
        torch.cuda.set_per_process_memory_fraction((H100 - (total - free)) / total)
        cap = f", capped at {(H100 - (total - free)) / 2**30:.1f} GiB of {total / 2**30:.0f}"
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
    peak, what = torch.cuda.max_memory_allocated(), "allocated"
else:  # RSS holds the interpreter and torch too: printed, not held against the estimate
    import resource
    peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"
need_fp8 = "--fp8" in argv and model.fp8_real_available(dev)
fits = dev != "cuda" or peak <= 1.10 * est["peak"]
ok = all(math.isfinite(r["loss"]) for r in recs) and len(recs) == a.max_steps and (calls[0] > 0 or not need_fp8) and fits
print(f"RESULT {'PASS' if ok else 'FAIL'} {a.preset} {a.batch_size}x{a.seq_len}x{a.grad_accum}, loss {recs[0]['loss']:.3f} -> "
      f"{recs[-1]['loss']:.3f}, {tok_s:,.0f} tokens/s, MFU {mfu:.1%} of the measured bf16 peak, peak memory "
      f"{peak / 2**30:.2f} GiB {what}{cap} (dry run's estimate {est['peak'] / 2**30:.2f} GiB"
      f"{'' if fits else ', exceeded by more than 10%'}), scaled_mm calls {calls[0]}{' (Hopper: must be > 0)' if need_fp8 else ''}")
sys.exit(0 if ok else 1)
EOF
)
CK="$TMP/ck"
COMMON=(--device "$DEV" --max-steps 3 --eval-interval 3 --eval-batches 1 --save-interval 1000 --sample-bytes 0)
SHRINK=(); [ "$DEV" = cpu ] && SHRINK=(--preset tiny --batch-size 2 --seq-len 64)
# `python train.py` on a GPU: its own defaults (small, 32 x 1024, bf16 autocast)
check train_bf16 "$PY" -c "$TRAIN_HELPER" "$TMP/peak" --out "$CK" "${COMMON[@]}" ${SHRINK[@]+"${SHRINK[@]}"}

# infer.py on the bf16 checkpoint: its last stderr line carries decode tokens/s and peak memory
infer() {
  local name=$1; shift
  check "$name" bash -c "$PY infer.py --ckpt '$CK' --device $DEV --prompt 'def ' --max-new-tokens 64 --temperature 0 $* \
    > '$TMP/$name.stdout' 2> '$TMP/$name.stderr'; rc=\$?; tail -n 5 '$TMP/$name.stderr'
    line=\$(grep 'decode' '$TMP/$name.stderr' | tail -n 1)
    if [ \$rc -eq 0 ] && [ -n \"\$line\" ]; then echo \"RESULT PASS \$line\"; else echo \"RESULT FAIL exit \$rc\"; exit 1; fi"
}
infer infer_compile --compile
infer infer_fp8_compile --dtype fp8 --compile

# CUDA-only tests (they skip without a GPU, then reported as SKIP here)
check cuda_tests bash -c "$PY -m pytest -q -rs test_model.py -k 'on_cuda or on_hopper or any_row_count' > '$TMP/pytest.out' 2>&1; rc=\$?; tail -n 15 '$TMP/pytest.out'
  line=\$(tail -n 1 '$TMP/pytest.out'); if [ \$rc -ne 0 ]; then echo \"RESULT FAIL \$line\"; exit 1
  elif echo \"\$line\" | grep -q skipped && [ $DEV = cuda ]; then echo \"RESULT FAIL a test skipped on the GPU: \$line\"
  elif echo \"\$line\" | grep -q passed; then echo \"RESULT PASS \$line\"; else echo \"RESULT SKIP \$line\"; fi"

# --fp8 with its own defaults (small: 16 x 1024, --grad-accum 2; float32 activations)
check train_fp8 "$PY" -c "$TRAIN_HELPER" "$TMP/peak" --out "$TMP/fp8" --fp8 "${COMMON[@]}" ${SHRINK[@]+"${SHRINK[@]}"}

# plain and MTP speculative greedy decoding, eager: tokens/s, and whether the texts agree
check infer_bench bash -c "$PY infer.py --ckpt '$CK' --device $DEV --prompt 'def ' --max-new-tokens 32 --bench \
  > '$TMP/bench.out' 2>&1; rc=\$?; tail -n 4 '$TMP/bench.out'
  plain=\$(grep '^plain' '$TMP/bench.out' | awk '{print \$2}'); spec=\$(grep '^speculative' '$TMP/bench.out' | awk '{print \$2, \$4}')
  if [ \$rc -ne 0 ] || [ -z \"\$plain\" ]; then echo \"RESULT FAIL exit \$rc\"; exit 1; fi
  echo \"RESULT PASS decode tokens/s: plain \$plain, speculative \$spec MTP acceptance\"
  if grep -q 'outputs identical: yes' '$TMP/bench.out'; then echo 'RESULT PASS speculative and plain greedy texts are the same'
  else echo 'RESULT INFO speculative and plain greedy texts differ (bf16 near-ties can flip an argmax)'; fi"
infer infer_fp8 --dtype fp8

echo
echo "==== summary ($(( $(date +%s) - START )) s on $DEV; logs in $TMP)"
cat "$TMP/summary"
echo "==== $(grep -c '^PASS' "$TMP/summary") PASS, $(grep -c '^FAIL' "$TMP/summary") FAIL, $(grep -c '^SKIP' "$TMP/summary") SKIP$([ "$DEV" = cuda ] && echo ' (a SKIP on the GPU fails the check)')"
! grep -q '^FAIL' "$TMP/summary" && { [ "$DEV" != cuda ] || ! grep -q '^SKIP' "$TMP/summary"; }
