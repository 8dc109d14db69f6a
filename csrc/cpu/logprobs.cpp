// Log-softmax-gather and entropy (docs/losses.md §2) on the CPU: the twin of csrc/logprobs.cu, with the
// same online accumulators (online_stats.cuh). With c = 1/T, q = softmax(z c) and y the label of the row:
//
//     log q_j = (z_j - max_z) c - logsum       logsum = log sum_v exp((z_v - max_z) c)
//     logprob = log q_y                        d logprob / dz_j = (1[j = y] - q_j) / T
//     entropy = -sum_v q_v log q_v             d entropy / dz_j = -q_j (log q_j + entropy) / T
//
// Forward: 1 sweep of the online (m, s, w) of Entropy (or (m, s) of Lse without the entropy) over the
// row, kLanes lanes at a time, and with_stats the RowStats of online_stats.cuh (log sum q^2, the mean
// logit, whether the label is the first argmax) pushed with the same exp; it reads 1 entry per entry
// and writes 7 floats per row. Backward: 1
// sweep from the saved max_z, logsum and entropy: reads and writes 1 entry per entry. Rows whose label
// is ignore_index get 0 in every output and a zero gradient.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <type_traits>

#include "../online_stats.cuh"
#include "rows.h"

namespace klops {
namespace cpu {
namespace {

// The label of each row, int64 or int32.
struct Labels {
  const at::Tensor contiguous;

