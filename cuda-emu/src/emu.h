// CUDA C++ as kernels.cu uses it, on the CPU (cuda-emu); emu.cpp includes it before kernels.cu.
//
// A launch runs the grid's blocks one after another and each block's threads as OS threads, so
// that __syncthreads is a barrier of the block's threads and a warp shuffle a barrier of the
// warp's 32 threads around an exchange of values. __shared__ variables become statics: one copy
// per declaration, as on the GPU, which is per block because one block runs at a time (launches
// are serialised).
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
};

// the built-in variables of the thread running a kernel
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace emu {
void syncthreads();
float shfl_xor(float v, int lane_mask);
}  // namespace emu

inline void __syncthreads() { emu::syncthreads(); }
// every lane of the warp takes part (kernels.cu passes the full mask)
inline float __shfl_xor_sync(unsigned int, float v, int lane_mask) {
  return emu::shfl_xor(v, lane_mask);
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// CUDA's integer min/max overloads
template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
