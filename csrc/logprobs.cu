// Log-softmax-gather and entropy (docs/losses.md §2): the CUDA twin of kernels/logprobs.py.
//
// One thread block handles one row (token) r = b * L + l. With c = 1/T, the raw row max (max_z) and
// the shifted log-sum of online_stats.cuh (Lse), q = softmax(z c) and y the label of the row:
//
//     log q_j = (z_j - max_z) c - logsum       logsum = log sum_v exp((z_v - max_z) c)
//     logprob = log q_y                        d logprob / dz_j = (1[j = y] - q_j) / T
//     entropy = -sum_v q_v log q_v             d entropy / dz_j = -q_j (log q_j + entropy) / T
//
// and, WITH_STATS, three outputs without gradient (TRL's fused LM head returns them):
//
//     log_sum_sq = log sum_v q_v^2 = log sum_v exp((z_v - max_z) 2c) - 2 logsum
//     mean_logit = c sum_v z_v / V
//     is_top1    = 1 iff y is the row's first argmax: z_y >= max_z and z_y > max_{j < y} z_j, else 0
//
// Forward: 1 sweep of the online (m, s, w) of Entropy (or (m, s) of Lse without the entropy), and
// WITH_STATS the (m, s2, sum, before) of RowStats pushed beside it in the same sweep (no second read):
// it reads V logits and writes 3 fp32 per row (4 with the entropy, 3 more with the stats).
// Backward: 1 sweep from the saved max_z, logsum and entropy: it reads V logits and writes V gradient
// entries per row. Rows whose label is ignore_index get 0 in every output and a zero gradient.

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

template <typename Format>
constexpr int kLogprobsVec = 16 / sizeof(typename Format::Storage);  // entries per 16-byte access

// Forward of row r = blockIdx.x, 1 sweep: max_z and logsum of the row (Lse), logprob =
// (z_y - max_z) c - logsum and, WITH_ENTROPY, entropy = log s - w / s from the (m, s, w) of
// Entropy; WITH_STATS, log_sum_sq, mean_logit and is_top1 from RowStats. Zeros for an ignored row.
template <typename Format, typename Label, bool WITH_ENTROPY, bool WITH_STATS>
__global__ void __launch_bounds__(kMaxThreads) logprobs_forward_kernel(
    const typename Format::Storage* __restrict__ z,  // (B, L, V) logits, last-dim stride 1
    const Label* __restrict__ labels,                // (B*L,)
    float* __restrict__ logp_out,                    // (B*L,) out
    float* __restrict__ entropy_out,                 // (B*L,) out (untouched unless WITH_ENTROPY)
    float* __restrict__ max_out,                     // (B*L,) out
    float* __restrict__ logsum_out,                  // (B*L,) out
    float* __restrict__ log_sum_sq_out,              // (B*L,) out (untouched unless WITH_STATS)
    float* __restrict__ mean_logit_out,              // (B*L,) out (untouched unless WITH_STATS)
    float* __restrict__ is_top1_out,                 // (B*L,) out, 0 or 1 (untouched unless WITH_STATS)
    int64_t L, int64_t V, int64_t stride_zb, int64_t stride_zl, float inv_temperature,
    int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t label = static_cast<int64_t>(labels[row]);
  if (label == ignore_index) {
    if (threadIdx.x == 0) {
      logp_out[row] = 0.0f;
      max_out[row] = 0.0f;
      logsum_out[row] = 0.0f;
      if constexpr (WITH_ENTROPY) entropy_out[row] = 0.0f;
      if constexpr (WITH_STATS) {
        log_sum_sq_out[row] = 0.0f;
        mean_logit_out[row] = 0.0f;
        is_top1_out[row] = 0.0f;
      }
    }
    return;
  }
  // Python checks the labels first (on the device, without a sync); a label outside [0, V) is never
  // read even where device asserts are compiled out (TORCH_DISABLE_GPU_ASSERTS): its log-prob is NaN.
  const bool label_in_range = 0 <= label && label < V;
  CUDA_KERNEL_ASSERT(label_in_range);
  const auto* z_row = z + (row / L) * stride_zb + (row % L) * stride_zl;
  // Thread 0 fetches the label's logit up front: the sweep hides the latency.
  const float z_label = threadIdx.x != 0     ? 0.0f
                        : label_in_range     ? Format::to_float(z_row[label])
                                             : std::numeric_limits<float>::quiet_NaN();
  constexpr int VEC = kLogprobsVec<Format>;
  const SweepPlan plan = plan_sweep<VEC>(V, vec_head<VEC>(z_row, V), false);  // z sets the alignment
  const RowReader<VEC, typename Format::Storage> load{z_row, false};

  using Op = std::conditional_t<WITH_ENTROPY, EntropyOp, LseOp>;
  const Op op{inv_temperature};
  typename Op::Acc acc = op.identity();
  const RowStatsOp stats_op{2.0f * inv_temperature};
  [[maybe_unused]] RowStats stats = stats_op.identity();
  sweep_row<VEC>(V, plan, threadIdx.x, blockDim.x, load, [&](int64_t j, auto zv) {
#pragma unroll
    for (int i = 0; i < decltype(zv)::kWidth; ++i) {
      const float zi = Format::to_float(zv.val[i]);
      const float e = op.push(acc, zi);
      if constexpr (WITH_STATS) stats_op.push_squared(stats, zi, e, j + i < label);
    }
  });
  acc = block_reduce(acc, op);
  if constexpr (WITH_STATS) stats = block_reduce(stats, stats_op);
  if (threadIdx.x == 0) {
    const float max_z = acc.max();
    const float logsum = acc.logsum();
    logp_out[row] = (z_label - max_z) * inv_temperature - logsum;
    max_out[row] = max_z;
    logsum_out[row] = logsum;
    if constexpr (WITH_ENTROPY) entropy_out[row] = acc.entropy();
    if constexpr (WITH_STATS) {
      log_sum_sq_out[row] = stats.log_sum_sq(logsum);
      mean_logit_out[row] = stats.sum * inv_temperature / static_cast<float>(V);
      is_top1_out[row] = stats.is_top1(z_label, max_z) ? 1.0f : 0.0f;
    }
  }
}

