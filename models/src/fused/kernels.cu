// CUDA kernels of the fused ops in models/src/fused (f32 only), compiled to PTX by models/build.rs
// when the `cuda` feature is on and loaded as the custom module "ablate_fused".
//
// Every input is a "row view" (`Rows` in mod.rs): `rows` rows of `cols` dense values, row r
// starting at `r * stride` (the Rust side passes the slice already advanced to the view's offset,
// and a stride per input; a stride of 0 repeats one row). Outputs are fresh and contiguous
// (`rows * cols`, row r at `r * cols`); backward kernels with two results write them one after the
// other into one buffer (the second at `rows * cols`); the affine layer norm's backward writes
// [dx; dweight; dbias] into one buffer of rows·cols + 2·cols values.
//
// Column sums over rows (layer norm's dweight/dbias, bias_add's dbias) take two kernels and no
// atomics, so that they come out the same on every run: `*_partial` kernels sum blocks of rows into
// a (chunks, m) buffer, one row per chunk of rows, and `col_sum_finalize` adds those chunk rows up.
#include <stddef.h>
#include <cuda_bf16.h>

#define WARP 32
// Row-wise kernels (layer norm, softmax) take `rows` rows. Rows of at most WARP_ROW_COLS values
// run one warp per row, the block's warps on consecutive rows: a row's sums are then warp
// shuffles, with no __syncthreads. Wider rows run one block per row, with at most
// MAX_ROW_THREADS threads (a multiple of 32). geometry.rs launches them so (`row_cfg`).
#define WARP_ROW_COLS 1024
#define MAX_ROW_THREADS 1024
// column-sum tiles: 32 columns × COL_SUM_ROWS_PER_STEP rows of threads
#define COL_SUM_ROWS_PER_STEP 8

// ---------------------------------------------------------------------------------------------
// helpers

// The two reductions of the row kernels: an operation and its identity.
struct Sum {
  __device__ static float op(float a, float b) { return a + b; }
  __device__ static float identity() { return 0.0f; }
};
struct Max {
  __device__ static float op(float a, float b) { return fmaxf(a, b); }
  __device__ static float identity() { return -INFINITY; }
};

// Op over the warp's 32 values, returned to every lane (butterfly of shuffles).
template <class Op>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o /= 2) v = Op::op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Op over the block, returned to every thread (blockDim.x a multiple of 32): each warp's
// result, then the warps' results.
template <class Op>
__device__ float block_reduce(float v) {
  __shared__ float part[MAX_ROW_THREADS / WARP];
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  const int warps = blockDim.x / WARP;
  v = warp_reduce<Op>(v);
  __syncthreads();  // `part` may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < warps ? part[lane] : Op::identity();
  return warp_reduce<Op>(v);
}

// Column sums run in tiles of 32 columns × COL_SUM_ROWS_PER_STEP rows of threads, each thread
// summing every COL_SUM_ROWS_PER_STEP-th row of its column: this adds up the tile's rows, in a
// fixed order, and returns the column's total to the threads of row 0 (0 to the others). Every
// thread of the block calls it.
__device__ float tile_column_sum(float v) {
  __shared__ float acc[COL_SUM_ROWS_PER_STEP][WARP];
  __syncthreads();  // `acc` may still be read by a previous call
  acc[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  float t = 0.0f;
  if (threadIdx.y == 0) {
#pragma unroll
    for (int k = 0; k < COL_SUM_ROWS_PER_STEP; ++k) t += acc[k][threadIdx.x];
  }
  return t;
}

// The threads of one row, as the row-wise kernels see them: `index` is the row (possibly ≥ rows,
// for a warp past the last row: it returns), the row's j-th value is taken by thread `lane`,
// `lane + size`, …, and `sum`/`max` reduce over the row's threads, returning to every one.
struct WarpRow {
  __device__ static size_t index() {
    return blockIdx.x * (size_t)(blockDim.x / WARP) + threadIdx.x / WARP;
  }
  __device__ static unsigned lane() { return threadIdx.x % WARP; }
  __device__ static unsigned size() { return WARP; }
  __device__ static float sum(float v) { return warp_reduce<Sum>(v); }
  __device__ static float max(float v) { return warp_reduce<Max>(v); }
};

struct BlockRow {
  __device__ static size_t index() { return blockIdx.x; }
  __device__ static unsigned lane() { return threadIdx.x; }
  __device__ static unsigned size() { return blockDim.x; }
  __device__ static float sum(float v) { return block_reduce<Sum>(v); }
  __device__ static float max(float v) { return block_reduce<Max>(v); }
};

// Runs the row function F<WarpRow> or F<BlockRow> by the row's width (the same rule as
// geometry.rs's row_cfg); a warp past the last row returns at once (no barrier follows in warp
// mode, and in block mode every block has a row).
#define ROW_KERNEL(F, rows, cols, ...)            \
  do {                                            \
    if ((cols) <= WARP_ROW_COLS) {                \
      if (WarpRow::index() < (rows)) F<WarpRow>(__VA_ARGS__); \
    } else {                                      \
      F<BlockRow>(__VA_ARGS__);                   \
    }                                             \
  } while (0)

// Element-wise kernels walk all rows × cols values with a grid-stride loop; (r, j) of element i.
#define FOR_EACH_ELEMENT(rows, cols)                                                   \
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, n_ = (rows) * (cols); \
       i < n_; i += (size_t)gridDim.x * blockDim.x)
