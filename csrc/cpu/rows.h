// How the CPU kernels of klops_cpu (csrc/cpu/*.cpp) stream their rows: the input checks, a (B, L, V)
// row's entries read kBlock at a time as fp32 (the row itself for fp32 storage, else converted into a
// buffer on the stack), the gradient written back the same way, the online accumulators of
// online_stats.cuh pushed into kLanes independent lanes (so that GCC vectorizes the push: lane i takes
// entries i, i + kLanes, ...; the lanes are then merged by the same combine as the CUDA warp
// reduction), and the rows spread over torch's intra-op threads (at::parallel_for).
//
// The kernels are templated on the kind and target only: one fp32 body serves every storage dtype.
// Offsets are int64; nothing of size (N, V) is allocated besides the gradient.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "../dispatch.h"

namespace klops {
namespace cpu {

constexpr int64_t kBlock = 1024;  // entries per block: 4 KiB of fp32, a multiple of kLanes
constexpr int kLanes = 32;        // independent accumulators: two 16-wide (AVX-512) vectors
constexpr int64_t kGrain = 32768;  // entries per task of at::parallel_for at least (ATen's GRAIN_SIZE)

// Checks that t is a CPU (B, L, V) tensor of fp32/bf16/fp16 with unit stride on the last dim.
inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D (B, L, V), got ", t.dim(), "-D");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name, " must have stride 1 on its last dim, got ",
              t.stride(2));
}

// The gradient of a row op: a new (B, L, V) tensor like the logits, or the logits themselves (over_input,
// which must then be contiguous: GradRows indexes rows by V).
inline at::Tensor grad_like(const at::Tensor& logits, bool over_input) {
  if (!over_input) return at::empty(logits.sizes(), logits.options());
  TORCH_CHECK(logits.is_contiguous(), "a gradient written over its logits needs contiguous logits");
  return logits;
}

// Checks that t is a (B, L) CPU tensor of one of `dtypes`.
inline void check_per_row(const at::Tensor& t, const char* name, at::IntArrayRef rows_shape,
                          std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == rows_shape, name, " must have shape ", rows_shape, ", got ", t.sizes());
  bool dtype_ok = false;
  for (const auto dtype : dtypes) dtype_ok = dtype_ok || t.scalar_type() == dtype;
  TORCH_CHECK(dtype_ok, name, " has unsupported dtype ", t.scalar_type());
}

// The rows of a (B, L, V) tensor: row r = b L + l starts at b stride_b + l stride_l entries.
struct Rows {
  const void* data;
  at::ScalarType dtype;
  int64_t L;
  int64_t stride_b;
  int64_t stride_l;

  explicit Rows(const at::Tensor& t)
      : data(t.const_data_ptr()), dtype(t.scalar_type()), L(t.size(1)), stride_b(t.stride(0)),
        stride_l(t.stride(1)) {}

  int64_t offset(int64_t row) const { return (row / L) * stride_b + (row % L) * stride_l; }

  // Entries [j, j + n) of the row as fp32: a pointer into the row for fp32, else buf (n <= kBlock).
  const float* block(int64_t row, int64_t j, int64_t n, float* buf) const {
    const int64_t at = offset(row) + j;
    switch (dtype) {
      case at::kBFloat16:
        return widen(static_cast<const c10::BFloat16*>(data) + at, n, buf);
      case at::kHalf:
        return widen(static_cast<const c10::Half*>(data) + at, n, buf);
      default:
        return static_cast<const float*>(data) + at;
    }
  }

  // Entry j of the row as fp32.
  float entry(int64_t row, int64_t j) const {
    float value;
    return *block(row, j, 1, &value);
  }

 private:
  template <typename S>
  static const float* widen(const S* p, int64_t n, float* buf) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return buf;
  }
};

// The contiguous (B*L, V) gradient: each row's block is computed in fp32 into out(row, j, buf) (the
// row itself for fp32, else buf) and then stored with store(row, j, n, buf) (rounded to nearest even).
// over_input: the gradient overwrites the logits it is computed from (the chunked fused-linear path's
// chunk, not read again): every block goes through buf, so that the whole block is read, the label's
// entry included, before any of it is written.
struct GradRows {
  void* data;
  at::ScalarType dtype;
  int64_t V;
  bool over_input;

  explicit GradRows(at::Tensor& t, bool over_input = false)
      : data(t.mutable_data_ptr()), dtype(t.scalar_type()), V(t.size(2)), over_input(over_input) {}

