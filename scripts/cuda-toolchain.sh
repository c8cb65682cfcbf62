#!/usr/bin/env bash
# Installs a CUDA 13.0 compiler (nvcc, nvvm, headers) from PyPI into a virtual environment and
# prints the environment to build ablate with `--features cuda`:
#   eval "$(scripts/cuda-toolchain.sh [VENV_DIR])"
#   cargo build --release -p harness --features cuda
# 13.0 because the lent GPUs run driver 580 (CUDA 13.0): PTX from a newer nvcc does not load there.
# Linking also needs the CUDA libraries; LINK=1 installs cublas/curand/nvrtc/runtime wheels and
# a stub libcuda.so (the real one comes with the driver at run time). NCCL=1 (with LINK=1) adds
# NCCL's wheel, for `--features nccl`; at run time libnccl.so.2 must be found too (PyTorch's
# CUDA 13 wheels bring it: scripts/device-check.sh adds their folders to LD_LIBRARY_PATH).
set -euo pipefail
VENV=${1:-${CUDA_VENV:-$HOME/.cache/ablate-cuda-venv}}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/pip" ]; then
  "$PY" -m venv "$VENV" >&2
fi
PKGS=("nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-runtime==13.0.*")
if [ "${LINK:-0}" = 1 ]; then
  PKGS+=("nvidia-cublas==13.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-curand==10.4.*")
  if [ "${NCCL:-0}" = 1 ]; then PKGS+=("nvidia-nccl-cu13"); fi
fi
for attempt in 1 2 3; do
  if "$VENV/bin/pip" install -q --disable-pip-version-check "${PKGS[@]}" >&2; then break; fi
  [ "$attempt" = 3 ] && { echo "pip install of the CUDA toolchain failed" >&2; exit 1; }
  sleep 10
done
CU=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
LINKDIR="$VENV/link"
if [ "${LINK:-0}" = 1 ]; then
  mkdir -p "$LINKDIR"
  for l in cublas cublasLt cudart nvrtc; do ln -sf "$CU/lib/lib$l.so.13" "$LINKDIR/lib$l.so"; done
  ln -sf "$CU/lib/libcurand.so.10" "$LINKDIR/libcurand.so"
  if [ "${NCCL:-0}" = 1 ]; then
    NCCL_LIB=$("$VENV/bin/python" -c 'import nvidia, os, glob; print(glob.glob(os.path.join(list(nvidia.__path__)[0], "nccl", "lib", "libnccl.so.2"))[0])')
    ln -sf "$NCCL_LIB" "$LINKDIR/libnccl.so"
  fi
  # stub driver library: every cu* symbol cudarc declares, soname libcuda.so.1
  SYS=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path "*cudarc-*/src/driver/sys/mod.rs" | head -1)
  if [ -n "$SYS" ]; then
    grep -oE "fn cu[A-Za-z0-9_]+\s*\(" "$SYS" | sed -E 's/fn //; s/\s*\(//' | sort -u | awk '{print "void "$1"(void) {}"}' > "$LINKDIR/cuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINKDIR/libcuda.so" "$LINKDIR/cuda_stub.c" >&2
  else
    echo "cudarc sources not fetched yet: run 'cargo fetch' first" >&2
    exit 1
  fi
fi
echo "export PATH=\"$CU/bin:\$PATH\""
echo "export CUDA_ROOT=\"$CU\" CUDA_PATH=\"$CU\" CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
echo "export LIBRARY_PATH=\"$LINKDIR:\${LIBRARY_PATH:-}\""