#define ROW(i, cols) ((i) / (cols))
#define COL(i, cols) ((i) % (cols))

// ---------------------------------------------------------------------------------------------
// GELU (erf form)

// y = ½x(1 + erf(x/√2))
extern "C" __global__ void fused_gelu_fwd(size_t rows, size_t cols, const float* x, size_t xs,
                                          float* y) {
  FOR_EACH_ELEMENT(rows, cols) {
    const float v = x[ROW(i, cols) * xs + COL(i, cols)];
    y[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
  }
}

// dx = dy · (Φ(x) + x·φ(x)),  Φ(x) = ½(1 + erf(x/√2)),  φ(x) = e^(−x²/2)/√(2π)
extern "C" __global__ void fused_gelu_bwd(size_t rows, size_t cols, const float* x, size_t xs,
                                          const float* dy, size_t dys, float* dx) {
  FOR_EACH_ELEMENT(rows, cols) {
    const size_t r = ROW(i, cols), j = COL(i, cols);
    const float v = x[r * xs + j];
    const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
    dx[i] = dy[r * dys + j] * (cdf + v * pdf);
  }
}

// ---------------------------------------------------------------------------------------------
// SiLU

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// y = x·σ(x)
extern "C" __global__ void fused_silu_fwd(size_t rows, size_t cols, const float* x, size_t xs,
                                          float* y) {
  FOR_EACH_ELEMENT(rows, cols) {
    const float v = x[ROW(i, cols) * xs + COL(i, cols)];
    y[i] = v * sigmoid(v);
  }
}

// dx = dy · σ(x)·(1 + x·(1 − σ(x)))
extern "C" __global__ void fused_silu_bwd(size_t rows, size_t cols, const float* x, size_t xs,
                                          const float* dy, size_t dys, float* dx) {
  FOR_EACH_ELEMENT(rows, cols) {
    const size_t r = ROW(i, cols), j = COL(i, cols);
    const float v = x[r * xs + j];
    const float s = sigmoid(v);
    dx[i] = dy[r * dys + j] * s * (1.0f + v * (1.0f - s));
  }
}

// ---------------------------------------------------------------------------------------------
// adaLN modulation

// y = x·(1 + scale) + shift
extern "C" __global__ void fused_modulate_fwd(size_t rows, size_t cols, const float* x, size_t xs,
                                              const float* shift, size_t shs, const float* scale,
                                              size_t scs, float* y) {
  FOR_EACH_ELEMENT(rows, cols) {
    const size_t r = ROW(i, cols), j = COL(i, cols);
    y[i] = x[r * xs + j] * (1.0f + scale[r * scs + j]) + shift[r * shs + j];
  }
}

// out = [dx = dy·(1 + scale); dscale = dy·x]   (dshift = dy needs no kernel)
extern "C" __global__ void fused_modulate_bwd(size_t rows, size_t cols, const float* x, size_t xs,
                                              const float* scale, size_t scs, const float* dy,
                                              size_t dys, float* out) {
  const size_t n = rows * cols;
  FOR_EACH_ELEMENT(rows, cols) {
    const size_t r = ROW(i, cols), j = COL(i, cols);
    const float g = dy[r * dys + j];
    out[i] = g * (1.0f + scale[r * scs + j]);
    out[n + i] = g * x[r * xs + j];
  }
}

// ---------------------------------------------------------------------------------------------
// gated residual

// y = x + h·gate
extern "C" __global__ void fused_gated_residual_fwd(size_t rows, size_t cols, const float* x,
                                                    size_t xs, const float* h, size_t hs,
                                                    const float* gate, size_t gs, float* y) {
  FOR_EACH_ELEMENT(rows, cols) {
    const size_t r = ROW(i, cols), j = COL(i, cols);
    y[i] = x[r * xs + j] + h[r * hs + j] * gate[r * gs + j];
  }
}

// out = [dh = dy·gate; dgate = dy·h]   (dx = dy needs no kernel)
extern "C" __global__ void fused_gated_residual_bwd(size_t rows, size_t cols, const float* h,
                                                    size_t hs, const float* gate, size_t gs,
                                                    const float* dy, size_t dys, float* out) {
  const size_t n = rows * cols;
  FOR_EACH_ELEMENT(rows, cols) {
    const size_t r = ROW(i, cols), j = COL(i, cols);
    const float g = dy[r * dys + j];
    out[i] = g * gate[r * gs + j];
    out[n + i] = g * h[r * hs + j];
  }
}

// ---------------------------------------------------------------------------------------------
// bias add

// y = x + b (b one row broadcast over the rows: the Rust side passes its stride bs = 0)
extern "C" __global__ void fused_bias_add_fwd(size_t rows, size_t cols, const float* x, size_t xs,
                                              const float* b, size_t bs, float* y) {
  FOR_EACH_ELEMENT(rows, cols) {
    const size_t r = ROW(i, cols), j = COL(i, cols);
    y[i] = x[r * xs + j] + b[r * bs + j];
  }
}

// partial[chunk, j] = Σ_{rows r of this chunk} dy[r, j]   (db = Σ_rows dy, first stage)
// grid (⌈cols/32⌉, chunks), block (32, COL_SUM_ROWS_PER_STEP); chunk k holds rows
// [k·rows_per_chunk, (k+1)·rows_per_chunk).
extern "C" __global__ void fused_bias_add_bwd_partial(size_t rows, size_t cols, const float* dy,
                                                      size_t dys, size_t rows_per_chunk,
                                                      float* partial) {
  const size_t j = blockIdx.x * (size_t)WARP + threadIdx.x;
  const size_t r0 = blockIdx.y * rows_per_chunk;
  const size_t r1 = min(rows, r0 + rows_per_chunk);
  float s = 0.0f;
  if (j < cols)
    for (size_t r = r0 + threadIdx.y; r < r1; r += COL_SUM_ROWS_PER_STEP) s += dy[r * dys + j];
  const float t = tile_column_sum(s);
  if (threadIdx.y == 0 && j < cols) partial[blockIdx.y * cols + j] = t;
}

// out[j] = Σ_k partial[k, j] over `chunks` rows of m columns (second stage of every column sum)
extern "C" __global__ void col_sum_finalize(size_t chunks, size_t m, const float* partial,
                                            float* out) {
  for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < m;
       j += (size_t)gridDim.x * blockDim.x) {
    float t = 0.0f;
    for (size_t k = 0; k < chunks; ++k) t += partial[k * m + j];
    out[j] = t;
  }
}