  int64_t operator[](int64_t row) const {
    if (contiguous.scalar_type() == at::kInt) return contiguous.const_data_ptr<int32_t>()[row];
    return contiguous.const_data_ptr<int64_t>()[row];
  }
};

void check_logprobs_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  check_rows(logits, "logits");
  check_per_row(labels, "labels", logits.sizes().slice(0, 2), {at::kLong, at::kInt});
}

using Outputs = std::array<float, 7>;  // logprob, entropy, max, logsum, log_sum_sq, mean_logit, is_top1

// Forward of one row: the Outputs; entropy 0 unless WITH_ENTROPY, the last three 0 unless WITH_STATS.
template <bool WITH_ENTROPY, bool WITH_STATS>
Outputs logprobs_row(const Rows& z, int64_t row, int64_t V, int64_t label, float c) {
  using Op = std::conditional_t<WITH_ENTROPY, EntropyOp, LseOp>;
  const Op op{c};
  const RowStatsOp stats_op{2.0f * c};
  typename Op::Acc lanes[kLanes];
  RowStats stats[kLanes];
  fill_lanes(lanes, op);
  fill_lanes(stats, stats_op);
  float buf[kBlock];
  for (int64_t j = 0; j < V; j += kBlock) {
    const int64_t n = std::min(kBlock, V - j);
    const float* x = z.block(row, j, n, buf);
    if constexpr (WITH_STATS) {  // RowStats from the exp of op.push (RowStatsOp::push_squared)
      const int64_t before = label - j;
      push_block_pair(lanes, op, stats, stats_op, n, [&](typename Op::Acc& acc, RowStats& s, int64_t i) {
        stats_op.push_squared(s, x[i], op.push(acc, x[i]), i < before);
      });
    } else {
      push_block(lanes, op, n, [&](typename Op::Acc& acc, int64_t i) { op.push(acc, x[i]); });
    }
  }
  const auto acc = combine_lanes(lanes, op);
  const float max_z = acc.max();
  const float logsum = acc.logsum();
  // A label outside [0, V) (checked in Python first) is never read: its log-prob is NaN.
  const float z_label = 0 <= label && label < V ? z.entry(row, label) : std::numeric_limits<float>::quiet_NaN();
  Outputs out{(z_label - max_z) * c - logsum, 0.0f, max_z, logsum, 0.0f, 0.0f, 0.0f};
  if constexpr (WITH_ENTROPY) out[1] = acc.entropy();
  if constexpr (WITH_STATS) {
    const RowStats total = combine_lanes(stats, stats_op);
    out[4] = total.log_sum_sq(logsum);
    out[5] = total.sum * c / static_cast<float>(V);
    out[6] = total.is_top1(z_label, acc.m) ? 1.0f : 0.0f;
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_forward(
    const at::Tensor& logits, const at::Tensor& labels, double temperature, bool with_entropy, bool with_stats,
    int64_t ignore_index) {
  check_logprobs_inputs(logits, labels);
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  std::array<at::Tensor, 7> outputs;  // separate tensors: a custom op's outputs may not share storage
  std::array<float*, 7> out;
  for (int k = 0; k < 7; ++k) {
    outputs[k] = at::empty({B, L}, logits.options().dtype(at::kFloat));
    out[k] = outputs[k].mutable_data_ptr<float>();
  }
  const Rows z(logits);
  const Labels label{labels.contiguous()};
  const float c = static_cast<float>(1.0 / temperature);
  parallel_rows(B * L, V, [&](int64_t row) {
    Outputs values{};
    if (label[row] != ignore_index) {
      const int64_t y = label[row];
      if (with_stats) {
        values = with_entropy ? logprobs_row<true, true>(z, row, V, y, c) : logprobs_row<false, true>(z, row, V, y, c);
      } else {
        values = with_entropy ? logprobs_row<true, false>(z, row, V, y, c)
                              : logprobs_row<false, false>(z, row, V, y, c);
      }
    }
    for (int k = 0; k < 7; ++k) out[k][row] = values[k];
  });
  return {outputs[0], outputs[1], outputs[2], outputs[3], outputs[4], outputs[5], outputs[6]};
}

// Backward of one row, with log q_j = (z_j - max_z) c - logsum:
//   dz_j = g_logp c (1[j = y] - q_j) - g_entropy c q_j (log q_j + entropy)   (0 where q_j = 0)
// the entropy term WITH_ENTROPY only.
template <bool WITH_ENTROPY>
void logprobs_grad_row(const Rows& z, const GradRows& dz, int64_t row, int64_t V, int64_t label,
                       float max_z, float logsum, float g_logp, float g_entropy, float entropy, float c) {
  const auto entry = [=](float zj, bool is_label) {  // by value: no alias with the stores to dz
    const float log_q = (zj - max_z) * c - logsum;
    const float q = vexp(log_q);
    float out = g_logp * ((is_label ? 1.0f : 0.0f) - q);
    if constexpr (WITH_ENTROPY) out -= g_entropy * (q > 0.0f ? q * (log_q + entropy) : 0.0f);
    return out;
  };
  float in_buf[kBlock];
  float out_buf[kBlock];
  for (int64_t j = 0; j < V; j += kBlock) {
    const int64_t n = std::min(kBlock, V - j);
    const float* x = z.block(row, j, n, in_buf);
    float* out = dz.out(row, j, out_buf);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = entry(x[i], false);
    if (j <= label && label < j + n) out[label - j] = entry(x[label - j], true);
    dz.store(row, j, n, out);
  }
}

// The gradient into a new tensor, or over the logits (over_input: logprobs_backward_over_logits).
at::Tensor logprobs_backward_to(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& max_z,
                                const at::Tensor& logsum, const at::Tensor& entropy, double temperature,
                                bool with_entropy, int64_t ignore_index, bool over_input) {
  check_logprobs_inputs(logits, labels);
  const auto rows_shape = logits.sizes().slice(0, 2);
  check_per_row(grad_logp, "grad_logp", rows_shape, {at::kFloat});
  check_per_row(max_z, "max", rows_shape, {at::kFloat});
  check_per_row(logsum, "logsum", rows_shape, {at::kFloat});
  if (with_entropy) {  // otherwise grad_entropy and entropy are not read
    check_per_row(grad_entropy, "grad_entropy", rows_shape, {at::kFloat});
    check_per_row(entropy, "entropy", rows_shape, {at::kFloat});
  }
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  at::Tensor dz = grad_like(logits, over_input);
  const Rows z(logits);
  const GradRows grad(dz, over_input);
  const Labels label{labels.contiguous()};
  const at::Tensor g_logp = grad_logp.contiguous(), max_c = max_z.contiguous(), logsum_c = logsum.contiguous();
  const at::Tensor g_entropy = with_entropy ? grad_entropy.contiguous() : g_logp;
  const at::Tensor entropy_c = with_entropy ? entropy.contiguous() : g_logp;
  const float c = static_cast<float>(1.0 / temperature);
  parallel_rows(B * L, V, [&](int64_t row) {
    if (label[row] == ignore_index) return grad.zero(row);
    const float args[5] = {max_c.const_data_ptr<float>()[row], logsum_c.const_data_ptr<float>()[row],
                           g_logp.const_data_ptr<float>()[row] * c, g_entropy.const_data_ptr<float>()[row] * c,
                           entropy_c.const_data_ptr<float>()[row]};
    if (with_entropy) {
      logprobs_grad_row<true>(z, grad, row, V, label[row], args[0], args[1], args[2], args[3], args[4], c);
    } else {
      logprobs_grad_row<false>(z, grad, row, V, label[row], args[0], args[1], args[2], 0.0f, 0.0f, c);
    }
  });
  return dz;
}

at::Tensor logprobs_backward(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& max_z,
                             const at::Tensor& logsum, const at::Tensor& entropy, double temperature,
                             bool with_entropy, int64_t ignore_index) {
  return logprobs_backward_to(grad_logp, grad_entropy, logits, labels, max_z, logsum, entropy, temperature,
                              with_entropy, ignore_index, false);
}

void logprobs_backward_over_logits(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                   const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& max_z,
                                   const at::Tensor& logsum, const at::Tensor& entropy, double temperature,
                                   bool with_entropy, int64_t ignore_index) {
  logprobs_backward_to(grad_logp, grad_entropy, logits, labels, max_z, logsum, entropy, temperature, with_entropy,
                       ignore_index, true);
}

}  // namespace
}  // namespace cpu
}  // namespace klops

TORCH_LIBRARY_IMPL(klops_cpu, CPU, m) {
  m.impl("logprobs_forward", &klops::cpu::logprobs_forward);
  m.impl("logprobs_backward", &klops::cpu::logprobs_backward);
  m.impl("logprobs_backward_over_logits", &klops::cpu::logprobs_backward_over_logits);
}
