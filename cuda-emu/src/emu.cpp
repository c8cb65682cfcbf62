// The launcher of cuda-emu: runs a kernel of kernels.cu on the CPU (see emu.h), called from Rust
// with CUDA's own calling convention, an array of pointers to the kernel's arguments.
#include "emu.h"

#include "kernels.cu"

#include <pthread.h>

#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <semaphore>
#include <type_traits>
#include <utility>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace emu {

constexpr unsigned WARP_SIZE = 32;
constexpr unsigned MAX_THREADS = 1024;  // per block, as on every CUDA GPU
// how long one block may run before it is taken for deadlocked (blocks of the tests take ms)
constexpr int BLOCK_PATIENCE_S = 60;

struct Warp {
  std::barrier<> arrived;
  unsigned lanes;
  float values[WARP_SIZE];
  explicit Warp(unsigned lanes) : arrived(lanes), lanes(lanes) {}
};

struct Block {
  std::barrier<> arrived;
  explicit Block(unsigned threads) : arrived(threads) {}
};

thread_local Block* this_block;
thread_local Warp* this_warp;
thread_local unsigned this_lane;

void syncthreads() { this_block->arrived.arrive_and_wait(); }

float shfl_xor(float v, int lane_mask) {
  Warp& w = *this_warp;
  w.values[this_lane] = v;
  w.arrived.arrive_and_wait();
  const unsigned src = this_lane ^ (unsigned)lane_mask;
  const float r = src < w.lanes ? w.values[src] : v;
  w.arrived.arrive_and_wait();  // every lane has read before the next shuffle writes
  return r;
}

using Invoke = void (*)(void**);

template <class... A, size_t... I>
void call(void (*kernel)(A...), void** params, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<A>*>(params[I])...);
}

template <class... A>
constexpr size_t arity(void (*)(A...)) {
  return sizeof...(A);
}

struct Kernel {
  const char* name;
  size_t arity;
  Invoke invoke;
};

#define KERNEL(k) \
  {#k, arity(&k), [](void** p) { call(&k, p, std::make_index_sequence<arity(&k)>{}); }},
// one KERNEL(name) line per `__global__` function of kernels.cu, written by build.rs
const Kernel KERNELS[] = {
#include "kernels.inc"
};

struct Thread {
  Block* block;
  Warp* warp;
  unsigned lane;
  uint3 thread, block_index;
  dim3 block_dim, grid_dim;
  Invoke invoke;
  void** params;
};

void run_thread(const Thread& t) {
  this_block = t.block;
  this_warp = t.warp;
  this_lane = t.lane;
  threadIdx = t.thread;
  blockIdx = t.block_index;
  blockDim = t.block_dim;
  gridDim = t.grid_dim;
  t.invoke(t.params);
}

// The threads that run a block's threads, started once and kept (starting 256 OS threads for
// every block made a test of a few hundred blocks take seconds): worker i runs thread i.
struct Worker {
  std::binary_semaphore go{0};
  Thread job;
};
std::vector<Worker*> workers;
std::counting_semaphore<MAX_THREADS> finished{0};

void* work(void* arg) {
  Worker& w = *static_cast<Worker*>(arg);
  for (;;) {
    w.go.acquire();
    run_thread(w.job);
    finished.release();
  }
  return nullptr;
}

// Starts workers until there are `n`; false when the system refuses a thread.
bool ensure_workers(unsigned n) {
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 1 << 18);
  bool ok = true;
  while (ok && workers.size() < n) {
    Worker* w = new Worker();  // lives as long as the process, as its thread does
    pthread_t h;
    ok = pthread_create(&h, &attr, work, w) == 0;
    if (ok) {
      pthread_detach(h);
      workers.push_back(w);
    } else {
      delete w;
    }
  }
  pthread_attr_destroy(&attr);
  return ok;
}

std::mutex one_launch_at_a_time;

int fail(char* err, size_t len, const char* msg) {
  std::snprintf(err, len, "%s", msg);
  return 1;
}

// One block: all its threads run at once (a barrier needs them all), and it ends when they have.
void run_block(const Kernel& k, void** params, uint3 block_index, dim3 grid, dim3 block) {
  const unsigned n = block.x * block.y * block.z;
  Block b(n);
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned first = 0; first < n; first += WARP_SIZE)
    warps.push_back(std::make_unique<Warp>(std::min(WARP_SIZE, n - first)));
  for (unsigned i = 0; i < n; ++i) {
    workers[i]->job = Thread{&b,
                             warps[i / WARP_SIZE].get(),
                             i % WARP_SIZE,
                             uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)},
                             block_index,
                             block,
                             grid,
                             k.invoke,
                             params};
    workers[i]->go.release();
  }
  for (unsigned i = 0; i < n; ++i) {
    if (!finished.try_acquire_for(std::chrono::seconds(BLOCK_PATIENCE_S))) {
      // the block's threads wait at a barrier that some of them never reach (a __syncthreads
      // or full-warp shuffle in divergent code): on a GPU a hang or undefined; here a clear end
      std::fprintf(stderr,
                   "cuda-emu: block (%u, %u, %u) of `%s` did not finish in %d s: %u of its %u "
                   "threads are still waiting, at a __syncthreads or a warp shuffle that not "
                   "every thread reaches?\n",
                   block_index.x, block_index.y, block_index.z, k.name, BLOCK_PATIENCE_S, n - i,
                   n);
      std::abort();
    }
  }
}

}  // namespace emu

// Runs kernel `name` over grid[0..3] blocks of block[0..3] threads; `params[i]` points to the
// value of argument i. Returns 0, or 1 with a message in `err`.
extern "C" int cuda_emu_launch(const char* name, const unsigned* grid, const unsigned* block,
                               void** params, size_t n_params, char* err, size_t err_len) {
  using namespace emu;
  const Kernel* k = nullptr;
  for (const Kernel& c : KERNELS)
    if (std::strcmp(c.name, name) == 0) k = &c;
  char msg[256];
  if (k == nullptr) {
    std::snprintf(msg, sizeof msg, "kernels.cu has no kernel `%s`", name);
    return fail(err, err_len, msg);
  }
  if (n_params != k->arity) {
    std::snprintf(msg, sizeof msg, "`%s` takes %zu arguments, got %zu", name, k->arity, n_params);
    return fail(err, err_len, msg);
  }
  const dim3 g{grid[0], grid[1], grid[2]}, b{block[0], block[1], block[2]};
  const unsigned long long threads = (unsigned long long)b.x * b.y * b.z;
  if (threads == 0 || threads > MAX_THREADS) {
    std::snprintf(msg, sizeof msg, "`%s`: %llu threads per block (1 to %u allowed)", name, threads,
                  MAX_THREADS);
    return fail(err, err_len, msg);
  }
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535) {
    std::snprintf(msg, sizeof msg, "`%s`: grid (%u, %u, %u) (each ≥ 1, y and z ≤ 65535)", name,
                  g.x, g.y, g.z);
    return fail(err, err_len, msg);
  }
  std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  if (!ensure_workers((unsigned)threads)) {
    std::snprintf(msg, sizeof msg, "`%s`: could not start %llu threads", name, threads);
    return fail(err, err_len, msg);
  }
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x)
        run_block(*k, params, uint3{x, y, z}, g, b);
  return 0;
}