// ---------------------------------------------------------------------------------------------
// layer norm: a warp or a block per row (ROW_KERNEL)

// (μ, r = 1/√(σ² + ε)) of one row, two passes as on the CPU; every thread of the row gets them.
template <class R>
__device__ void row_moments(const float* row, size_t cols, float eps, float* mean, float* rstd) {
  float s = 0.0f;
  for (size_t j = R::lane(); j < cols; j += R::size()) s += row[j];
  const float m = R::sum(s) / (float)cols;
  float q = 0.0f;
  for (size_t j = R::lane(); j < cols; j += R::size()) {
    const float d = row[j] - m;
    q += d * d;
  }
  const float var = R::sum(q) / (float)cols;
  *mean = m;
  *rstd = rsqrtf(var + eps);
}

template <class R, bool AFFINE>
__device__ void layer_norm_fwd(size_t cols, const float* x, size_t xs, const float* w,
                               const float* b, float eps, float* y) {
  const size_t r = R::index();
  const float* row = x + r * xs;
  float* out = y + r * cols;
  float mean, rstd;
  row_moments<R>(row, cols, eps, &mean, &rstd);
  for (size_t j = R::lane(); j < cols; j += R::size()) {
    const float v = (row[j] - mean) * rstd;
    out[j] = AFFINE ? v * w[j] + b[j] : v;
  }
}
template <class R>
__device__ void layer_norm_plain_fwd(size_t cols, const float* x, size_t xs, float eps, float* y) {
  layer_norm_fwd<R, false>(cols, x, xs, nullptr, nullptr, eps, y);
}
template <class R>
__device__ void layer_norm_affine_fwd(size_t cols, const float* x, size_t xs, const float* w,
                                      const float* b, float eps, float* y) {
  layer_norm_fwd<R, true>(cols, x, xs, w, b, eps, y);
}

