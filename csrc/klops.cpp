// klops._C: the CUDA kernels of klops as torch ops in the namespace klops_C (schemas here, CUDA
// implementations in divergence.cu, topk.cu and logprobs.cu), plus build information for Python.

#include <cuda.h>  // CUDA_VERSION
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#if !defined(KLOPS_CUDA_ARCH_LIST) || !defined(KLOPS_TORCH_VERSION)
#error "KLOPS_CUDA_ARCH_LIST and KLOPS_TORCH_VERSION must be defined by setup.py"
#endif

namespace {

// The CUDA toolkit version this module was compiled with, e.g. "13.0".
std::string cuda_version() {
  return std::to_string(CUDA_VERSION / 1000) + "." + std::to_string(CUDA_VERSION % 1000 / 10);
}

// The TORCH_CUDA_ARCH_LIST this module was compiled for, e.g. "9.0".
std::string arch_list() { return KLOPS_CUDA_ARCH_LIST; }

// The torch version this module was compiled against, e.g. "2.14.1": its C++ ABI is that torch's.
std::string torch_version() { return KLOPS_TORCH_VERSION; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of klops, registered as torch.ops.klops_C.*";
  m.def("cuda_version", &cuda_version, "CUDA toolkit version klops._C was compiled with");
  m.def("arch_list", &arch_list, "TORCH_CUDA_ARCH_LIST klops._C was compiled for");
  m.def("torch_version", &torch_version, "torch version klops._C was compiled against");
}

// kind indexes kernels/kinds.py's KINDS (enum Kind of divergence_terms.cuh), target ("logits", "logprobs",
// "probs"); coef is the kind's coefficient (beta of jsd, alpha of skew_* and alpha).
TORCH_LIBRARY(klops_C, m) {
  // max_* are raw row maxes of the logits (before the temperature) and logsum_* the logs of the
  // shifted sums, log sum_v exp((z_v - max) / T): log softmax = (z - max) / T - logsum.
  m.def(
      "divergence_forward(Tensor student, Tensor teacher, Tensor valid, int kind, int target, "
      "float temperature, float coef) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // With grad_logp and labels (int64) the backward adds grad_logp (1[v = label] - q) / T: the gradient
  // of the label's log-prob, which the op computes from the forward's max_q and logsum_q.
  m.def(
      "divergence_backward(Tensor grad, Tensor? grad_logp, Tensor student, Tensor teacher, "
      "Tensor valid, Tensor? labels, Tensor max_q, Tensor logsum_q, Tensor max_t, Tensor logsum_t, "
      "Tensor gbar, int kind, int target, float temperature, float coef) -> Tensor");
  // Sparse top-k teachers: indices (B, L, K) int32 sorted within each row, teacher_logprobs (B, L, K);
  // max_c / logsum_c are the student's statistics outside the top-k, tail_scale the tail's gradient
  // coefficient and member_d (B, L, K) the members' gradient numerators (kernels/topk.py).
  m.def(
      "topk_divergence_forward(Tensor student, Tensor indices, Tensor teacher_logprobs, Tensor valid, "
      "int kind, bool bin, float temperature, float coef, float tail_loss, float tail_grad) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The backward reads tail_coef (B, L) and member_value (B, L, K): the rows' gradients times tail_scale
  // and member_d, less the -q part of the label's log-prob; label_coef / labels add its onehot.
  m.def(
      "topk_divergence_backward(Tensor tail_coef, Tensor student, Tensor indices, Tensor valid, "
      "Tensor max_c, Tensor logsum_c, Tensor member_value, Tensor? label_coef, Tensor? labels, "
      "float temperature) -> Tensor");
  m.def(
      "logprobs_forward(Tensor logits, Tensor labels, float temperature, bool with_entropy, "
      "int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_backward(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor labels, "
      "Tensor max, Tensor logsum, Tensor entropy, float temperature, bool with_entropy, "
      "int ignore_index) -> Tensor");
}
