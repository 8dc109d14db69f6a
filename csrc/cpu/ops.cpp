// klops_cpu: the CPU kernels of klops as torch ops in the namespace klops_cpu, with the schemas of the
// CUDA ops (schemas.h); the implementations are in logprobs.cpp, divergence.cpp and topk.cpp. Built on first use
// by klops/_cpu.py.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

#include "../schemas.h"
#include "rows.h"

namespace klops {
namespace cpu {
namespace {

// How many threads the row kernels use for `rows` rows of V entries: the distinct threads that
// parallel_rows hands rows to (klops/_cpu.py and tests/test_cpu.py check that they run in parallel).
int64_t parallel_threads(int64_t rows, int64_t V) {
  std::atomic<uint64_t> seen{0};
  parallel_rows(rows, V, [&](int64_t) { seen |= uint64_t{1} << (at::get_thread_num() % 64); });
  return __builtin_popcountll(seen.load());
}

}  // namespace
}  // namespace cpu
}  // namespace klops

TORCH_LIBRARY(klops_cpu, m) {
  m.def(klops::schemas::kDivergenceForward);
  m.def(klops::schemas::kDivergenceBackward);
  m.def(klops::schemas::kTopkDivergenceForward);
  m.def(klops::schemas::kTopkDivergenceBackward);
  m.def(klops::schemas::kLogprobsForward);
  m.def(klops::schemas::kLogprobsBackward);
  // CPU only: the gradient written over the logits it is computed from (klops/_chunked.py's chunks, which are not
  // read again; contiguous); otherwise the schemas of logprobs_backward / divergence_backward.
  m.def(
      "logprobs_backward_over_logits(Tensor grad_logp, Tensor grad_entropy, Tensor(a!) logits, Tensor labels, "
      "Tensor max, Tensor logsum, Tensor entropy, float temperature, bool with_entropy, int ignore_index) -> ()");
  m.def(
      "divergence_backward_over_student(Tensor grad, Tensor? grad_logp, Tensor(a!) student, Tensor teacher, "
      "Tensor valid, Tensor? labels, Tensor max_q, Tensor logsum_q, Tensor max_t, Tensor logsum_t, Tensor gbar, "
      "int kind, int target, float temperature, float coef) -> ()");
  m.def(
      "divergence_forward_and_grad(Tensor student, Tensor teacher, Tensor valid, Tensor row_weight, int kind, "
      "int target, float temperature, float coef) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("parallel_threads(int rows, int V) -> int", &klops::cpu::parallel_threads);
}