// y = (x − μ)·r
extern "C" __global__ void fused_layer_norm_fwd(size_t rows, size_t cols, const float* x,
                                                size_t xs, float eps, float* y) {
  ROW_KERNEL(layer_norm_plain_fwd, rows, cols, cols, x, xs, eps, y);
}

// y = (x − μ)·r·w + b
extern "C" __global__ void fused_layer_norm_affine_fwd(size_t rows, size_t cols, const float* x,
                                                       size_t xs, const float* w, const float* b,
                                                       float eps, float* y) {
  ROW_KERNEL(layer_norm_affine_fwd, rows, cols, cols, x, xs, w, b, eps, y);
}

// dx = r·(g − mean(g) − x̂·mean(g·x̂)), x̂ = (x − μ)·r, g = dy·w (or dy); with the affine, also
// stores (μ, r) per row in `stats` for the dweight kernel.
template <class R, bool AFFINE>
__device__ void layer_norm_bwd(size_t cols, const float* x, size_t xs, const float* w,
                               const float* dy, size_t dys, float eps, float* dx, float* stats) {
  const size_t r = R::index();
  const float* row = x + r * xs;
  const float* drow = dy + r * dys;
  float mean, rstd;
  row_moments<R>(row, cols, eps, &mean, &rstd);
  float sg = 0.0f, sgx = 0.0f;
  for (size_t j = R::lane(); j < cols; j += R::size()) {
    const float g = AFFINE ? drow[j] * w[j] : drow[j];
    sg += g;
    sgx += g * (row[j] - mean) * rstd;
  }
  const float mg = R::sum(sg) / (float)cols;
  const float mgx = R::sum(sgx) / (float)cols;
  float* out = dx + r * cols;
  for (size_t j = R::lane(); j < cols; j += R::size()) {
    const float g = AFFINE ? drow[j] * w[j] : drow[j];
    const float xhat = (row[j] - mean) * rstd;
    out[j] = rstd * (g - mg - xhat * mgx);
  }
  if (AFFINE && R::lane() == 0) {
    stats[2 * r] = mean;
    stats[2 * r + 1] = rstd;
  }
}
template <class R>
__device__ void layer_norm_plain_bwd(size_t cols, const float* x, size_t xs, const float* dy,
                                     size_t dys, float eps, float* dx) {
  layer_norm_bwd<R, false>(cols, x, xs, nullptr, dy, dys, eps, dx, nullptr);
}
template <class R>
__device__ void layer_norm_affine_bwd(size_t cols, const float* x, size_t xs, const float* w,
                                      const float* dy, size_t dys, float eps, float* dx,
                                      float* stats) {
  layer_norm_bwd<R, true>(cols, x, xs, w, dy, dys, eps, dx, stats);
}

// dx of y = (x − μ)·r, g = dy
extern "C" __global__ void fused_layer_norm_bwd(size_t rows, size_t cols, const float* x,
                                                size_t xs, const float* dy, size_t dys,
                                                float eps, float* dx) {
  ROW_KERNEL(layer_norm_plain_bwd, rows, cols, cols, x, xs, dy, dys, eps, dx);
}

// dx of y = (x − μ)·r·w + b, g = dy·w, and (μ, r) per row into `stats`
extern "C" __global__ void fused_layer_norm_affine_bwd(size_t rows, size_t cols, const float* x,
                                                       size_t xs, const float* w,
                                                       const float* dy, size_t dys, float eps,
                                                       float* dx, float* stats) {
  ROW_KERNEL(layer_norm_affine_bwd, rows, cols, cols, x, xs, w, dy, dys, eps, dx, stats);
}

