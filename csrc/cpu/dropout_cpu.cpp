// CPU implementations of hierkern::dropout / hierkern::dropout_add: argument checks, work partitioning and the
// choice of instruction set. The arithmetic lives in dropout_impl.h, the element layout in common/philox.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "dropout_kernel.h"
#include "kernel_choice.h"
#include "../common/philox.h"         // dropout_threshold, shared with the attention kernels
#include "../common/varlen_checks.h"  // read_rng_state

namespace hierkern {
namespace cpu {
namespace {

constexpr const char* kWho = "hierkern dropout: ";

// Chunks per task: ~32k elements, tens of microseconds of Philox rounds, well above the cost of waking a thread.
constexpr int64_t kGrainChunks = 1024;

DropoutChunksFn select_kernel() {
  return use_avx2_kernels() ? avx2::dropout_chunks : generic::dropout_chunks;
}

DropoutChunksFn kernel() {
  static const DropoutChunksFn selected = select_kernel();
  return selected;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kWho, name, " must be a CPU tensor, got ", t.device());
}

// residual (if defined) + dropout(x): contiguous output in x's shape.
at::Tensor run(const at::Tensor& x_in, const at::Tensor* residual_in, double p, const at::Tensor& rng_state) {
  check_cpu(x_in, "x");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, kWho, "p must be in [0, 1), got ", p);
  DropoutParams params{};
  params.kind = scalar_kind(x_in, kWho, "x");
  const at::Tensor x = x_in.contiguous();
  at::Tensor residual;
  if (residual_in != nullptr) {
    check_cpu(*residual_in, "residual");
    TORCH_CHECK_VALUE(residual_in->sizes() == x.sizes(), kWho, "residual must have x's shape ", x.sizes(), ", got ",
                      residual_in->sizes());
    TORCH_CHECK_TYPE(residual_in->scalar_type() == x.scalar_type(), kWho, "residual must have x's dtype ",
                     x.scalar_type(), ", got ", residual_in->scalar_type());
    residual = residual_in->contiguous();
    params.residual = residual.data_ptr();
  }
  // rng_state is read whatever p is (p = 0 keeps everything but still names a stream): the same checks always.
  const RngState rng = read_rng_state(kWho, 1.0, std::optional<at::Tensor>(rng_state));
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  params.numel = x.numel();
  params.x = x.data_ptr();
  params.out = out.data_ptr();
  params.threshold = dropout_threshold(static_cast<float>(p));
  params.scale = 1.0 / (1.0 - p);
  params.seed = rng.seed;
  params.offset = rng.offset;
  const int64_t chunks = (params.numel + kDropoutChunk - 1) / kDropoutChunk;
  const DropoutChunksFn fn = kernel();
  at::parallel_for(0, chunks, kGrainChunks, [&](int64_t begin, int64_t end) { fn(params, begin, end); });
  return out;
}

at::Tensor dropout_cpu(const at::Tensor& x, double p, const at::Tensor& rng_state) {
  return run(x, nullptr, p, rng_state);
}

at::Tensor dropout_add_cpu(const at::Tensor& residual, const at::Tensor& x, double p, const at::Tensor& rng_state) {
  return run(x, &residual, p, rng_state);
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) {
  m.impl("dropout", &dropout_cpu);
  m.impl("dropout_add", &dropout_add_cpu);
}

}  // namespace cpu
}  // namespace hierkern
