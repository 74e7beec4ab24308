// TORCH_LIBRARY_IMPL(hierkern, CUDA): the CUDA implementations of the varlen_fwd / varlen_bwd schemas
// declared in csrc/hierkern.cpp. Checks arguments, allocates outputs, and calls the torch-free launchers in
// varlen_attention.h on the current stream. Built into hierkern._C by setup.py when CUDA is available, or
// on its own by hierkern/ops/cuda_attention.py's JIT path (then it only adds to an existing hierkern._C).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>

#include "../common/varlen_checks.h"
#include "varlen_attention.h"

namespace {

namespace hk = hierkern::cuda;

hk::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return hk::DType::kFloat32;
    case at::kHalf:
      return hk::DType::kFloat16;
    case at::kBFloat16:
      return hk::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "hierkern CUDA kernels take float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

void check_packed(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must have shape (total, heads, head_dim), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                   t.scalar_type());
}

// The kernels read rows as 16-byte vectors: unit stride on head_dim and 16-byte aligned rows. Anything else
// (a transposed or oddly offset view) is copied once.
at::Tensor vector_ready(const at::Tensor& t) {
  const int64_t per_vec = 16 / t.element_size();
  const bool ok = t.stride(2) == 1 && t.stride(0) % per_vec == 0 && t.stride(1) % per_vec == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

at::Tensor offsets_ready(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() >= 1, name, " must have shape (S + 1,), got ", t.sizes());
  return t.contiguous();
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor");
  TORCH_CHECK_VALUE(q.dim() == 3, "q must have shape (total, heads, head_dim), got ", q.sizes());
  check_packed(k, "k", q);
  check_packed(v, "v", q);
}

// A window side checked by hierkern::check_window (-1 unbounded). A side wider than any segment is unbounded
// too, so clamping to int loses nothing.
int window_side(int64_t size) {
  return static_cast<int>(std::min<int64_t>(size, INT32_MAX));
}

// Fills the fields shared by the forward and backward; q, k, v must already be vector_ready.
void fill_common(hk::VarlenArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& cu_q, const at::Tensor& cu_k, double softmax_scale, int64_t window_left,
                 int64_t window_right, double dropout_p, const std::optional<at::Tensor>& rng_state) {
  hierkern::check_varlen_shapes("", q, k, v, cu_q, cu_k);
  TORCH_CHECK_VALUE(hk::head_dim_supported(static_cast<int>(q.size(2))),
                    "hierkern CUDA kernels support head_dim 32, 64 and 128, got ", q.size(2));
  TORCH_CHECK_VALUE(q.size(0) <= hk::kMaxTokens && k.size(0) <= hk::kMaxTokens, "more than ", hk::kMaxTokens,
                    " tokens: ", q.size(0), " queries and ", k.size(0), " keys");
  // The offsets' values are trusted (reading them would sync): hierkern.varlen_attention validates them
  // where they are host-readable. Without any segment there must be no token for them to index.
  TORCH_CHECK_VALUE(cu_q.numel() >= 2 || (q.size(0) == 0 && k.size(0) == 0),
                    "cu_seqlens_q describes no segment but there are ", q.size(0), " queries and ", k.size(0), " keys");
  hierkern::check_window("", window_left, window_right);
  hierkern::check_dropout_p("", dropout_p);
  a.dtype = dtype_of(q);
  a.head_dim = static_cast<int>(q.size(2));
  a.num_heads = static_cast<int>(q.size(1));
  a.num_kv_heads = static_cast<int>(k.size(1));
  a.total_q = static_cast<int>(q.size(0));
  a.total_k = static_cast<int>(k.size(0));
  a.num_segments = static_cast<int>(cu_q.numel()) - 1;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.q_token_stride = q.stride(0);
  a.q_head_stride = q.stride(1);
  a.k_token_stride = k.stride(0);
  a.k_head_stride = k.stride(1);
  a.v_token_stride = v.stride(0);
  a.v_head_stride = v.stride(1);
  a.cu_seqlens_q = cu_q.data_ptr<int>();
  a.cu_seqlens_k = cu_k.data_ptr<int>();
  a.softmax_scale = static_cast<float>(softmax_scale);
  a.window = hk::Window{window_side(window_left), window_side(window_right)};
  a.dropout_p = static_cast<float>(dropout_p);
  const hierkern::RngState rng = hierkern::read_rng_state("", dropout_p, rng_state);
  a.seed = rng.seed;
  a.offset = rng.offset;
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                   const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                   int64_t max_seqlen_k, double softmax_scale, int64_t window_left,
                                                   int64_t window_right, double dropout_p,
                                                   const std::optional<at::Tensor>& rng_state) {
  // The schedule is found on the device from the offsets; the max_seqlen hints are not needed.
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  check_qkv(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in);
  const at::Tensor cu_q = offsets_ready(cu_seqlens_q, "cu_seqlens_q", q);
  const at::Tensor cu_k = offsets_ready(cu_seqlens_k, "cu_seqlens_k", q);
  hk::FwdArgs args{};
  fill_common(args, q, k, v, cu_q, cu_k, softmax_scale, window_left, window_right, dropout_p, rng_state);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  args.out = out.data_ptr();
  args.lse = lse.data_ptr<float>();
  const cudaError_t err = hk::varlen_fwd(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hierkern varlen_fwd launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, int64_t window_left, int64_t window_right,
    double dropout_p, const std::optional<at::Tensor>& rng_state) {
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  check_qkv(q_in, k_in, v_in);
  check_packed(dout_in, "dout", q_in);
  check_packed(out_in, "out", q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in);
  TORCH_CHECK_VALUE(dout_in.sizes() == q.sizes() && out_in.sizes() == q.sizes(), "dout and out must have q's shape ",
                    q.sizes(), ", got ", dout_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK_VALUE(lse_in.device() == q.device() && lse_in.scalar_type() == at::kFloat && lse_in.dim() == 2 &&
                        lse_in.size(0) == q.size(1) && lse_in.size(1) == q.size(0),
                    "lse must be a float32 tensor of shape (heads, total_q) on q's device, got ", lse_in.scalar_type(),
                    " ", lse_in.sizes());
  // out is checked for the schema's contract but not read: the kernels recompute delta = rowsum(dout * out)
  // in fp32 (varlen_attention.h).
  const at::Tensor dout = vector_ready(dout_in), lse = lse_in.contiguous();
  const at::Tensor cu_q = offsets_ready(cu_seqlens_q, "cu_seqlens_q", q);
  const at::Tensor cu_k = offsets_ready(cu_seqlens_k, "cu_seqlens_k", q);
  hk::BwdArgs args{};
  fill_common(args, q, k, v, cu_q, cu_k, softmax_scale, window_left, window_right, dropout_p, rng_state);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  args.dout = dout.data_ptr();
  args.dout_token_stride = dout.stride(0);
  args.dout_head_stride = dout.stride(1);
  args.lse = lse.data_ptr<float>();
  args.delta = delta.data_ptr<float>();
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  const cudaError_t err = hk::varlen_bwd(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hierkern varlen_bwd launch failed: ", cudaGetErrorString(err));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CUDA, m) {
  m.impl("varlen_fwd", &varlen_fwd_cuda);
  m.impl("varlen_bwd", &varlen_bwd_cuda);
}
