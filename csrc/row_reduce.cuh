// Shared pieces of the row kernels of klops._C: one thread block streams one row of V entries.
//
//   - host: input checks, the dispatch from a float dtype to its storage format, the block size;
//   - device: the storage formats (fp32, bf16, fp16 and their conversions) and a block-wide
//     reduction of any accumulator with combine/shfl_xor. The online accumulators (log-sum-exp,
//     entropy, KL) are in online_stats.cuh, the row sweep and its vector loads / stores in
//     row_sweep.cuh.
//
// Offsets into the (B, L, V) tensors are int64: B * L * V exceeds 2^31 for LLM vocabularies.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dispatch.h"
#include "online_stats.cuh"
#include "row_sweep.cuh"

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>

namespace klops {

constexpr int kMaxThreads = 256;  // block size cap of every row kernel (a multiple of 32, <= 1024)

// ------------------------------------------------------------------------------------------------
// Storage formats: how the entries of a (B, L, V) tensor are stored and converted to/from fp32
// (the conversions of c10::BFloat16 / c10::Half: exact widening, round to nearest even when
// narrowing). One format per dtype: the kernels are instantiated per format, so the hot loops
// convert without a run-time branch.

struct Fp32Format {
  using Storage = float;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

struct Bf16Format {
  using Storage = uint16_t;
  static __device__ __forceinline__ float to_float(uint16_t v) {
    return __uint_as_float(uint32_t{v} << 16);
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

struct Fp16Format {
  using Storage = uint16_t;
  static __device__ __forceinline__ float to_float(uint16_t v) {
    return __half2float(__ushort_as_half(v));
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};

// ------------------------------------------------------------------------------------------------
// Host helpers

// Checks that t is a CUDA (B, L, V) tensor of fp32/bf16/fp16 with unit stride on the last dim.
inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D (B, L, V), got ", t.dim(), "-D");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(t.stride(2) == 1, name, " must have stride 1 on its last dim, got ", t.stride(2));
  TORCH_CHECK(t.size(0) * t.size(1) <= std::numeric_limits<int32_t>::max(), name,
              ": B * L must fit the grid (at most 2^31 - 1 rows)");
}

// Checks that t is a (B, L) tensor of one of `dtypes` on `device`.
inline void check_per_row(const at::Tensor& t, const char* name, at::IntArrayRef rows_shape,
                          const at::Device& device, std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.sizes() == rows_shape, name, " must have shape ", rows_shape, ", got ", t.sizes());
  bool dtype_ok = false;
  for (const auto dtype : dtypes) dtype_ok = dtype_ok || t.scalar_type() == dtype;
  TORCH_CHECK(dtype_ok, name, " has unsupported dtype ", t.scalar_type());
}

// Calls f(Format{}) with the storage format of a float dtype.
template <typename F>
void dispatch_format(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(Fp32Format{});
    case at::kBFloat16:
      return f(Bf16Format{});
    case at::kHalf:
      return f(Fp16Format{});
    default:
      TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

// The data of t as the storage type of Format (t has the format's dtype).
template <typename Format>
const typename Format::Storage* storage_ptr(const at::Tensor& t) {
  return static_cast<const typename Format::Storage*>(t.const_data_ptr());
}
template <typename Format>
typename Format::Storage* mutable_storage_ptr(at::Tensor& t) {
  return static_cast<typename Format::Storage*>(t.mutable_data_ptr());
}

// Threads per block for a row of n entries read `vec` at a time: at least 4 vector steps per
// thread, and at most kMaxThreads (smaller blocks pack the SMs more finely).
inline int row_threads(int64_t n, int vec) {
  const int64_t steps = (n + vec - 1) / vec;
  return steps >= 4 * kMaxThreads ? kMaxThreads : 128;
}

// ------------------------------------------------------------------------------------------------
// Device helpers

// p[i] = in[i] converted to Format for i < W; p aligned as for load_vec.
template <typename Format, int W>
__device__ __forceinline__ void store_floats(typename Format::Storage* p, const float (&in)[W]) {
  AlignedVec<typename Format::Storage, W> v;
#pragma unroll
  for (int i = 0; i < W; ++i) v.val[i] = Format::from_float(in[i]);
  store_vec<W>(p, v);
}

// Writes n zeros to the contiguous row p (the gradient of an invalid / ignored row): all-zero
// bits are +0 in every format. Nothing is loaded: the "chunk" handed to consume is its width.
template <typename S>
__device__ __forceinline__ void zero_row(S* p, int64_t n) {
  constexpr int VEC = 16 / sizeof(S);
  sweep_row<VEC>(
      n, plan_sweep<VEC>(n, vec_head<VEC>(p, n), false), threadIdx.x, blockDim.x,
      [](int64_t, auto width) { return width; },
      [&](int64_t j, auto width) { store_vec(p + j, AlignedVec<S, decltype(width)::value>{}); });
}

// Reduces acc over the block (blockDim.x a multiple of 32); every thread gets the result.
// op provides identity() and combine(a, b), acc provides shfl_xor(lane_mask). Safe to call
// repeatedly.
template <typename Acc, typename Op>
__device__ __forceinline__ Acc block_reduce(Acc acc, const Op& op) {
  __shared__ Acc partial[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc = op.combine(acc, acc.shfl_xor(offset));
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  acc = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : op.identity();
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc = op.combine(acc, acc.shfl_xor(offset));
  __syncthreads();  // partial may be overwritten by the next call
  return acc;
}

}  // namespace klops
