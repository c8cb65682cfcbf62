#!/usr/bin/env bash
# Device check for a GPU machine with no Rust toolchain and no network (NVIDIA H200, CUDA 13
# driver, PyTorch with its CUDA 13 libraries under its Python's site-packages).
#
# Usage: scripts/device-check.sh BINARY OUT_DIR
#   BINARY   ablate built here with `--features cuda` or `--features nccl` (optionally
#            compressed, *.gz or *.xz); an NCCL build needs libnccl.so.2, which PyTorch's CUDA 13
#            wheels bring (nvidia-nccl-cu13, found through LD_LIBRARY_PATH below). Build with
#            NCCL to check it too: eval "$(LINK=1 NCCL=1 scripts/cuda-toolchain.sh)" and
#            cargo build --release -p harness --features nccl
#   OUT_DIR  everything the check writes: logs, databases, reports, a summary
# Environment:
#   DEVICE=cuda:0         the device under test; DEVICE=cpu runs the same steps on the CPU (the
#                         bench then skips mar-base, and the quickstart is skipped)
#   SKIP_QUICKSTART=1     leave out the one-seed quickstart (f32, then bf16 unless
#                         WITH_BF16_QUICKSTART=0)
#   WITH_CPU=1            also time the quickstart on this machine's CPU
#   REF_BENCH, MAR_SRC    the reference bench script and the official MAR code (step 1a; skipped
#                         when absent); PYTHON the interpreter with torch (python3)
#   (BINARY built with `--features cuda,profile` also writes host-profile.*.txt in step 1c)
#   PACK=1                at the end, pack every output but summary.txt and the host profile into
#                         OUT_DIR/outputs.tar.gz (the device tool brings back a limited number of
#                         files: in session 6 a full run's profile and logs were left behind)
#   FUSED_TESTS           the models crate's unit-test binary built with `--features cuda`
#                         (`cargo test --release -p models --features cuda --no-run`; *.gz, *.xz too):
#                         step 0a runs its fused::cuda_tests, every fused kernel against the CPU
# Budget: measured on an H200 in session 5 (everything but the bf16 quickstart): 0a 12–19 s,
# selftest 14–17 s, the reference pairs 36 + 9 + 22 + 9 s, benches 24 + 21 s, tiny 1.5 s,
# quickstart 45–52 s: about 3.5 minutes plus the machine's start. Each step has a timeout; a step
# that runs out is logged with rc=124 and the script goes on.
set -uo pipefail
BIN_IN=${1:?usage: scripts/device-check.sh BINARY OUT_DIR}
OUT=${2:?usage: scripts/device-check.sh BINARY OUT_DIR}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# FILE as it was before gzip or xz (python's lzma: the image may lack the xz program)
unpack() { # FILE, DEST
  case "$1" in
    *.gz) gzip -dc "$1" > "$2" ;;
    *.xz) python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2" ;;
    *) cp "$1" "$2" ;;
  esac
}
BIN=/tmp/ablate-device
unpack "$BIN_IN" "$BIN"
chmod +x "$BIN"

