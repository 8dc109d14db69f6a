// klops._C: the CUDA kernels of klops as torch ops in the namespace klops_C (schemas in schemas.h, CUDA
// implementations in divergence.cu, topk.cu and logprobs.cu), plus build information for Python.

#include <cuda.h>  // CUDA_VERSION
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "schemas.h"

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

// The schemas are in schemas.h, shared with the CPU ops of csrc/cpu/ (namespace klops_cpu).
TORCH_LIBRARY(klops_C, m) {
  m.def(klops::schemas::kDivergenceForward);
  m.def(klops::schemas::kDivergenceBackward);
  m.def(klops::schemas::kTopkDivergenceForward);
  m.def(klops::schemas::kTopkDivergenceBackward);
  m.def(klops::schemas::kLogprobsForward);
  m.def(klops::schemas::kLogprobsBackward);
}
