// Log-softmax-gather and entropy (SPEC.md §2): the CUDA twin of kernels/logprobs.py.
//
// One thread block handles one row (token) r = b * L + l. With x = z/T, lse = logsumexp(x),
// q = softmax(x) and y the label of the row:
//
//     logprob = x_y - lse                     d logprob / dz_j = (1[j = y] - q_j) / T
//     entropy = lse - sum_v q_v x_v           d entropy / dz_j = -q_j (log q_j + entropy) / T
//
// Forward: 1 sweep of the online (m, s, w) below. Backward: 1 sweep from the saved lse and entropy.
// Rows whose label is ignore_index get logprob 0, entropy 0, lse 0 and a zero gradient.

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "row_reduce.cuh"

namespace klops {
namespace {

template <typename T>
constexpr int kLogprobsVec = 16 / sizeof(T);  // entries per 16-byte access

// Online log-sum-exp plus w = sum exp(x - m) (x - m), kept relative to the running max m so that
// logits of magnitude 1e4 lose no precision: lse = m + log s, entropy = log s - w / s.
struct EntropyAcc {
  float m;
  float s;
  float w;

  static __device__ __forceinline__ EntropyAcc identity() { return {kNegInf, 0.0f, 0.0f}; }

  // As LseAcc::push, with d = (old m - x) when x is the new max (rescale: w = e^d (w + d s)),
  // else d = x - m (w += e^d d); d = -inf (an empty accumulator or a -inf entry) adds nothing.
  __device__ __forceinline__ void push(float x) {
    const bool up = x > m;
    const float m_new = up ? x : m;
    const float d = (up ? m : x) - finite_or_zero(m_new);
    const float e = expf(d);
    const float d_safe = finite_or_zero(d);
    w = up ? e * (w + d_safe * s) : w + e * d_safe;
    s = up ? fmaf(s, e, 1.0f) : s + e;
    m = m_new;
  }

  // Both sides moved to the common max M: s = sum e^(m_i - M) s_i,
  // w = sum e^(m_i - M) (w_i + (m_i - M) s_i) (the shift is 0 for an empty side).
  static __device__ __forceinline__ EntropyAcc combine(const EntropyAcc& a, const EntropyAcc& b) {
    const float m = fmaxf(a.m, b.m);
    const float m_safe = finite_or_zero(m);
    const float ea = expf(a.m - m_safe);
    const float eb = expf(b.m - m_safe);
    const float shift_a = a.m == kNegInf ? 0.0f : a.m - m_safe;
    const float shift_b = b.m == kNegInf ? 0.0f : b.m - m_safe;
    return {m, a.s * ea + b.s * eb, ea * (a.w + shift_a * a.s) + eb * (b.w + shift_b * b.s)};
  }

  __device__ __forceinline__ EntropyAcc shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, m, lane_mask), __shfl_xor_sync(0xffffffffu, s, lane_mask),
            __shfl_xor_sync(0xffffffffu, w, lane_mask)};
  }

  __device__ __forceinline__ float lse() const { return finite_or_zero(m) + logf(s); }
  __device__ __forceinline__ float entropy() const { return logf(s) - w / s; }
};