# the CUDA libraries (cublas, cublasLt, curand, nvrtc, cudart) of the installed PyTorch, and the driver
LIBDIRS=$(python3 - <<'PY'
import glob, site
dirs = set()
for sp in site.getsitepackages():
    for lib in glob.glob(sp + "/nvidia/**/lib*.so*", recursive=True):
        dirs.add(lib.rsplit("/", 1)[0])
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${LIBDIRS}:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.txt" 2>&1
ldd "$BIN" > "$OUT/ldd.txt" 2>&1
if grep -q "not found" "$OUT/ldd.txt"; then say "missing libraries:"; grep "not found" "$OUT/ldd.txt" | tee -a "$SUMMARY"; fi
"$BIN" --version >> "$SUMMARY" 2>&1

timed() { # name, timeout, command...
  local name=$1 limit=$2; shift 2
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  rc=$?
  t1=$(date +%s.%N)
  say "$name: rc=$rc, $(awk "BEGIN{printf \"%.1f\", $t1-$t0}") s"
  grep -E "run\(s\)|failed|error" "$OUT/$name.err" | tail -5 | tee -a "$SUMMARY"
}

DEVICE=${DEVICE:-cuda:0}
TAG=${DEVICE%%:*} # cuda or cpu: the name of each step's log files
BIG=(--workload mar-base)
SELFTEST_LIMIT=60 BENCH_LIMIT=100 BF16_LIMIT=50
# on a CPU: no MAR-B, no quickstart, and room for ~6 s steps (mar-tiny, bf16 ~9 s)
if [ "$TAG" = cpu ]; then BIG=(); SKIP_QUICKSTART=1; BENCH_LIMIT=600 BF16_LIMIT=300; fi

# 0a. the fused ops' CUDA kernels (kernels.cu) against their CPU versions, forward and backward
if [ -n "${FUSED_TESTS:-}" ]; then
  FT=/tmp/models-tests
  unpack "$FUSED_TESTS" "$FT"
  chmod +x "$FT"
  timed fused-cuda-tests 60 "$FT" fused::cuda_tests --test-threads 1 --nocapture
  grep -E "^test |test result|panicked|differs" "$OUT/fused-cuda-tests.out" "$OUT/fused-cuda-tests.err" | tee -a "$SUMMARY"
fi
# 0. the device tests: every model on the device against the CPU (one JSON object per check)
timed "selftest-$TAG" "$SELFTEST_LIMIT" "$BIN" selftest --device "$DEVICE"
grep -c '"pass":true' "$OUT/selftest-$TAG.out" | sed 's/^/checks passed: /' | tee -a "$SUMMARY"
grep '"pass":false' "$OUT/selftest-$TAG.out" | tee -a "$SUMMARY"
# a binary built with `--features nccl` (see `--version`) adds NCCL at world size 1 (issue 16)
grep '"check":"nccl/' "$OUT/selftest-$TAG.out" | tee -a "$SUMMARY"
tail -1 "$OUT/selftest-$TAG.err" | tee -a "$SUMMARY"
# 1a. the reference PyTorch MAR beside ours, back to back, two runs each, and the ratios
# (issue 12's targets: mar-base under bf16 on CUDA, mar-tiny in f32 on the CPU). Needs the
# official code's models/ and diffusion/ in MAR_SRC and ../shared/bench/reference_mar.py (REF_BENCH).
REF_BENCH=${REF_BENCH:-../shared/bench/reference_mar.py}
MAR_SRC=${MAR_SRC:-target/reference-mar}
PYTHON=${PYTHON:-python3}
if [ -f "$REF_BENCH" ] && [ -d "$MAR_SRC/models" ]; then
  if [ "$TAG" = cpu ]; then REF_W=mar-tiny REF_P=f32 REF_LIMIT=120; else REF_W=mar-base REF_P=bf16 REF_LIMIT=50; fi
  for i in 1 2; do
    timed "ref-$TAG-$i" "$REF_LIMIT" env MAR_SRC="$MAR_SRC" "$PYTHON" "$REF_BENCH" "$TAG" --precision "$REF_P" "$REF_W"
    timed "ours-$TAG-$i" "$REF_LIMIT" "$BIN" bench --device "$DEVICE" --precision "$REF_P" --workload "$REF_W"
  done
  "$PYTHON" - "$OUT" "$TAG" <<'PY' | tee -a "$SUMMARY"
import json, sys
out, tag = sys.argv[1], sys.argv[2]
def last(name):
    try:
        lines = [l for l in open(f"{out}/{name}.out") if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
for i in (1, 2):
    ref, ours = last(f"ref-{tag}-{i}"), last(f"ours-{tag}-{i}")
    if not ref or not ours:
        print(f"pair {i}: missing output (see ref-{tag}-{i}.err / ours-{tag}-{i}.err)")
        continue
    print(f"pair {i} {ours['workload']} {ours['precision']}: train step ref {ref['train_step_s']:.4f} s, "
          f"ours {ours['train_step_s']:.4f} s, speed ratio {ref['train_step_s'] / ours['train_step_s']:.2f}x; "
          f"sampling ref {ref['sample_s']:.3f} s, ours {ours['sample_s']:.3f} s, "
          f"ratio {ref['sample_s'] / ours['sample_s']:.2f}x; mfu {ours.get('mfu')}")
PY
else
  say "reference bench skipped: no $REF_BENCH or no $MAR_SRC/models (carry them to compare)"
fi
# 1. throughput of the named workloads (one JSON object per line)
timed "bench-$TAG" "$BENCH_LIMIT" "$BIN" bench --device "$DEVICE" --phases --workload mar-tiny --workload mar-tiny-ce --workload ar-tiny --workload ar-tiny-ce "${BIG[@]}"
cat "$OUT/bench-$TAG.out" >> "$SUMMARY"
# 1b. the same in f32, for the f32/bf16 comparison (bf16 is the default on CUDA)
timed "bench-$TAG-f32" "$BF16_LIMIT" "$BIN" bench --device "$DEVICE" --phases --precision f32 --workload mar-tiny "${BIG[@]}"
cat "$OUT/bench-$TAG-f32.out" >> "$SUMMARY"
# 1c. where the host's time goes in a mar-base step (a build with `--features cuda,profile`; a
# build without the feature says so and this step fails), and 1d. the same bench with host-to-device
# copies straight from pageable memory, not through candle's page-locked staging ring (vendor/)
if [ "$TAG" = cuda ]; then
  timed "bench-$TAG-profile" "$BF16_LIMIT" "$BIN" bench --device "$DEVICE" --phases --profile "$OUT/host-profile.txt" "${BIG[@]}"
  cat "$OUT/bench-$TAG-profile.out" >> "$SUMMARY"
  timed "bench-$TAG-pageable" "$BF16_LIMIT" env CANDLE_CUDA_PAGEABLE_UPLOADS=1 "$BIN" bench --device "$DEVICE" --phases "${BIG[@]}"
  cat "$OUT/bench-$TAG-pageable.out" >> "$SUMMARY"
  # 1e. the device time of a mar-base backward pass by rule (CANDLE_BACKWARD_PROFILE=1, the
  # vendored candle synchronises around every node): session 6's table, to set each CUDA change
  # since (attention probabilities, heads, layer norm, the bf16 linear's backward) against it.
  # One table per backward pass; the summary keeps the by-rule part of the last one.
  timed "bench-$TAG-backward-profile" "$BF16_LIMIT" env CANDLE_BACKWARD_PROFILE=1 "$BIN" bench --device "$DEVICE" --steps 1 "${BIG[@]}"
  awk '/^backward profile by rule:/ {n++; buf=""} n {buf = buf $0 "\n"} /^backward profile by rule and shape/ {last=buf} END {printf "%s", last}' \
    "$OUT/bench-$TAG-backward-profile.err" | grep -v "by rule and shape" | tee -a "$SUMMARY"
fi
# 2. the tiny end-to-end spec on the device
timed "tiny-$TAG" 45 "$BIN" --root "$OUT/tiny-$TAG" run experiments/tiny.toml --device "$DEVICE"
# 2b. data-parallel rank processes on the device (issue 16): two `--nproc` processes sharing
# DEVICE against one rank, 20 steps of the tiny spec; the sum goes through the host over TCP,
# also in an NCCL build (NCCL refuses two ranks on one GPU: the selftest's nccl/ checks run its
# path at world size 1). Prints the largest relative difference of the logged losses.
DP=(run experiments/tiny.toml --no-report --set train.steps=20 --set train.log_every=1 --set head.batch_mul=2)
timed "dp-one-$TAG" 45 "$BIN" --root "$OUT/dp-one-$TAG" "${DP[@]}" --device "$DEVICE"
timed "dp-nproc2-$TAG" 60 "$BIN" --root "$OUT/dp-nproc2-$TAG" "${DP[@]}" --nproc 2 --set "train.devices=[\"$DEVICE\",\"$DEVICE\"]"
python3 - "$OUT/dp-one-$TAG/ablate.sqlite" "$OUT/dp-nproc2-$TAG/ablate.sqlite" <<'PY' | tee -a "$SUMMARY"
import sqlite3, sys
def losses(path):
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        q = ("select r.hash, m.step, m.value from metrics m join runs r on r.id = m.run_id "
             "where m.key = 'train/loss' and r.kind = 'generator'")
        return {(h, s): v for h, s, v in db.execute(q)}
    except sqlite3.Error as e:
        print(f"data-parallel check: {path}: {e}")
        return {}
one, two = losses(sys.argv[1]), losses(sys.argv[2])
if not one or one.keys() != two.keys():
    print(f"data-parallel check: FAILED, {len(one)} and {len(two)} loss points, not the same rows")
else:
    worst = max(abs(one[k] - two[k]) / max(abs(one[k]), 1.0) for k in one)
    print(f"data-parallel check: 2 rank processes vs 1 rank, {len(one)} loss points, "
          f"largest relative difference {worst:.2e} ({'ok' if worst <= 1e-4 else 'FAILED'})")
PY
# 3. the quickstart (one seed) on the device, then on this machine's CPU, for a side-by-side time
if [ "${SKIP_QUICKSTART:-0}" != 1 ]; then
timed quickstart-cuda 135 "$BIN" --root "$OUT/qs-cuda" run experiments/quickstart.toml --device "$DEVICE" --set 'seeds=[0]'
grep -E "^\[|train |done" "$OUT/quickstart-cuda.err" > "$OUT/quickstart-cuda.stages.txt"
# the same in bf16 (f32 master weights): end to end, before bf16 can become train.precision's
# default on CUDA (issue 12); FIDs beside the f32 ones
if [ "${WITH_BF16_QUICKSTART:-1}" = 1 ]; then
timed quickstart-cuda-bf16 135 "$BIN" --root "$OUT/qs-cuda-bf16" run experiments/quickstart.toml --device "$DEVICE" --set 'seeds=[0]' --set train.precision=bf16
grep -E "^\[|train |done" "$OUT/quickstart-cuda-bf16.err" > "$OUT/quickstart-cuda-bf16.stages.txt"
fi
fi
if [ "${WITH_CPU:-0}" = 1 ]; then
  timed quickstart-cpu 200 "$BIN" --root "$OUT/qs-cpu" run experiments/quickstart.toml --device cpu --set 'seeds=[0]'
  grep -E "^\[|train |done" "$OUT/quickstart-cpu.err" > "$OUT/quickstart-cpu.stages.txt"
fi
say "done"
if [ "${PACK:-0}" = 1 ]; then
  ( cd "$OUT" && find . -type f ! -name summary.txt ! -name 'host-profile*.txt' ! -name outputs.tar.gz -print0 \
      | tar --null -czf outputs.tar.gz --files-from - --remove-files ) && say "packed into outputs.tar.gz"
fi
