// The one TORCH_LIBRARY(hierkern) that declares every op; CPU and CUDA kernels register implementations
// with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <torch/library.h>

// Imported as hierkern._C: the module itself is empty, loading it runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(hierkern, m) {
  // Packed varlen attention, FlashAttention's layout: q (total_q, H, D), k/v (total_k, H_kv, D),
  // int32 offsets (S + 1,). Returns out (total_q, H, D) in q's dtype and lse (H, total_q) float32.
  // rng_state: int64 CPU tensor [seed, offset] for dropout (ignored when dropout_p == 0).
  // window_left/window_right: FlashAttention's window_size, aligned bottom-right: in a segment of Lq queries and
  // Lk keys, query i sees key j iff i + Lk - Lq - window_left <= j <= i + Lk - Lq + window_right, -1 leaving
  // that side unbounded; causal is (-1, 0), no mask (-1, -1). A row that sees no key gets zeros and lse -inf.
  m.def(
      "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, int window_right, "
      "float dropout_p, Tensor? rng_state) -> (Tensor out, Tensor lse)");
  // Gradients of varlen_fwd; P is recomputed from q, k and lse.
  m.def(
      "varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, "
      "int window_right, float dropout_p, Tensor? rng_state) -> (Tensor dq, Tensor dk, Tensor dv)");

  // Dropout on a tensor, the mask a pure function of rng_state = int64 CPU [seed, offset] (csrc/common/philox.h,
  // the element layout), so the backward is the same op on the gradient: x * mask / (1 - p), p in [0, 1), and
  // residual + that. Outputs are contiguous, in x's shape and dtype.
  m.def("dropout(Tensor x, float p, Tensor rng_state) -> Tensor");
  m.def("dropout_add(Tensor residual, Tensor x, float p, Tensor rng_state) -> Tensor");
}
