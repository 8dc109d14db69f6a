// Shared pieces of the row kernels of klops._C: one thread block streams one row of V entries.
//
//   - host: input checks, the dispatch from a float dtype to its storage format, the block size;
//   - device: the storage formats (fp32, bf16, fp16 and their conversions), the online log-sum-exp
//     accumulators in raw logit units and a block-wide reduction of any accumulator with
//     combine/shfl_xor. The row sweep and its vector loads / stores are in row_sweep.cuh.
//
// Offsets into the (B, L, V) tensors are int64: B * L * V exceeds 2^31 for LLM vocabularies.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "row_sweep.cuh"

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>

namespace klops {

constexpr int kMaxThreads = 256;  // block size cap of every row kernel (a multiple of 32, <= 1024)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

template <typename F, int... Is>
void dispatch_index_impl(int64_t value, F& f, std::integer_sequence<int, Is...>) {
  (void)((value == Is ? (f(std::integral_constant<int, Is>{}), true) : false) || ...);
}

// Calls f(std::integral_constant<int, value>{}) for 0 <= value < N (checked by the caller).
template <int N, typename F>
void dispatch_index(int64_t value, F&& f) {
  TORCH_INTERNAL_ASSERT(0 <= value && value < N, "index ", value, " out of [0, ", N, ")");
  dispatch_index_impl(value, f, std::make_integer_sequence<int, N>{});
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

__device__ __forceinline__ float finite_or_zero(float m) { return m == kNegInf ? 0.0f : m; }

// Online log-sum-exp of the scaled row x = z c (c = 1/T) in raw units: m = max z (before the
// scale), s = sum exp((z - m) c). The kernels keep m and log s apart, as the row's
//     max = m (0 when m = -inf),   logsum = log s   (-inf for an empty or all -inf row)
// and form log softmax(x) = (z - max) c - logsum: z - max is exact near the max (Sterbenz), where
// z c - logsumexp(x) would carry the rounding error eps |z c| of both terms.
struct Lse {
  float m;
  float s;

  __device__ __forceinline__ Lse shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, m, lane_mask), __shfl_xor_sync(0xffffffffu, s, lane_mask)};
  }
  __device__ __forceinline__ float max() const { return finite_or_zero(m); }
  __device__ __forceinline__ float logsum() const { return logf(s); }
};

// The operations on Lse for the scale c: identity, push of one raw entry, combine (block_reduce).
struct LseOp {
  using Acc = Lse;
  float c;  // 1 / T

  __device__ __forceinline__ Lse identity() const { return {kNegInf, 0.0f}; }

  // Folds z in with one exp: on a new max z, exp((old m - z) c) rescales s; else
  // s += exp((z - m) c). A NaN z is never "up", so it makes s NaN; -inf entries change nothing.
  __device__ __forceinline__ void push(Lse& a, float z) const {
    const bool up = z > a.m;
    const float m_new = up ? z : a.m;
    const float e = expf(((up ? a.m : z) - finite_or_zero(m_new)) * c);
    a.s = up ? fmaf(a.s, e, 1.0f) : a.s + e;
    a.m = m_new;
  }

  __device__ __forceinline__ Lse combine(const Lse& a, const Lse& b) const {
    const float m = fmaxf(a.m, b.m);
    const float m_safe = finite_or_zero(m);
    return {m, a.s * expf((a.m - m_safe) * c) + b.s * expf((b.m - m_safe) * c)};
  }
};

// Lse plus w = sum exp(d) d with d = (z - m) c, relative to the running raw max m: the row's
// entropy H = log s - w / s (docs/losses.md §2).
struct Entropy {
  float m;
  float s;
  float w;

  __device__ __forceinline__ Entropy shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, m, lane_mask), __shfl_xor_sync(0xffffffffu, s, lane_mask),
            __shfl_xor_sync(0xffffffffu, w, lane_mask)};
  }
  __device__ __forceinline__ float max() const { return finite_or_zero(m); }
  __device__ __forceinline__ float logsum() const { return logf(s); }
  __device__ __forceinline__ float entropy() const { return logf(s) - w / s; }
};

struct EntropyOp {
  using Acc = Entropy;
  float c;  // 1 / T

  __device__ __forceinline__ Entropy identity() const { return {kNegInf, 0.0f, 0.0f}; }

  // As LseOp::push. On a new max z, with d = (old m - z) c: w = exp(d) (w + d s), the shift d
  // taken as 0 when old m = -inf (s = w = 0 then); the new entry adds exp(0) 0. Else, with
  // d = (z - m) c: w += exp(d) d, nothing for d = -inf (a -inf entry).
  __device__ __forceinline__ void push(Entropy& a, float z) const {
    const bool up = z > a.m;
    const float m_new = up ? z : a.m;
    const float d = ((up ? a.m : z) - finite_or_zero(m_new)) * c;
    const float e = expf(d);
    const float d_safe = finite_or_zero(d);
    a.w = up ? e * (a.w + d_safe * a.s) : a.w + e * d_safe;
    a.s = up ? fmaf(a.s, e, 1.0f) : a.s + e;
    a.m = m_new;
  }

  // Both sides moved to the common max M: with r_i = exp((m_i - M) c) and the shift
  // (m_i - M) c (0 for an empty side), s = sum r_i s_i, w = sum r_i (w_i + shift_i s_i).
  __device__ __forceinline__ Entropy combine(const Entropy& a, const Entropy& b) const {
    const float m = fmaxf(a.m, b.m);
    const float m_safe = finite_or_zero(m);
    const float shift_a = a.m == kNegInf ? 0.0f : (a.m - m_safe) * c;
    const float shift_b = b.m == kNegInf ? 0.0f : (b.m - m_safe) * c;
    const float ra = expf((a.m - m_safe) * c);
    const float rb = expf((b.m - m_safe) * c);
    return {m, a.s * ra + b.s * rb, ra * (a.w + shift_a * a.s) + rb * (b.w + shift_b * b.s)};
  }
};

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