// partial[chunk, j] = Σ dy·x̂ and partial[chunk, cols + j] = Σ dy over the rows of this chunk
// (dw = Σ_rows dy·x̂, db = Σ_rows dy, first stage); x̂ from the (μ, r) of `stats`.
// grid (⌈cols/32⌉, chunks), block (32, COL_SUM_ROWS_PER_STEP), as fused_bias_add_bwd_partial.
extern "C" __global__ void fused_layer_norm_dwdb_partial(size_t rows, size_t cols,
                                                         const float* x, size_t xs,
                                                         const float* dy, size_t dys,
                                                         const float* stats,
                                                         size_t rows_per_chunk, float* partial) {
  const size_t j = blockIdx.x * (size_t)WARP + threadIdx.x;
  const size_t r0 = blockIdx.y * rows_per_chunk;
  const size_t r1 = min(rows, r0 + rows_per_chunk);
  float sw = 0.0f, sb = 0.0f;
  if (j < cols)
    for (size_t r = r0 + threadIdx.y; r < r1; r += COL_SUM_ROWS_PER_STEP) {
      const float g = dy[r * dys + j];
      const float xhat = (x[r * xs + j] - stats[2 * r]) * stats[2 * r + 1];
      sw += g * xhat;
      sb += g;
    }
  const float tw = tile_column_sum(sw);
  const float tb = tile_column_sum(sb);
  if (threadIdx.y == 0 && j < cols) {
    partial[blockIdx.y * 2 * cols + j] = tw;
    partial[blockIdx.y * 2 * cols + cols + j] = tb;
  }
}

// ---------------------------------------------------------------------------------------------
// the optimizer

// One AdamW update (adamw.rs), over n contiguous values: out = [θ'; m'; v'] from θ, the stacked
// moments [m; v] and the gradient g times grad_scale (clipping). The order of operations is
// adamw_plain's.
extern "C" __global__ void fused_adamw(size_t n, const float* theta, const float* moments,
                                       const float* g, float beta1, float beta2, float inv_bc1,
                                       float inv_bc2, float eps, float lr, float decay,
                                       float grad_scale, float* out) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float gi = g[i] * grad_scale;
    const float m1 = moments[i] * beta1 + gi * (1.0f - beta1);
    const float v1 = moments[n + i] * beta2 + (gi * gi) * (1.0f - beta2);
    const float u = (m1 * inv_bc1) / (sqrtf(v1 * inv_bc2) + eps);
    out[i] = theta[i] * decay - u * lr;
    out[n + i] = m1;
    out[2 * n + i] = v1;
  }
}

// ---------------------------------------------------------------------------------------------
// the gradient norm (squares.rs): Σ x² over all the gradients in one launch

// partial[k] = Σ x² (in f64) over piece k of `pieces`: table[2k] is the address of its first f32
// and table[2k + 1] its length. A block per piece (grid-stride over pieces), blockDim.x a power of
// two; the host adds the partials in order, so every run gives the same sum.
extern "C" __global__ void sum_squares_pieces(size_t pieces, const unsigned long long* table,
                                              double* partial) {
  __shared__ double acc[MAX_ROW_THREADS];
  for (size_t k = blockIdx.x; k < pieces; k += gridDim.x) {
    const float* x = (const float*)table[2 * k];
    const size_t n = (size_t)table[2 * k + 1];
    double s = 0.0;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
      const double v = x[i];
      s += v * v;
    }
    acc[threadIdx.x] = s;
    __syncthreads();
    for (unsigned h = blockDim.x / 2; h > 0; h /= 2) {
      if (threadIdx.x < h) acc[threadIdx.x] += acc[threadIdx.x + h];
      __syncthreads();
    }
    if (threadIdx.x == 0) partial[k] = acc[0];
    __syncthreads();  // acc is rewritten for the next piece
  }
}

// ---------------------------------------------------------------------------------------------
// noise (noise.rs): values 2j and 2j+1 from SplitMix64 of key + (j+1)·γ, Box–Muller

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

extern "C" __global__ void gaussian_noise(size_t n, unsigned long long key, float* out) {
  const size_t pairs = (n + 1) / 2;
  for (size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x; j < pairs;
       j += (size_t)blockDim.x * gridDim.x) {
    const unsigned long long bits = mix64(key + (j + 1) * 0x9E3779B97F4A7C15ull);
    const float scale = 1.0f / 16777216.0f;
    const float u1 = 1.0f - (float)(unsigned int)(bits >> 40) * scale;
    const float u2 = (float)(((unsigned int)(bits >> 8)) >> 8) * scale;
    const float r = sqrtf(-2.0f * logf(u1));
    float s, c;
    sincosf(6.28318530717958647692f * u2, &s, &c);
    out[2 * j] = r * c;
    if (2 * j + 1 < n) out[2 * j + 1] = r * s;
  }
}

// ---------------------------------------------------------------------------------------------
// dropout (dropout.rs): value i kept when the top 24 bits of SplitMix64(key + (i+1)·γ) are at
// least `threshold`, kept values scaled; the backward pass is the same kernel on dy