// Backward of row r = blockIdx.x, 1 sweep, with log q_j = (z_j - max_z) c - logsum:
//   dz_j = g_logp c (1[j = y] - q_j) - g_entropy c q_j (log q_j + entropy)   (0 where q_j = 0)
// where the entropy term is present WITH_ENTROPY only. Zeros for an ignored row.
template <typename Format, typename Label, bool WITH_ENTROPY>
__global__ void __launch_bounds__(kMaxThreads) logprobs_backward_kernel(
    const float* __restrict__ grad_logp,             // (B*L,)
    const float* __restrict__ grad_entropy,          // (B*L,) (read WITH_ENTROPY only)
    const typename Format::Storage* __restrict__ z,  // (B, L, V) logits, last-dim stride 1
    const Label* __restrict__ labels,                // (B*L,)
    const float* __restrict__ max_in,                // (B*L,)
    const float* __restrict__ logsum_in,             // (B*L,)
    const float* __restrict__ entropy_in,            // (B*L,) (read WITH_ENTROPY only)
    typename Format::Storage* __restrict__ dz,       // (B*L, V) out, contiguous, logits dtype
    int64_t L, int64_t V, int64_t stride_zb, int64_t stride_zl, float inv_temperature,
    int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  auto* dz_row = dz + row * V;
  const int64_t label = static_cast<int64_t>(labels[row]);
  if (label == ignore_index) {
    zero_row(dz_row, V);
    return;
  }
  const auto* z_row = z + (row / L) * stride_zb + (row % L) * stride_zl;
  constexpr int VEC = kLogprobsVec<Format>;
  const int64_t head = vec_head<VEC>(dz_row, V);  // the stored row sets the alignment
  const auto load = row_reader<VEC>(z_row, head);
  const SweepPlan plan = plan_sweep<VEC>(V, head, load.shifted);

  const float max_z = max_in[row];
  const float logsum = logsum_in[row];
  const float g_logp = grad_logp[row] * inv_temperature;
  float g_entropy = 0.0f;
  float entropy = 0.0f;
  if constexpr (WITH_ENTROPY) {
    g_entropy = grad_entropy[row] * inv_temperature;
    entropy = entropy_in[row];
  }
  sweep_row<VEC>(V, plan, threadIdx.x, blockDim.x, load, [&](int64_t j, auto zv) {
    constexpr int W = decltype(zv)::kWidth;
    float out[W];
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float log_q = (Format::to_float(zv.val[i]) - max_z) * inv_temperature - logsum;
      const float q = expf(log_q);
      out[i] = g_logp * ((j + i == label ? 1.0f : 0.0f) - q);
      if constexpr (WITH_ENTROPY) out[i] -= g_entropy * (q > 0.0f ? q * (log_q + entropy) : 0.0f);
    }
    store_floats<Format>(dz_row + j, out);
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

// Calls f(format, Label{}, with_entropy_c): one of the 3 x 2 x 2 kernel instantiations (the forward
// doubles them with its own dispatch of with_stats).
template <typename F>
void dispatch_logprobs(const at::Tensor& logits, const at::Tensor& labels, bool with_entropy,
                       F&& f) {
  dispatch_format(logits.scalar_type(), [&](auto format) {
    dispatch_label(labels.scalar_type(), [&](auto label) {
      dispatch_index<2>(with_entropy,
                        [&](auto with_entropy_c) { f(format, label, with_entropy_c); });
    });
  });
}

void check_logprobs_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  check_rows(logits, "logits");
  check_per_row(labels, "labels", logits.sizes().slice(0, 2), logits.device(),
                {at::kLong, at::kInt});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
logprobs_forward(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                 bool with_entropy, bool with_stats, int64_t ignore_index) {
  check_logprobs_inputs(logits, labels);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(logits));
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  const auto options = logits.options().dtype(at::kFloat);
  // Outputs the kernel does not write (the entropy, the stats when not asked) are zeros.
  const auto rows = [&](bool written) {
    return written ? at::empty({B, L}, options) : at::zeros({B, L}, options);
  };
  at::Tensor logp = rows(true);
  at::Tensor entropy = rows(with_entropy);
  at::Tensor max_z = rows(true);
  at::Tensor logsum = rows(true);
  at::Tensor log_sum_sq = rows(with_stats);
  at::Tensor mean_logit = rows(with_stats);
  at::Tensor is_top1 = rows(with_stats);
  if (B * L == 0) return {logp, entropy, max_z, logsum, log_sum_sq, mean_logit, is_top1};

  const at::Tensor labels_c = labels.contiguous();
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto format, auto label, auto with_entropy_c) {
    using Format = decltype(format);
    using Label = decltype(label);
    const int threads = row_threads(V, kLogprobsVec<Format>);
    dispatch_index<2>(with_stats, [&](auto with_stats_c) {
      logprobs_forward_kernel<Format, Label, decltype(with_entropy_c)::value == 1,
                              decltype(with_stats_c)::value == 1>
          <<<static_cast<unsigned>(B * L), threads, 0, stream>>>(
              storage_ptr<Format>(logits), labels_c.const_data_ptr<Label>(),
              logp.mutable_data_ptr<float>(), entropy.mutable_data_ptr<float>(),
              max_z.mutable_data_ptr<float>(), logsum.mutable_data_ptr<float>(),
              log_sum_sq.mutable_data_ptr<float>(), mean_logit.mutable_data_ptr<float>(),
              is_top1.mutable_data_ptr<float>(), L, V, logits.stride(0), logits.stride(1),
              inv_temperature, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
  dispatch_logprobs(logits, labels_c, with_entropy, launch);
  return {logp, entropy, max_z, logsum, log_sum_sq, mean_logit, is_top1};
}

at::Tensor logprobs_backward(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& max_z, const at::Tensor& logsum,
                             const at::Tensor& entropy, double temperature, bool with_entropy,
                             int64_t ignore_index) {
  check_logprobs_inputs(logits, labels);
  const auto rows_shape = logits.sizes().slice(0, 2);
  check_per_row(grad_logp, "grad_logp", rows_shape, logits.device(), {at::kFloat});
  check_per_row(max_z, "max", rows_shape, logits.device(), {at::kFloat});
  check_per_row(logsum, "logsum", rows_shape, logits.device(), {at::kFloat});
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
  const at::Tensor max_c = max_z.contiguous();
  const at::Tensor logsum_c = logsum.contiguous();
  const at::Tensor grad_entropy_c = with_entropy ? grad_entropy.contiguous() : at::Tensor();
  const at::Tensor entropy_c = with_entropy ? entropy.contiguous() : at::Tensor();
  const float* grad_entropy_ptr = with_entropy ? grad_entropy_c.const_data_ptr<float>() : nullptr;
  const float* entropy_ptr = with_entropy ? entropy_c.const_data_ptr<float>() : nullptr;
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto format, auto label, auto with_entropy_c) {
    using Format = decltype(format);
    using Label = decltype(label);
    const int threads = row_threads(V, kLogprobsVec<Format>);
    logprobs_backward_kernel<Format, Label, decltype(with_entropy_c)::value == 1>
        <<<static_cast<unsigned>(B * L), threads, 0, stream>>>(
            grad_logp_c.const_data_ptr<float>(), grad_entropy_ptr, storage_ptr<Format>(logits),
            labels_c.const_data_ptr<Label>(), max_c.const_data_ptr<float>(),
            logsum_c.const_data_ptr<float>(), entropy_ptr, mutable_storage_ptr<Format>(dz), L, V,
            logits.stride(0), logits.stride(1), inv_temperature, ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  dispatch_logprobs(logits, labels_c, with_entropy, launch);
  return dz;
}

}  // namespace
}  // namespace klops

TORCH_LIBRARY_IMPL(klops_C, CUDA, m) {
  m.impl("logprobs_forward", &klops::logprobs_forward);
  m.impl("logprobs_backward", &klops::logprobs_backward);
}