// Forward of row r = blockIdx.x, 1 sweep: lse = logsumexp_v(z_v / T), logprob = z_y / T - lse and,
// WITH_ENTROPY, entropy = log s - w / s from the (m, s, w) of EntropyAcc. Zeros for an ignored row.
template <typename T, typename Label, bool WITH_ENTROPY>
__global__ void __launch_bounds__(kMaxThreads) logprobs_forward_kernel(
    const T* __restrict__ z, const Label* __restrict__ labels, float* __restrict__ logp_out,
    float* __restrict__ entropy_out, float* __restrict__ lse_out, int64_t L, int64_t V,
    int64_t stride_zb, int64_t stride_zl, float inv_temperature, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t label = static_cast<int64_t>(labels[row]);
  if (label == ignore_index) {
    if (threadIdx.x == 0) {
      logp_out[row] = 0.0f;
      lse_out[row] = 0.0f;
      if constexpr (WITH_ENTROPY) entropy_out[row] = 0.0f;
    }
    return;
  }
  CUDA_KERNEL_ASSERT(0 <= label && label < V);
  const T* z_row = z + (row / L) * stride_zb + (row % L) * stride_zl;
  // Thread 0 fetches the label's logit up front: the sweep hides the latency.
  const float x_label = threadIdx.x == 0 ? static_cast<float>(z_row[label]) * inv_temperature : 0.0f;
  constexpr int VEC = kLogprobsVec<T>;
  const int64_t head = vec_head<VEC>(z_row, V);

  using Acc = std::conditional_t<WITH_ENTROPY, EntropyAcc, LseAcc>;
  Acc acc = Acc::identity();
  const auto load = [&](int64_t j, auto width) { return load_vec<decltype(width)::value>(z_row + j); };
  sweep_row<VEC>(V, head, is_vec_aligned<VEC>(z_row + head), load, [&](int64_t, auto zv) {
#pragma unroll
    for (int i = 0; i < decltype(zv)::kWidth; ++i) acc.push(zv.get(i) * inv_temperature);
  });
  acc = block_reduce(acc);
  if (threadIdx.x == 0) {
    const float lse = acc.lse();
    logp_out[row] = x_label - lse;
    lse_out[row] = lse;
    if constexpr (WITH_ENTROPY) entropy_out[row] = acc.entropy();
  }
}

// Backward of row r = blockIdx.x, 1 sweep, with log q_j = z_j / T - lse:
//   dz_j = g_logp / T (1[j = y] - q_j) - g_entropy / T q_j (log q_j + entropy)   (q_j > 0)
// where the entropy term is present WITH_ENTROPY only. Zeros for an ignored row.
template <typename T, typename Label, bool WITH_ENTROPY>
__global__ void __launch_bounds__(kMaxThreads) logprobs_backward_kernel(
    const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
    const T* __restrict__ z, const Label* __restrict__ labels, const float* __restrict__ lse_in,
    const float* __restrict__ entropy_in, T* __restrict__ dz, int64_t L, int64_t V,
    int64_t stride_zb, int64_t stride_zl, float inv_temperature, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  T* dz_row = dz + row * V;
  const int64_t label = static_cast<int64_t>(labels[row]);
  if (label == ignore_index) {
    zero_row(dz_row, V);
    return;
  }
  const T* z_row = z + (row / L) * stride_zb + (row % L) * stride_zl;
  constexpr int VEC = kLogprobsVec<T>;
  const int64_t head = vec_head<VEC>(z_row, V);
  const bool vectorized = is_vec_aligned<VEC>(z_row + head) && is_vec_aligned<VEC>(dz_row + head);

  const float lse = lse_in[row];
  const float g_logp = grad_logp[row] * inv_temperature;
  float g_entropy = 0.0f;
  float entropy = 0.0f;
  if constexpr (WITH_ENTROPY) {
    g_entropy = grad_entropy[row] * inv_temperature;
    entropy = entropy_in[row];
  }
  const auto load = [&](int64_t j, auto width) { return load_vec<decltype(width)::value>(z_row + j); };
  sweep_row<VEC>(V, head, vectorized, load, [&](int64_t j, auto zv) {
    constexpr int W = decltype(zv)::kWidth;
    float out[W];
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float log_q = zv.get(i) * inv_temperature - lse;
      const float q = expf(log_q);
      out[i] = g_logp * ((j + i == label ? 1.0f : 0.0f) - q);
      if constexpr (WITH_ENTROPY) out[i] -= g_entropy * (q > 0.0f ? q * (log_q + entropy) : 0.0f);
    }
    store_floats<W>(dz_row + j, out);
  });
}

// ------------------------------------------------------------------------------------------------
// Host side

// Calls f(Label{}) with Label the C++ type of the labels (int64 or int32, checked by the caller).
template <typename F>
void dispatch_label(at::ScalarType dtype, F&& f) {
  if (dtype == at::kLong) return f(int64_t{});
  TORCH_INTERNAL_ASSERT(dtype == at::kInt, "unexpected label dtype ", dtype);
  f(int32_t{});
}

