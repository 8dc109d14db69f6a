// Shared pieces of the row kernels of klops._C: one thread block streams one row of V entries.
//
//   - host: input checks, the fp32/bf16/fp16 dtype dispatch and the block size for a row of V;
//   - device: loads/stores of W consecutive entries (one 16-byte access when W > 1), the row
//     sweep (scalar head up to the first aligned entry, vector body, scalar tail), the online
//     log-sum-exp accumulator and a block-wide reduction of any accumulator with combine/shfl_xor.
//
// Offsets into the (B, L, V) tensors are int64: B * L * V exceeds 2^31 for LLM vocabularies.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>

namespace klops {

constexpr int kMaxThreads = 256;  // block size cap of every row kernel (a multiple of 32, <= 1024)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

// Calls f(T{}) with T the C++ type of a float dtype (float, at::BFloat16, at::Half).
template <typename F>
void dispatch_float(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    case at::kHalf:
      return f(at::Half{});
    default:
      TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
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

template <int W>
using Width = std::integral_constant<int, W>;

// W consecutive entries of a row as stored; one 16-byte (or 8-byte) access when W > 1.
template <typename T, int W>
struct alignas(sizeof(T) * W) AlignedVec {
  static constexpr int kWidth = W;
  T val[W];

  __device__ __forceinline__ float get(int i) const { return static_cast<float>(val[i]); }
};

// p[0 .. W); p is aligned to W * sizeof(T) bytes.
template <int W, typename T>
__device__ __forceinline__ AlignedVec<T, W> load_vec(const T* p) {
  return *reinterpret_cast<const AlignedVec<T, W>*>(p);
}

// p[i] = T(in[i]) (round to nearest even) for i < W; same alignment as load_vec.
template <int W, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[W]) {
  AlignedVec<T, W> v;
#pragma unroll
  for (int i = 0; i < W; ++i) v.val[i] = static_cast<T>(in[i]);
  *reinterpret_cast<AlignedVec<T, W>*>(p) = v;
}

template <int VEC, typename T>
__device__ __forceinline__ bool is_vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (VEC * sizeof(T)) == 0;
}

// Entries before the first VEC-aligned entry of p, at most n.
template <int VEC, typename T>
__device__ __forceinline__ int64_t vec_head(const T* p, int64_t n) {
  const int64_t misaligned = static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % VEC);
  return min(n, (VEC - misaligned) % VEC);
}

// Streams a row of n entries through the block: consume(j, load(j, Width<W>{})) for the entries
// [j, j + W). Entries [0, head) and the tail go one at a time, the body in between VEC at a time,
// two vectors per thread and step so that both loads are in flight before either is consumed.
// With vectorized false (a row pointer not VEC-aligned after the head) every entry goes alone.
template <int VEC, typename Load, typename Consume>
__device__ __forceinline__ void sweep_row(int64_t n, int64_t head, bool vectorized, Load&& load,
                                          Consume&& consume) {
  if (!vectorized) head = n;
  const int64_t body_end = head + (n - head) / VEC * VEC;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) consume(j, load(j, Width<1>{}));
  const int64_t stride = int64_t{blockDim.x} * VEC;
  int64_t j = head + int64_t{threadIdx.x} * VEC;
  for (; j + stride < body_end; j += 2 * stride) {
    const auto first = load(j, Width<VEC>{});
    const auto second = load(j + stride, Width<VEC>{});
    consume(j, first);
    consume(j + stride, second);
  }
  if (j < body_end) consume(j, load(j, Width<VEC>{}));
  for (j = body_end + threadIdx.x; j < n; j += blockDim.x) consume(j, load(j, Width<1>{}));
}

// Writes n zeros to the contiguous row p (the gradient of an invalid / ignored row). Nothing is
// loaded: the "chunk" handed to consume is just its width.
template <typename T>
__device__ __forceinline__ void zero_row(T* p, int64_t n) {
  constexpr int VEC = 16 / sizeof(T);
  sweep_row<VEC>(
      n, vec_head<VEC>(p, n), true, [](int64_t, auto width) { return width; },
      [&](int64_t j, auto width) {
        constexpr int W = decltype(width)::value;
        float zeros[W] = {};
        store_floats<W>(p + j, zeros);
      });
}

__device__ __forceinline__ float finite_or_zero(float m) { return m == kNegInf ? 0.0f : m; }

// Online log-sum-exp: m = max x, s = sum exp(x - m); lse = m + log s (-inf for an empty row).
struct LseAcc {
  float m;
  float s;

  static __device__ __forceinline__ LseAcc identity() { return {kNegInf, 0.0f}; }

  // Folds x in with one exp: exp(old m - x) rescales s when x is the new max, else s += exp(x - m).
  // A NaN x is never "up", so it makes s NaN; -inf entries leave (m, s) unchanged.
  __device__ __forceinline__ void push(float x) {
    const bool up = x > m;
    const float m_new = up ? x : m;
    const float e = expf((up ? m : x) - finite_or_zero(m_new));
    s = up ? fmaf(s, e, 1.0f) : s + e;
    m = m_new;
  }

  static __device__ __forceinline__ LseAcc combine(const LseAcc& a, const LseAcc& b) {
    const float m = fmaxf(a.m, b.m);
    const float m_safe = finite_or_zero(m);
    return {m, a.s * expf(a.m - m_safe) + b.s * expf(b.m - m_safe)};
  }

  __device__ __forceinline__ LseAcc shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, m, lane_mask), __shfl_xor_sync(0xffffffffu, s, lane_mask)};
  }

  __device__ __forceinline__ float lse() const { return finite_or_zero(m) + logf(s); }
};

// Reduces acc over the block (blockDim.x a multiple of 32); every thread gets the result.
// Acc provides identity(), combine(a, b) and shfl_xor(lane_mask). Safe to call repeatedly.
template <typename Acc>
__device__ __forceinline__ Acc block_reduce(Acc acc) {
  __shared__ Acc partial[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc = Acc::combine(acc, acc.shfl_xor(offset));
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  acc = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : Acc::identity();
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc = Acc::combine(acc, acc.shfl_xor(offset));
  __syncthreads();  // partial may be overwritten by the next call
  return acc;
}

}  // namespace klops
