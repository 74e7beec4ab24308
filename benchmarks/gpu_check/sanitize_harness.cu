// Torch-free driver of the csrc/cuda launchers for compute-sanitizer (memcheck, racecheck, synccheck,
// initcheck): small adversarial layouts, every dtype and head dim, no mask, causal and a sliding window, dropout and
// not, GQA and cross-attention (q and k lengths differ). Runs in seconds, so the sanitizers need not start
// Python/torch.
//
// Build (device):  nvcc -O3 --use_fast_math -lineinfo -gencode=arch=compute_90a,code=sm_90a \
//                  -Icsrc/cuda csrc/cuda/varlen_fwd.cu csrc/cuda/varlen_bwd.cu \
//                  benchmarks/gpu_check/sanitize_harness.cu -o /tmp/hk_san
// Run:             compute-sanitizer --tool memcheck --error-exitcode 1 /tmp/hk_san
// Exit code 0 and "hk_san: OK" when every launch and synchronisation succeeded and no output is NaN.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "varlen_attention.h"

namespace hk = hierkern::cuda;

#define CHECK(call)                                                                                                  \
  do {                                                                                                               \
    cudaError_t err_ = (call);                                                                                       \
    if (err_ != cudaSuccess) {                                                                                       \
      std::fprintf(stderr, "hk_san: %s failed at %s:%d: %s\n", #call, __FILE__, __LINE__, cudaGetErrorString(err_)); \
      std::exit(2);                                                                                                  \
    }                                                                                                                \
  } while (0)

static uint32_t rng_state = 12345u;
static float frand() {  // xorshift, uniform in [-1, 1)
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 17;
  rng_state ^= rng_state << 5;
  return static_cast<float>(rng_state & 0xFFFFFF) / 8388608.0f - 1.0f;
}

static size_t elem_size(hk::DType t) {
  return t == hk::DType::kFloat32 ? 4 : 2;
}

// Device buffer of n elements of dtype t filled with random values (as floats converted to t).
static void* random_buffer(hk::DType t, size_t n) {
  std::vector<unsigned char> host(n * elem_size(t));
  for (size_t i = 0; i < n; ++i) {
    const float x = frand();
    if (t == hk::DType::kFloat32) {
      reinterpret_cast<float*>(host.data())[i] = x;
    } else if (t == hk::DType::kFloat16) {
      reinterpret_cast<__half*>(host.data())[i] = __float2half(x);
    } else {
      reinterpret_cast<__nv_bfloat16*>(host.data())[i] = __float2bfloat16(x);
    }
  }
  void* dev = nullptr;
  CHECK(cudaMalloc(&dev, host.size() > 0 ? host.size() : 16));
  if (!host.empty()) CHECK(cudaMemcpy(dev, host.data(), host.size(), cudaMemcpyHostToDevice));
  return dev;
}

static void* empty_buffer(size_t bytes) {
  void* dev = nullptr;
  CHECK(cudaMalloc(&dev, bytes > 0 ? bytes : 16));
  return dev;
}

static int* offsets_buffer(const std::vector<int>& lengths, int* total) {
  std::vector<int> off(lengths.size() + 1, 0);
  for (size_t i = 0; i < lengths.size(); ++i) off[i + 1] = off[i] + lengths[i];
  *total = off.back();
  int* dev = nullptr;
  CHECK(cudaMalloc(&dev, off.size() * sizeof(int)));
  CHECK(cudaMemcpy(dev, off.data(), off.size() * sizeof(int), cudaMemcpyHostToDevice));
  return dev;
}

// Count of NaNs among n elements of dtype t on the device (host copy; sizes are tiny).
static size_t count_nan(const void* dev, hk::DType t, size_t n) {
  std::vector<unsigned char> host(n * elem_size(t));
  if (n == 0) return 0;
  CHECK(cudaMemcpy(host.data(), dev, host.size(), cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    float x;
    if (t == hk::DType::kFloat32) {
      x = reinterpret_cast<const float*>(host.data())[i];
    } else if (t == hk::DType::kFloat16) {
      x = __half2float(reinterpret_cast<const __half*>(host.data())[i]);
    } else {
      x = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(host.data())[i]);
    }
    bad += std::isnan(x) ? 1 : 0;
  }
  return bad;
}

struct Case {
  const char* name;
  std::vector<int> lengths_q, lengths_k;
};

static int run_case(const Case& c, hk::DType dtype, int head_dim, int heads, int kv_heads, hk::Window window,
                    float dropout_p) {
  int total_q = 0, total_k = 0;
  int* cu_q = offsets_buffer(c.lengths_q, &total_q);
  int* cu_k = offsets_buffer(c.lengths_k, &total_k);
  const size_t nq = static_cast<size_t>(total_q) * heads * head_dim;
  const size_t nk = static_cast<size_t>(total_k) * kv_heads * head_dim;
  void* q = random_buffer(dtype, nq);
  void* k = random_buffer(dtype, nk);
  void* v = random_buffer(dtype, nk);
  void* dout = random_buffer(dtype, nq);
  void* out = empty_buffer(nq * elem_size(dtype));
  float* lse = static_cast<float*>(empty_buffer(static_cast<size_t>(heads) * total_q * sizeof(float)));
  float* delta = static_cast<float*>(empty_buffer(static_cast<size_t>(heads) * total_q * sizeof(float)));
  void* dq = empty_buffer(nq * elem_size(dtype));
  void* dk = empty_buffer(nk * elem_size(dtype));
  void* dv = empty_buffer(nk * elem_size(dtype));

  hk::FwdArgs f{};
  f.dtype = dtype;
  f.head_dim = head_dim;
  f.num_heads = heads;
  f.num_kv_heads = kv_heads;
  f.total_q = total_q;
  f.total_k = total_k;
  f.num_segments = static_cast<int>(c.lengths_q.size());
  f.q = q;
  f.k = k;
  f.v = v;
  f.q_token_stride = static_cast<int64_t>(heads) * head_dim;
  f.q_head_stride = head_dim;
  f.k_token_stride = f.v_token_stride = static_cast<int64_t>(kv_heads) * head_dim;
  f.k_head_stride = f.v_head_stride = head_dim;
  f.cu_seqlens_q = cu_q;
  f.cu_seqlens_k = cu_k;
  f.softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  f.window = window;
  f.dropout_p = dropout_p;
  f.seed = 0x1234567887654321ull;
  f.offset = 42;
  f.out = out;
  f.lse = lse;
  CHECK(hk::varlen_fwd(f, 0));
  CHECK(cudaDeviceSynchronize());

  hk::BwdArgs b{};
  static_cast<hk::VarlenArgs&>(b) = static_cast<const hk::VarlenArgs&>(f);
  b.dout = dout;
  b.dout_token_stride = f.q_token_stride;
  b.dout_head_stride = head_dim;
  b.lse = lse;
  b.delta = delta;
  b.dq = dq;
  b.dk = dk;
  b.dv = dv;
  CHECK(hk::varlen_bwd(b, 0));
  CHECK(cudaDeviceSynchronize());

  const size_t nan =
      count_nan(out, dtype, nq) + count_nan(dq, dtype, nq) + count_nan(dk, dtype, nk) + count_nan(dv, dtype, nk);
  std::printf("hk_san: %-14s dtype=%d D=%-3d H=%d/%d window=(%d,%d) p=%.1f: %s\n", c.name, static_cast<int>(dtype),
              head_dim, heads, kv_heads, window.left, window.right, dropout_p, nan ? "NaN in outputs" : "ok");
  for (void* p : {static_cast<void*>(cu_q), static_cast<void*>(cu_k), q, k, v, dout, out, static_cast<void*>(lse),
                  static_cast<void*>(delta), dq, dk, dv}) {
    CHECK(cudaFree(p));
  }
  return nan ? 1 : 0;
}

int main() {
  const std::vector<Case> cases = {
      {"mixed", {0, 1, 3, 63, 64, 65, 5, 2, 0, 130}, {0, 1, 3, 63, 64, 65, 5, 2, 0, 130}},
      {"cross-unequal", {3, 0, 7, 65, 1, 5, 0}, {5, 4, 0, 61, 9, 5, 3}},
      {"tail-empty", {17, 0, 0}, {17, 0, 0}},
  };
  struct Shape {
    hk::DType dtype;
    int head_dim, heads, kv_heads;
  };
  const Shape shapes[] = {
      {hk::DType::kBFloat16, 64, 4, 2}, {hk::DType::kFloat16, 32, 4, 1}, {hk::DType::kFloat32, 128, 2, 2}};
  int failures = 0;
  for (const Case& c : cases) {
    for (const Shape& s : shapes) {
      // No mask, causal, and a two-sided window (tile unions with gaps between short words' windows).
      for (hk::Window window : {hk::Window{-1, -1}, hk::Window{-1, 0}, hk::Window{2, 1}}) {
        for (float p : {0.0f, 0.1f}) {
          failures += run_case(c, s.dtype, s.head_dim, s.heads, s.kv_heads, window, p);
        }
      }
    }
  }
  std::printf(failures ? "hk_san: %d FAILED cases\n" : "hk_san: OK%.0d\n", failures);
  return failures ? 1 : 0;
}