  float* out(int64_t row, int64_t j, float* buf) const {
    return dtype == at::kFloat && !over_input ? static_cast<float*>(data) + row * V + j : buf;
  }

  void store(int64_t row, int64_t j, int64_t n, const float* buf) const {
    const int64_t at = row * V + j;
    switch (dtype) {
      case at::kBFloat16:
        return narrow(buf, n, static_cast<c10::BFloat16*>(data) + at);
      case at::kHalf:
        return narrow(buf, n, static_cast<c10::Half*>(data) + at);
      default:
        if (over_input) std::memcpy(static_cast<float*>(data) + at, buf, n * sizeof(float));
        return;  // else computed in place
    }
  }

  // Entry j of the row = value, rounded to the gradient's dtype.
  void set(int64_t row, int64_t j, float value) const {
    const int64_t at = row * V + j;
    switch (dtype) {
      case at::kBFloat16:
        static_cast<c10::BFloat16*>(data)[at] = static_cast<c10::BFloat16>(value);
        return;
      case at::kHalf:
        static_cast<c10::Half*>(data)[at] = static_cast<c10::Half>(value);
        return;
      default:
        static_cast<float*>(data)[at] = value;
    }
  }

  // Zeros the row (all-zero bits are +0 in every format).
  void zero(int64_t row) const {
    const int64_t bytes = static_cast<int64_t>(c10::elementSize(dtype));
    std::memset(static_cast<char*>(data) + row * V * bytes, 0, V * bytes);
  }

 private:
  template <typename S>
  static void narrow(const float* buf, int64_t n, S* p) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<S>(buf[i]);
  }
};

// push(acc, j) for j in [0, n <= kBlock) into fresh lanes (lane j % kLanes takes entry j; the full groups of
// kLanes as one vectorized loop), then merged lane by lane into `lanes` with op.combine: each lane sums at
// most kBlock / kLanes entries in a row, and the row's blocks are merged as a tree's levels are, which keeps
// the rounding of long rows that of the CUDA kernels' threads.
template <typename Acc, typename Op, typename Push>
inline void push_block(Acc (&lanes)[kLanes], const Op& op, int64_t n, Push&& push) {
  Acc block[kLanes];
  for (auto& lane : block) lane = op.identity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int i = 0; i < kLanes; ++i) push(block[i], j + i);
  }
  for (int i = 0; j < n; ++i, ++j) push(block[i], j);
#pragma omp simd
  for (int i = 0; i < kLanes; ++i) lanes[i] = op.combine(lanes[i], block[i]);
}

// push_block for two accumulators pushed together, push(acc_a, acc_b, j) (e.g. one reusing the other's exp): two
// lane arrays rather than one of pairs, whose interleaved fields GCC would not vectorize.
template <typename AccA, typename OpA, typename AccB, typename OpB, typename Push>
inline void push_block_pair(AccA (&lanes_a)[kLanes], const OpA& op_a, AccB (&lanes_b)[kLanes], const OpB& op_b,
                            int64_t n, Push&& push) {
  AccA block_a[kLanes];
  AccB block_b[kLanes];
  for (int i = 0; i < kLanes; ++i) {
    block_a[i] = op_a.identity();
    block_b[i] = op_b.identity();
  }
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int i = 0; i < kLanes; ++i) push(block_a[i], block_b[i], j + i);
  }
  for (int i = 0; j < n; ++i, ++j) push(block_a[i], block_b[i], j);
#pragma omp simd
  for (int i = 0; i < kLanes; ++i) {
    lanes_a[i] = op_a.combine(lanes_a[i], block_a[i]);
    lanes_b[i] = op_b.combine(lanes_b[i], block_b[i]);
  }
}

template <typename Acc, typename Op>
inline void fill_lanes(Acc (&lanes)[kLanes], const Op& op) {
  for (auto& lane : lanes) lane = op.identity();
}

// The lanes merged pairwise with op.combine (as block_reduce's butterflies).
template <typename Acc, typename Op>
inline Acc combine_lanes(Acc (&lanes)[kLanes], const Op& op) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] = op.combine(lanes[i], lanes[i + width]);
  }
  return lanes[0];
}

// f(row) for every row in [0, rows), the rows split over torch's intra-op threads in chunks of about
// kGrain entries at least.
template <typename F>
inline void parallel_rows(int64_t rows, int64_t V, F&& f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) f(row);
  });
}

}  // namespace cpu
}  // namespace klops