// The 24-bit uniform integer of counter i (the top bits of SplitMix64 of key + (i+1)·γ), as
// noise.rs's uniform24: what dropout masks compare with their threshold.
__device__ __forceinline__ unsigned int uniform24(unsigned long long key, size_t i) {
  return (unsigned int)(mix64(key + (i + 1) * 0x9E3779B97F4A7C15ull) >> 40);
}

extern "C" __global__ void fused_dropout(size_t n, unsigned long long key, unsigned int threshold,
                                         float scale, const float* x, float* y) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    y[i] = uniform24(key, i) >= threshold ? x[i] * scale : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// attention probabilities (attention.rs), a warp or a block per row (ROW_KERNEL): the softmax of
// the scaled scores over the visible keys, dropout, and the dtype of the next product, in one
// pass; the backward recomputes p from the scores instead of keeping it.

// The visible keys of query row r: with `causal`, query r sees keys j ≤ r mod queries + keys −
// queries.
__device__ __forceinline__ size_t visible_keys(size_t r, size_t cols, int causal, size_t queries) {
  return causal ? min(r % queries + 1 + cols - queries, cols) : cols;
}

// (m, 1/Σ) of the row's softmax: p_j = exp(s_j·scale − m)·inv for its visible keys, 0 after.
template <class R>
__device__ void softmax_stats(const float* row, size_t visible, float scale, float* m,
                              float* inv) {
  float mx = -INFINITY;
  for (size_t j = R::lane(); j < visible; j += R::size()) mx = fmaxf(mx, row[j] * scale);
  mx = R::max(mx);
  float t = 0.0f;
  for (size_t j = R::lane(); j < visible; j += R::size()) t += expf(row[j] * scale - mx);
  *m = mx;
  *inv = 1.0f / R::sum(t);
}

// Dropout's factor of value i: keep_scale when the top 24 bits of SplitMix64(key + (i+1)·γ) are
// at least `threshold` (as fused_dropout), else 0; threshold 0 and keep_scale 1 keep everything.
__device__ __forceinline__ float keep_factor(unsigned long long key, size_t i,
                                             unsigned int threshold, float keep_scale) {
  return uniform24(key, i) >= threshold ? keep_scale : 0.0f;
}

__device__ __forceinline__ void store(float* o, float v) { *o = v; }
__device__ __forceinline__ void store(__nv_bfloat16* o, float v) { *o = __float2bfloat16_rn(v); }
__device__ __forceinline__ float load(const float* x) { return *x; }
__device__ __forceinline__ float load(const __nv_bfloat16* x) { return __bfloat162float(*x); }

// out = dropout(softmax(s·scale + mask)), in T (f32, or bf16 for a bf16 product)
template <class R, class T>
__device__ void attention_probs_fwd(size_t cols, const float* s, size_t ss, float scale,
                                    int causal, size_t queries, unsigned long long key,
                                    unsigned int threshold, float keep_scale, T* out) {
  const size_t r = R::index();
  const float* row = s + r * ss;
  const size_t visible = visible_keys(r, cols, causal, queries);
  float m, inv;
  softmax_stats<R>(row, visible, scale, &m, &inv);
  for (size_t j = R::lane(); j < cols; j += R::size()) {
    const float p = j < visible ? expf(row[j] * scale - m) * inv : 0.0f;
    store(out + r * cols + j, p * keep_factor(key, r * cols + j, threshold, keep_scale));
  }
}

// ds = scale · p·(dp − Σ_j p·dp), with p recomputed from s and dp = dout·keep factor
template <class R, class T>
__device__ void attention_probs_bwd(size_t cols, const float* s, size_t ss, float scale,
                                    int causal, size_t queries, unsigned long long key,
                                    unsigned int threshold, float keep_scale, const T* dout,
                                    size_t dos, float* ds) {
  const size_t r = R::index();
  const float* row = s + r * ss;
  const T* drow = dout + r * dos;
  const size_t visible = visible_keys(r, cols, causal, queries);
  float m, inv;
  softmax_stats<R>(row, visible, scale, &m, &inv);
  float t = 0.0f;
  for (size_t j = R::lane(); j < visible; j += R::size()) {
    const float p = expf(row[j] * scale - m) * inv;
    t += p * (load(drow + j) * keep_factor(key, r * cols + j, threshold, keep_scale));
  }
  const float inner = R::sum(t);
  float* out = ds + r * cols;
  for (size_t j = R::lane(); j < cols; j += R::size()) {
    if (j < visible) {
      const float p = expf(row[j] * scale - m) * inv;
      const float dp = load(drow + j) * keep_factor(key, r * cols + j, threshold, keep_scale);
      out[j] = scale * p * (dp - inner);
    } else {
      out[j] = 0.0f;
    }
  }
}

