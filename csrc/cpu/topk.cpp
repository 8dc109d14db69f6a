// Divergences against a sparse top-k teacher (klops.TopK) on the CPU: the twin of csrc/topk.cu, whose header
// and kernels/topk.py write out the math. With S the row's k teacher ids, Q the student's mass outside S
// and qc = softmax over the entries outside S:
//
//     D    = sum_S loss(q_i, p_i) + loss_tail        (tail: the bin, or linear in Q when renormalized)
//     dz_j = (a_j - q_j gbar) / T = d_j / T           j in S
//     dz_j = qc_j (a_tail - Q gbar) / T                j not in S
//
// Forward: one sweep over the student row for the (max, logsum) of the entries outside S (the members are
// set to -inf in each block's fp32 copy), then three passes over the k members, as topk.cu. Backward: one
// sweep writing c qc_j tail_coef on every entry, then the k members' values over them. Reads 1 entry per
// entry in each direction and writes 1 in the backward. Rows with valid = false get 0 in every output and
// a zero gradient.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "../divergence_terms.cuh"
#include "rows.h"

namespace klops {
namespace cpu {
namespace {

// (max, logsum) of the union of two sets of entries from theirs; an empty set has logsum -inf (topk.cu's).
inline Lse combine_lse(float max_a, float logsum_a, float max_b, float logsum_b, float c) {
  const float mx = logsum_a == kNegInf ? max_b : (logsum_b == kNegInf ? max_a : vmax(max_a, max_b));
  return {mx, vexp((max_a - mx) * c + logsum_a) + vexp((max_b - mx) * c + logsum_b)};
}

// The k teacher ids of a row and their log-probs (fp32, bf16 or fp16, contiguous (B*L, K)).
struct Members {
  const int32_t* ids;
  const void* logprobs;
  at::ScalarType dtype;
  int64_t K;