void check_logprobs_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  check_rows(logits, "logits");
  check_per_row(labels, "labels", logits.sizes().slice(0, 2), logits.device(),
                {at::kLong, at::kInt});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits,
                                                                const at::Tensor& labels,
                                                                double temperature,
                                                                bool with_entropy,
                                                                int64_t ignore_index) {
  check_logprobs_inputs(logits, labels);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(logits));
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  const auto options = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({B, L}, options);
  at::Tensor lse = at::empty({B, L}, options);
  at::Tensor entropy = with_entropy ? at::empty({B, L}, options) : at::zeros({B, L}, options);
  if (B * L == 0) return {logp, entropy, lse};

  const at::Tensor labels_c = labels.contiguous();
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(logits.scalar_type(), [&](auto z) {
    using T = decltype(z);
    dispatch_label(labels_c.scalar_type(), [&](auto y) {
      using Label = decltype(y);
      dispatch_index<2>(with_entropy, [&](auto with_entropy_c) {
        const int threads = row_threads(V, kLogprobsVec<T>);
        logprobs_forward_kernel<T, Label, decltype(with_entropy_c)::value == 1>
            <<<static_cast<unsigned>(B * L), threads, 0, stream>>>(
                logits.const_data_ptr<T>(), labels_c.const_data_ptr<Label>(),
                logp.mutable_data_ptr<float>(), entropy.mutable_data_ptr<float>(),
                lse.mutable_data_ptr<float>(), L, V, logits.stride(0), logits.stride(1),
                inv_temperature, ignore_index);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {logp, entropy, lse};
}

at::Tensor logprobs_backward(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                             bool with_entropy, int64_t ignore_index) {
  check_logprobs_inputs(logits, labels);
  const auto rows_shape = logits.sizes().slice(0, 2);
  check_per_row(grad_logp, "grad_logp", rows_shape, logits.device(), {at::kFloat});
  check_per_row(lse, "lse", rows_shape, logits.device(), {at::kFloat});
  if (with_entropy) {  // otherwise grad_entropy and entropy are not read
    check_per_row(grad_entropy, "grad_entropy", rows_shape, logits.device(), {at::kFloat});
    check_per_row(entropy, "entropy", rows_shape, logits.device(), {at::kFloat});
  }
  const at::cuda::OptionalCUDAGuard device_guard(device_of(logits));
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  at::Tensor dz = at::empty({B, L, V}, logits.options());
  if (B * L == 0) return dz;

  const at::Tensor grad_logp_c = grad_logp.contiguous();
  const at::Tensor labels_c = labels.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor grad_entropy_c = with_entropy ? grad_entropy.contiguous() : at::Tensor();
  const at::Tensor entropy_c = with_entropy ? entropy.contiguous() : at::Tensor();
  const float* grad_entropy_ptr = with_entropy ? grad_entropy_c.const_data_ptr<float>() : nullptr;
  const float* entropy_ptr = with_entropy ? entropy_c.const_data_ptr<float>() : nullptr;
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(logits.scalar_type(), [&](auto z) {
    using T = decltype(z);
    dispatch_label(labels_c.scalar_type(), [&](auto y) {
      using Label = decltype(y);
      dispatch_index<2>(with_entropy, [&](auto with_entropy_c) {
        const int threads = row_threads(V, kLogprobsVec<T>);
        logprobs_backward_kernel<T, Label, decltype(with_entropy_c)::value == 1>
            <<<static_cast<unsigned>(B * L), threads, 0, stream>>>(
                grad_logp_c.const_data_ptr<float>(), grad_entropy_ptr, logits.const_data_ptr<T>(),
                labels_c.const_data_ptr<Label>(), lse_c.const_data_ptr<float>(), entropy_ptr,
                dz.mutable_data_ptr<T>(), L, V, logits.stride(0), logits.stride(1),
                inv_temperature, ignore_index);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return dz;
}

}  // namespace
}  // namespace klops

TORCH_LIBRARY_IMPL(klops_C, CUDA, m) {
  m.impl("logprobs_forward", &klops::logprobs_forward);
  m.impl("logprobs_backward", &klops::logprobs_backward);
}
