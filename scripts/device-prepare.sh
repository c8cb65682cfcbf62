#!/usr/bin/env bash
# Builds here everything scripts/device-check.sh needs on a GPU machine that has no Rust and no
# network, into one folder to carry there:
#   scripts/device-prepare.sh [DIR]        (default target/device)
# DIR then holds
#   ablate.xz            ablate built with `--features nccl` (CUDA and NCCL), stripped
#   models-tests.xz      the models crate's unit tests built with `--features cuda` (step 0a)
#   reference_mar.py     ../shared/bench/reference_mar.py, when it is there (step 1a)
#   reference-mar/       the official MAR code's models/ and diffusion/, from MAR_SRC (step 1a)
# and the command to run there is printed at the end. MAR_SRC is a folder with the official code
# (e.g. `git archive HEAD models diffusion | tar -x -C DIR` of a fetched LTH14/mar); without it,
# the reference bench is left out. CARGO_TARGET_DIR is honoured (a CUDA build takes 10–20 min
# cold; a separate target folder keeps the CPU build's files as they are).
# A device call takes 64 MiB in all: the checkout's tracked files (about 75 MB, 70 of them test
# fixtures) and DIR (about 23 MB). So run `scripts/device-tree.sh slim` before the device calls
# and `scripts/device-tree.sh restore` after them.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-target/device}
mkdir -p "$DIR"
eval "$(LINK=1 NCCL=1 scripts/cuda-toolchain.sh "$PWD/target/cuda-venv")"
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release -p harness --features nccl
# stripped and xz-compressed: 127 MB → 16 MB (gzip: 31 MB)
pack() { strip -o "$2.tmp" "$1" && xz -T0 -6 -c "$2.tmp" > "$2" && rm "$2.tmp"; }
rm -f "$DIR/ablate.gz" "$DIR/models-tests.gz"
pack "$TARGET/release/ablate" "$DIR/ablate.xz"

# the test binary's path is the one cargo reports for the models crate's unit tests
TESTS=$(cargo test --release -p models --features cuda --lib --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "models":
        print(m["executable"])')
pack "$TESTS" "$DIR/models-tests.xz"

REF=
if [ -f ../shared/bench/reference_mar.py ] && [ -d "${MAR_SRC:-/nonexistent}/models" ]; then
  cp ../shared/bench/reference_mar.py "$DIR/"
  rm -rf "$DIR/reference-mar" && mkdir -p "$DIR/reference-mar"
  cp -r "$MAR_SRC/models" "$MAR_SRC/diffusion" "$DIR/reference-mar/"
  REF="REF_BENCH=$DIR/reference_mar.py MAR_SRC=$DIR/reference-mar "
else
  echo "reference bench left out: set MAR_SRC to the official MAR code (models/, diffusion/)" >&2
fi
du -sh "$DIR" >&2
cat <<EOF
carry: ["$DIR"]   (the folder must be ignored by git: target/ is)
command: ${REF}FUSED_TESTS=$DIR/models-tests.xz PACK=1 scripts/device-check.sh $DIR/ablate.xz \$OUT/check
before the device calls: scripts/device-tree.sh slim; after them: scripts/device-tree.sh restore
EOF