  float logprob(int64_t row, int64_t i) const {
    const int64_t at = row * K + i;
    switch (dtype) {
      case at::kBFloat16:
        return static_cast<float>(static_cast<const c10::BFloat16*>(logprobs)[at]);
      case at::kHalf:
        return static_cast<float>(static_cast<const c10::Half*>(logprobs)[at]);
      default:
        return static_cast<const float*>(logprobs)[at];
    }
  }
};

struct TopkRow {
  float loss, max_c, logsum_c, tail_scale;
};

// Forward of one row (topk_divergence_forward_kernel of csrc/topk.cu); writes d_i = a_i - q_i gbar to d.
template <int KIND, bool BIN>
TopkRow topk_row(const Rows& z, const Members& members, int64_t row, int64_t V, const DivergenceParams k,
                 float tail_loss, float tail_grad, float* d) {
  const float c = k.inv_temperature;
  const int64_t K = members.K;
  const int32_t* ids = members.ids + row * K;
  const auto member_logit = [&](int64_t i) {  // NaN for an id outside [0, V), which is never read
    return 0 <= ids[i] && ids[i] < V ? z.entry(row, ids[i]) : std::numeric_limits<float>::quiet_NaN();
  };

  // Sweep: (max, logsum) of the entries outside S.
  const LseOp lse_op{c};
  Lse lanes[kLanes];
  fill_lanes(lanes, lse_op);
  float z_buf[kBlock];
  float outside_buf[kBlock];
  for (int64_t j = 0; j < V; j += kBlock) {
    const int64_t n = std::min(kBlock, V - j);
    std::memcpy(outside_buf, z.block(row, j, n, z_buf), n * sizeof(float));
    for (int64_t i = 0; i < K; ++i) {
      if (j <= ids[i] && ids[i] < j + n) outside_buf[ids[i] - j] = kNegInf;
    }
    push_block(lanes, lse_op, n, [&](Lse& acc, int64_t i) { lse_op.push(acc, outside_buf[i]); });
  }
  const Lse outside = combine_lanes(lanes, lse_op);
  const float max_c = outside.max(), logsum_c = outside.logsum();

  // Members, pass 1: their (max, logsum), for the full lse; and log sum p_S of the teacher.
  const LseOp teacher_op{1.0f};
  Lse in_s = lse_op.identity();
  Lse mass_p = teacher_op.identity();
  for (int64_t i = 0; i < K; ++i) {
    lse_op.push(in_s, member_logit(i));
    teacher_op.push(mass_p, members.logprob(row, i));
  }
  const float max_s = in_s.max(), logsum_s = in_s.logsum();
  const float log_mass_p = mass_p.max() + mass_p.logsum();  // log sum p_S
  const Lse all = combine_lse(max_c, logsum_c, max_s, logsum_s, c);
  const float max_q = all.max(), logsum_q = all.logsum();
  const float log_tail_q = (max_c - max_q) * c + logsum_c - logsum_q;  // log Q
  float loss_tail, a_tail, shift_p;
  if constexpr (BIN) {
    const float log_tail_p = K < V ? vlog(vmax(1.0f - vexp(log_mass_p), 0.0f)) : kNegInf;
    const Terms t = divergence_terms<KIND>(K < V ? log_tail_q : kNegInf, log_tail_p, k);
    loss_tail = t.loss;
    a_tail = t.a;
    shift_p = 0.0f;
  } else {
    loss_tail = tail_loss * vexp(log_tail_q);
    a_tail = tail_grad * vexp(log_tail_q);
    shift_p = log_mass_p;
  }

  // Members, pass 2: their terms, a_i parked in d; pass 3: d_i = a_i - q_i gbar.
  Sum2 sums = Sum2Op{}.identity();
  for (int64_t i = 0; i < K; ++i) {
    const float lq = (member_logit(i) - max_q) * c - logsum_q;
    const Terms t = divergence_terms<KIND>(lq, members.logprob(row, i) - shift_p, k);
    sums.loss += t.loss;
    sums.gbar += t.a;
    d[i] = t.a;
  }
  const float gbar = sums.gbar + a_tail;
  for (int64_t i = 0; i < K; ++i) d[i] -= vexp((member_logit(i) - max_q) * c - logsum_q) * gbar;
  // a_tail - Q gbar = a_tail sum q_S - Q sum a_S: nothing of size 1 cancels when Q is near 1.
  const float mass_q_s = vexp((max_s - max_q) * c + logsum_s - logsum_q);
  return {sums.loss + loss_tail, max_c, logsum_c, a_tail * mass_q_s - vexp(log_tail_q) * sums.gbar};
}

// out[i] = tail c qc_i for i < n (0 where z = -inf); restrict pointers let GCC vectorize it.
void tail_block(const float* __restrict__ z, float* __restrict__ out, int64_t n, float max_c, float logsum_c,
                float tail, float c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = z[i] == kNegInf ? 0.0f : tail * vexp((z[i] - max_c) * c - logsum_c);
}

void check_topk_inputs(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& valid) {
  check_rows(student, "student");
  TORCH_CHECK(indices.dim() == 3 && indices.size(0) == student.size(0) && indices.size(1) == student.size(1) &&
                  indices.size(2) >= 1,
              "indices must have shape (B, L, K) with K >= 1, got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt && indices.is_contiguous(), "indices must be contiguous int32");
  TORCH_CHECK(indices.device().is_cpu(), "indices must be a CPU tensor");
  check_per_row(valid, "valid", student.sizes().slice(0, 2), {at::kBool});
}

void check_per_member(const at::Tensor& t, const char* name, const at::Tensor& indices) {
  TORCH_CHECK(t.sizes() == indices.sizes() && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous CPU tensor with the shape of indices ", indices.sizes(), ", got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_divergence_forward(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& teacher_logprobs,
    const at::Tensor& valid, int64_t kind, bool bin, double temperature, double coef, double tail_loss,
    double tail_grad) {
  check_topk_inputs(student, indices, valid);
  check_per_member(teacher_logprobs, "teacher_logprobs", indices);
  TORCH_CHECK(0 <= kind && kind < kNumKinds, "kind must be in [0, ", int{kNumKinds}, "), got ", kind);
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2), K = indices.size(2);
  const auto options = student.options().dtype(at::kFloat);
  at::Tensor outputs[4];
  for (auto& out : outputs) out = at::empty({B, L}, options);
  at::Tensor member_d = at::empty({B, L, K}, options);
  float* out[4];
  for (int i = 0; i < 4; ++i) out[i] = outputs[i].mutable_data_ptr<float>();
  float* d = member_d.mutable_data_ptr<float>();
  const Rows z(student);
  const Members members{indices.const_data_ptr<int32_t>(), teacher_logprobs.const_data_ptr(),
                        teacher_logprobs.scalar_type(), K};
  const at::Tensor valid_c = valid.contiguous();
  const bool* is_valid = valid_c.const_data_ptr<bool>();
  const DivergenceParams params = make_params(temperature, coef);
  dispatch_index<kNumKinds>(kind, [&](auto kind_c) {
    dispatch_index<2>(bin, [&](auto bin_c) {
      parallel_rows(B * L, V, [&](int64_t row) {
        TopkRow r{0.0f, 0.0f, 0.0f, 0.0f};
        if (is_valid[row]) {
          r = topk_row<decltype(kind_c)::value, decltype(bin_c)::value == 1>(
              z, members, row, V, params, static_cast<float>(tail_loss), static_cast<float>(tail_grad), d + row * K);
        } else {
          std::fill(d + row * K, d + (row + 1) * K, 0.0f);
        }
        const float values[4] = {r.loss, r.max_c, r.logsum_c, r.tail_scale};
        for (int i = 0; i < 4; ++i) out[i][row] = values[i];
      });
    });
  });
  return {outputs[0], outputs[1], outputs[2], outputs[3], member_d};
}

at::Tensor topk_divergence_backward(const at::Tensor& tail_coef, const at::Tensor& student,
                                    const at::Tensor& indices, const at::Tensor& valid, const at::Tensor& max_c,
                                    const at::Tensor& logsum_c, const at::Tensor& member_value,
                                    const std::optional<at::Tensor>& label_coef,
                                    const std::optional<at::Tensor>& labels, double temperature) {
  check_topk_inputs(student, indices, valid);
  check_per_member(member_value, "member_value", indices);
  TORCH_CHECK(member_value.scalar_type() == at::kFloat, "member_value must be float32");
  const auto rows_shape = student.sizes().slice(0, 2);
  check_per_row(tail_coef, "tail_coef", rows_shape, {at::kFloat});
  check_per_row(max_c, "max_c", rows_shape, {at::kFloat});
  check_per_row(logsum_c, "logsum_c", rows_shape, {at::kFloat});
  at::Tensor label_coef_c, labels_c;  // both or neither
  if (label_coef.has_value()) {
    TORCH_CHECK(labels.has_value(), "label_coef needs labels");
    check_per_row(*label_coef, "label_coef", rows_shape, {at::kFloat});
    check_per_row(*labels, "labels", rows_shape, {at::kLong});
    label_coef_c = label_coef->contiguous();
    labels_c = labels->contiguous();
  }
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2), K = indices.size(2);
  at::Tensor dz = at::empty({B, L, V}, student.options());
  const Rows z(student);
  const GradRows grads(dz);
  const at::Tensor tail_c = tail_coef.contiguous(), max_c_c = max_c.contiguous(), logsum_c_c = logsum_c.contiguous();
  const at::Tensor valid_c = valid.contiguous();
  const bool* is_valid = valid_c.const_data_ptr<bool>();
  const float* tail_p = tail_c.const_data_ptr<float>();
  const float* max_p = max_c_c.const_data_ptr<float>();
  const float* logsum_p = logsum_c_c.const_data_ptr<float>();
  const float* value_p = member_value.const_data_ptr<float>();
  const int32_t* ids_p = indices.const_data_ptr<int32_t>();
  const float* label_coef_p = label_coef_c.defined() ? label_coef_c.const_data_ptr<float>() : nullptr;
  const int64_t* labels_p = labels_c.defined() ? labels_c.const_data_ptr<int64_t>() : nullptr;
  const float c = static_cast<float>(1.0 / temperature);
  parallel_rows(B * L, V, [&](int64_t row) {
    if (!is_valid[row]) return grads.zero(row);
    const float tail = tail_p[row] * c;
    const float label_scale = label_coef_p != nullptr ? label_coef_p[row] * c : 0.0f;
    const int64_t label = label_coef_p != nullptr ? labels_p[row] : -1;
    float z_buf[kBlock];
    float out_buf[kBlock];
    for (int64_t j = 0; j < V; j += kBlock) {
      const int64_t n = std::min(kBlock, V - j);
      float* out = grads.out(row, j, out_buf);
      tail_block(z.block(row, j, n, z_buf), out, n, max_p[row], logsum_p[row], tail, c);
      if (j <= label && label < j + n) out[label - j] += label_scale;
      grads.store(row, j, n, out);
    }
    for (int64_t i = 0; i < K; ++i) {  // the members' values over the tail's
      const int32_t id = ids_p[row * K + i];
      if (0 <= id && id < V) {
        grads.set(row, id, value_p[row * K + i] * c + (id == label ? label_scale : 0.0f));
      }
    }
  });
  return dz;
}

}  // namespace
}  // namespace cpu
}  // namespace klops

TORCH_LIBRARY_IMPL(klops_cpu, CPU, m) {
  m.impl("topk_divergence_forward", &klops::cpu::topk_divergence_forward);
  m.impl("topk_divergence_backward", &klops::cpu::topk_divergence_backward);
}