template <class R>
__device__ void attention_probs_fwd_f32_row(size_t cols, const float* s, size_t ss, float scale,
                                            int causal, size_t queries, unsigned long long key,
                                            unsigned int threshold, float keep_scale, float* out) {
  attention_probs_fwd<R, float>(cols, s, ss, scale, causal, queries, key, threshold, keep_scale,
                                out);
}
template <class R>
__device__ void attention_probs_fwd_bf16_row(size_t cols, const float* s, size_t ss, float scale,
                                             int causal, size_t queries, unsigned long long key,
                                             unsigned int threshold, float keep_scale,
                                             __nv_bfloat16* out) {
  attention_probs_fwd<R, __nv_bfloat16>(cols, s, ss, scale, causal, queries, key, threshold,
                                        keep_scale, out);
}
template <class R>
__device__ void attention_probs_bwd_f32_row(size_t cols, const float* s, size_t ss, float scale,
                                            int causal, size_t queries, unsigned long long key,
                                            unsigned int threshold, float keep_scale,
                                            const float* dout, size_t dos, float* ds) {
  attention_probs_bwd<R, float>(cols, s, ss, scale, causal, queries, key, threshold, keep_scale,
                                dout, dos, ds);
}
template <class R>
__device__ void attention_probs_bwd_bf16_row(size_t cols, const float* s, size_t ss, float scale,
                                             int causal, size_t queries, unsigned long long key,
                                             unsigned int threshold, float keep_scale,
                                             const __nv_bfloat16* dout, size_t dos, float* ds) {
  attention_probs_bwd<R, __nv_bfloat16>(cols, s, ss, scale, causal, queries, key, threshold,
                                        keep_scale, dout, dos, ds);
}

extern "C" __global__ void fused_attention_probs_fwd_f32(size_t rows, size_t cols, const float* s,
                                                         size_t ss, float scale, int causal,
                                                         size_t queries, unsigned long long key,
                                                         unsigned int threshold,
                                                         float keep_scale, float* out) {
  ROW_KERNEL(attention_probs_fwd_f32_row, rows, cols, cols, s, ss, scale, causal, queries, key,
             threshold, keep_scale, out);
}

extern "C" __global__ void fused_attention_probs_fwd_bf16(size_t rows, size_t cols,
                                                          const float* s, size_t ss, float scale,
                                                          int causal, size_t queries,
                                                          unsigned long long key,
                                                          unsigned int threshold,
                                                          float keep_scale, __nv_bfloat16* out) {
  ROW_KERNEL(attention_probs_fwd_bf16_row, rows, cols, cols, s, ss, scale, causal, queries, key,
             threshold, keep_scale, out);
}

extern "C" __global__ void fused_attention_probs_bwd_f32(size_t rows, size_t cols, const float* s,
                                                         size_t ss, float scale, int causal,
                                                         size_t queries, unsigned long long key,
                                                         unsigned int threshold,
                                                         float keep_scale, const float* dout,
                                                         size_t dos, float* ds) {
  ROW_KERNEL(attention_probs_bwd_f32_row, rows, cols, cols, s, ss, scale, causal, queries, key,
             threshold, keep_scale, dout, dos, ds);
}

extern "C" __global__ void fused_attention_probs_bwd_bf16(
    size_t rows, size_t cols, const float* s, size_t ss, float scale, int causal, size_t queries,
    unsigned long long key, unsigned int threshold, float keep_scale, const __nv_bfloat16* dout,
    size_t dos, float* ds) {
  ROW_KERNEL(attention_probs_bwd_bf16_row, rows, cols, cols, s, ss, scale, causal, queries, key,
             threshold, keep_scale, dout, dos, ds);
}

template <class R>
__device__ void softmax_bwd(size_t cols, const float* p, size_t ps, const float* dp, size_t dps,
                            float scale, float* ds) {
  const size_t r = R::index();
  const float* prow = p + r * ps;
  const float* drow = dp + r * dps;
  float t = 0.0f;
  for (size_t j = R::lane(); j < cols; j += R::size()) t += prow[j] * drow[j];
  const float inner = R::sum(t);
  float* out = ds + r * cols;
  for (size_t j = R::lane(); j < cols; j += R::size())
    out[j] = scale * prow[j] * (drow[j] - inner);
}

