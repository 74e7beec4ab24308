// The argument checks that the CPU and CUDA bindings (csrc/cpu/attention_cpu.cpp, csrc/cuda/binding.cpp) share
// word for word: how q, k, v and the offsets fit together, the attention window, the dropout probability, and
// reading rng_state.
// What differs stays with each binding: devices, dtypes, head dims with a kernel, and the offsets' values (the
// CPU binding reads and validates them on the host; the CUDA binding must not sync to read them). Torch-aware,
// unlike the rest of csrc/common: only the bindings include it. `who` prefixes every message
// ("hierkern CPU attention: ", or "" for the CUDA binding's historical messages).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace hierkern {

// q (total_q, H, D) against k and v (total_k, H_kv, D) and the offsets: k and v alike, one head_dim, H a
// multiple of H_kv (GQA), and as many segments on both sides. The tensors must already be 3-D.
inline void check_varlen_shapes(const char* who, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_q, const at::Tensor& cu_k) {
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), who, "k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.size(2) == k.size(2), who, "q and k must have the same head_dim, got ", q.size(2), " and ",
                    k.size(2));
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, who, "the number of query heads (", q.size(1),
                    ") must be a multiple of the number of key/value heads (", k.size(1), ")");
  TORCH_CHECK_VALUE(cu_q.numel() == cu_k.numel(), who,
                    "cu_seqlens_q and cu_seqlens_k must describe the same "
                    "number of segments, got ",
                    cu_q.numel() - 1, " and ", cu_k.numel() - 1);
}

// FlashAttention's window_size: -1 is unbounded on that side, other values count keys.
inline void check_window(const char* who, int64_t window_left, int64_t window_right) {
  TORCH_CHECK_VALUE(window_left >= -1, who, "window_left must be -1 (unbounded) or >= 0, got ", window_left);
  TORCH_CHECK_VALUE(window_right >= -1, who, "window_right must be -1 (unbounded) or >= 0, got ", window_right);
}

inline void check_dropout_p(const char* who, double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, who, "dropout_p must be in [0, 1), got ", dropout_p);
}

// rng_state = [seed, offset] (common/philox.h's key and counter), which dropout_p > 0 needs; zeros without
// dropout, where rng_state is ignored.
struct RngState {
  uint64_t seed = 0;
  uint64_t offset = 0;
};

inline RngState read_rng_state(const char* who, double dropout_p, const std::optional<at::Tensor>& rng_state) {
  if (!(dropout_p > 0.0)) return {};
  TORCH_CHECK_VALUE(rng_state.has_value(), who, "dropout_p > 0 needs rng_state = [seed, offset]");
  const at::Tensor& rng = *rng_state;
  TORCH_CHECK_VALUE(rng.device().is_cpu() && rng.scalar_type() == at::kLong && rng.numel() == 2, who,
                    "rng_state must be an int64 CPU tensor [seed, offset], got ", rng.scalar_type(), " on ",
                    rng.device(), " with ", rng.numel(), " elements");
  const at::Tensor r = rng.contiguous();
  return {static_cast<uint64_t>(r.data_ptr<int64_t>()[0]), static_cast<uint64_t>(r.data_ptr<int64_t>()[1])};
}

}  // namespace hierkern