// ds = scale · p·(dp − Σ_j p·dp) from the kept probabilities p (f32, without dropout)
extern "C" __global__ void fused_softmax_bwd(size_t rows, size_t cols, const float* p, size_t ps,
                                             const float* dp, size_t dps, float scale,
                                             float* ds) {
  ROW_KERNEL(softmax_bwd, rows, cols, cols, p, ps, dp, dps, scale, ds);
}

// ---------------------------------------------------------------------------------------------
// attention heads (heads.rs): (B, L, H·hd) rows of f32 ↔ (B, H, L, hd) in the products' dtype,
// the transpose and the cast in one pass

// dst[b, h, l, d] = src[(b·L + l)·ss + h·hd + d]   (element-wise over dst)
template <class T>
__device__ void split_heads(size_t batch, size_t len, size_t heads, size_t hd, const float* src,
                            size_t ss, T* dst) {
  FOR_EACH_ELEMENT(batch * heads * len, hd) {
    const size_t d = i % hd, t = i / hd;
    const size_t l = t % len, h = (t / len) % heads, b = t / (len * heads);
    store(dst + i, src[(b * len + l) * ss + h * hd + d]);
  }
}

// dst[(b·L + l)·H·hd + h·hd + d] = src[b, h, l, d] in f32   (element-wise over src)
template <class T>
__device__ void merge_heads(size_t batch, size_t len, size_t heads, size_t hd, const T* src,
                            float* dst) {
  FOR_EACH_ELEMENT(batch * heads * len, hd) {
    const size_t d = i % hd, t = i / hd;
    const size_t l = t % len, h = (t / len) % heads, b = t / (len * heads);
    dst[(b * len + l) * heads * hd + h * hd + d] = load(src + i);
  }
}

extern "C" __global__ void split_heads_f32(size_t batch, size_t len, size_t heads, size_t hd,
                                           const float* src, size_t ss, float* dst) {
  split_heads(batch, len, heads, hd, src, ss, dst);
}
extern "C" __global__ void split_heads_bf16(size_t batch, size_t len, size_t heads, size_t hd,
                                            const float* src, size_t ss, __nv_bfloat16* dst) {
  split_heads(batch, len, heads, hd, src, ss, dst);
}
extern "C" __global__ void merge_heads_f32(size_t batch, size_t len, size_t heads, size_t hd,
                                           const float* src, float* dst) {
  merge_heads(batch, len, heads, hd, src, dst);
}
extern "C" __global__ void merge_heads_bf16(size_t batch, size_t len, size_t heads, size_t hd,
                                            const __nv_bfloat16* src, float* dst) {
  merge_heads(batch, len, heads, hd, src, dst);
}

// ---------------------------------------------------------------------------------------------
// row gather y[j] = x[index[j]] and its backward dx[r] = Σ dy[j] over the readers j of row r

// grid-stride over n_out × cols values
extern "C" __global__ void gather_rows(size_t n_out, size_t cols, const float* x,
                                       const unsigned int* index, float* y) {
  FOR_EACH_ELEMENT(n_out, cols) { y[i] = x[(size_t)index[ROW(i, cols)] * cols + COL(i, cols)]; }
}

// grid: (column tiles of 32, source rows, grid-stride); block: 32 columns × 8 lanes down the
// reader list. `inverse` holds offsets[rows + 1] then the readers of each row in ascending order;
// lane k sums readers k, k + 8, …, and the 8 lane sums are added in a fixed order, so every run
// gives the same result.
extern "C" __global__ void scatter_rows_sum(size_t rows, size_t cols, const float* dy,
                                            const unsigned int* inverse, float* dx) {
  const unsigned int* order = inverse + rows + 1;
  const size_t j = blockIdx.x * (size_t)WARP + threadIdx.x;
  for (size_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const unsigned int k0 = inverse[r], k1 = inverse[r + 1];
    float s = 0.0f;
    if (j < cols) {
#pragma unroll 4
      for (unsigned int k = k0 + threadIdx.y; k < k1; k += COL_SUM_ROWS_PER_STEP)
        s += dy[(size_t)order[k] * cols + j];
    }
    const float t = tile_column_sum(s);
    if (threadIdx.y == 0 && j < cols) dx[r * cols + j] = t;
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 linear layer: operands rounded to bf16 (round to nearest even) for cuBLAS

extern "C" __global__ void cast_f32_bf16(size_t n, const float* x, __nv_bfloat16* y) {
  FOR_EACH_ELEMENT(n, 1) { y[i] = __float2bfloat16_rn(x[i]); }
}
