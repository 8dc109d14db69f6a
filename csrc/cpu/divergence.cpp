// Token-level divergences over the vocabulary (docs/losses.md §1) on the CPU: the twin of
// csrc/divergence.cu, with the same per-entry terms (divergence_terms.cuh) and online accumulators
// (online_stats.cuh). With z the student logits, y the teacher, c = 1/T:
//
//     log q = (z - max_q) c - logsum_q            logsum_q = log sum_v exp((z_v - max_q) c)
//     log p = (y - max_t) c - logsum_t   (target "logits")
//     log p = t                          (target "logprobs", t = y; "probs", t = log y; not
//                                         renormalized; the forward leaves in max_t, logsum_t the
//                                         statistics of their check, TeacherCheck)
//
//     D    = sum_v loss_v                         loss_v: the kind's per-entry term
//     a_v  = q_v g_v                              g_v = f(u_v) - u_v f'(u_v), u = p/q
//     gbar = sum_v a_v
//     dD/dz_j = (a_j - q_j gbar) / T
//
// Forward: 2 sweeps (max / logsum of q, and of p for logits; then D and gbar), for every kind: the
// second reads the row from the cache (a row pair is 2 V entries: 256 KiB of fp32 at V = 32000). DRAM
// traffic: 2 entries read per entry pair, 6 floats written per row. Backward: 1 sweep recomputing a_v
// from the saved statistics: 2 entries read and 1 written per entry pair. Rows with valid = false get 0
// in every output and a zero gradient. A scalar loss's forward may write the gradient too
// (divergence_forward_and_grad): the backward's sweep right after a row's forward, from the cache; for
// forward KL between logit rows within the forward's second sweep.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../divergence_terms.cuh"
#include "rows.h"

namespace klops {
namespace cpu {
namespace {

// Indices of the `target` op argument (TARGET_KINDS in Python), as in csrc/divergence.cu.
enum Target : int { LOGITS, LOGPROBS, PROBS, kNumTargets };

// log p of a teacher entry y: (y - max_t) c - logsum_t for logits, y for log-probs, log y for
// probabilities (divergence.cu's teacher_log).
template <int TARGET>
inline float teacher_log(float y, float max_t, float logsum_t, float c) {
  if constexpr (TARGET == LOGITS) {
    return (y - max_t) * c - logsum_t;
  } else if constexpr (TARGET == LOGPROBS) {
    return y;
  } else {
    return vlog(y);
  }
}

struct RowStats {  // what the forward writes per row
  float loss, max_q, logsum_q, max_t, logsum_t, gbar;
};

// Sweep 2 over one block: (D, gbar) and, for a teacher given as log-probs / probs, its TeacherCheck, added to
// `sums` and `check`. The reductions are OpenMP simd reductions over restrict pointers, which GCC vectorizes.
template <int KIND, int TARGET>
void terms_block(const float* __restrict__ z, const float* __restrict__ y, int64_t n, const RowStats s,
                 const DivergenceParams k, Sum2& sums, TeacherCheck& check) {
  const float c = k.inv_temperature;
  float loss = 0.0f, gbar = 0.0f, top = check.top, mass = 0.0f;
#pragma omp simd reduction(+ : loss, gbar, mass) reduction(max : top)
  for (int64_t i = 0; i < n; ++i) {
    const float lq = (z[i] - s.max_q) * c - s.logsum_q;
    const float lp = teacher_log<TARGET>(y[i], s.max_t, s.logsum_t, c);
    const Terms t = divergence_terms<KIND>(lq, lp, k);
    loss += t.loss;
    gbar += t.a;
    if constexpr (TARGET != LOGITS) {
      TeacherCheck entry{top, mass};
      entry.push<TARGET == PROBS>(y[i], lp);
      top = entry.top;
      mass = entry.mass;
    }
  }
  sums = Sum2Op{}.combine(sums, {loss, gbar});
  check.top = top;
  check.mass += mass;
}

// Sweep 1 of a row: (max, logsum) of the student's logits, and of the teacher's for logits.
template <int TARGET>
RowStats statistics_row(const Rows& z, const Rows& y, int64_t row, int64_t V, const DivergenceParams k) {
  const float c = k.inv_temperature;
  float z_buf[kBlock];
  float y_buf[kBlock];
  const LseOp lse_op{c};
  Lse lanes_q[kLanes];
  Lse lanes_t[kLanes];
  fill_lanes(lanes_q, lse_op);
  fill_lanes(lanes_t, lse_op);
  for (int64_t j = 0; j < V; j += kBlock) {  // sweep 1; the teacher is read for logits only
    const int64_t n = std::min(kBlock, V - j);
    const float* zj = z.block(row, j, n, z_buf);
    push_block(lanes_q, lse_op, n, [&](Lse& acc, int64_t i) { lse_op.push(acc, zj[i]); });
    if constexpr (TARGET == LOGITS) {
      const float* yj = y.block(row, j, n, y_buf);
      push_block(lanes_t, lse_op, n, [&](Lse& acc, int64_t i) { lse_op.push(acc, yj[i]); });
    }
  }
  const Lse acc_q = combine_lanes(lanes_q, lse_op);
  const Lse acc_t = combine_lanes(lanes_t, lse_op);
  RowStats s{0.0f, acc_q.max(), acc_q.logsum(), 0.0f, 0.0f, 0.0f};
  if constexpr (TARGET == LOGITS) {
    s.max_t = acc_t.max();
    s.logsum_t = acc_t.logsum();
  }
  return s;
}

// Forward of one row (divergence_forward_kernel of csrc/divergence.cu) in 2 sweeps, also for forward and
// reverse KL between logit rows (whose CUDA kernel takes 1, with KlOp): the Lse lanes vectorize, KlOp's
// five-float state does not, and the second read of a row comes from the cache.
template <int KIND, int TARGET>
RowStats divergence_row(const Rows& z, const Rows& y, int64_t row, int64_t V, const DivergenceParams k) {
  RowStats s = statistics_row<TARGET>(z, y, row, V, k);
  float z_buf[kBlock];
  float y_buf[kBlock];
  Sum2 sums = Sum2Op{}.identity();
  TeacherCheck check = TeacherCheckOp{}.identity();
  for (int64_t j = 0; j < V; j += kBlock) {  // sweep 2
    const int64_t n = std::min(kBlock, V - j);
    terms_block<KIND, TARGET>(z.block(row, j, n, z_buf), y.block(row, j, n, y_buf), n, s, k, sums, check);
  }
  s.loss = sums.loss;
  s.gbar = sums.gbar;
  if constexpr (TARGET != LOGITS) {
    s.max_t = check.top;
    s.logsum_t = vlog(check.mass);
  }
  return s;
}

// What the backward of a row reads besides its entries.
struct GradArgs {
  RowStats s;        // the forward's statistics (loss unused)
  float scale;       // grad_r c
  float scale_logp;  // grad_logp_r c
};

// dz_v of one entry: grad_r c (a_v - q_v gbar_r) + grad_logp_r c (1[v = label_r] - q_v), with q_v and a_v
// recomputed from the saved statistics (divergence_backward_kernel).
template <int KIND, int TARGET>
inline float grad_entry(float zv, float yv, bool is_label, const GradArgs g, const DivergenceParams k) {
  const float c = k.inv_temperature;
  const float lq = (zv - g.s.max_q) * c - g.s.logsum_q;
  const float lp = teacher_log<TARGET>(yv, g.s.max_t, g.s.logsum_t, c);
  const Terms t = divergence_terms<KIND>(lq, lp, k);
  const float q = vexp(lq);
  return g.scale * (t.a - q * g.s.gbar) + g.scale_logp * ((is_label ? 1.0f : 0.0f) - q);
}

// out[i] = grad_entry(z[i], y[i]) for i < n. Restrict pointers (out is a fresh tensor, or a buffer on the stack
// when the gradient overwrites z: GradRows) and arguments by value let GCC if-convert and vectorize the loop.
template <int KIND, int TARGET>
void grad_block(const float* __restrict__ z, const float* __restrict__ y, float* __restrict__ out, int64_t n,
                const GradArgs g, const DivergenceParams k) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = grad_entry<KIND, TARGET>(z[i], y[i], false, g, k);
}

// Backward of one row, block by block; the label's entry (label < 0: none) is patched after its block.
template <int KIND, int TARGET>
void divergence_grad_row(const Rows& z, const Rows& y, const GradRows& dz, int64_t row, int64_t V,
                         const GradArgs g, int64_t label, const DivergenceParams k) {
  float z_buf[kBlock];
  float y_buf[kBlock];
  float out_buf[kBlock];
  for (int64_t j = 0; j < V; j += kBlock) {
    const int64_t n = std::min(kBlock, V - j);
    const float* zj = z.block(row, j, n, z_buf);
    const float* yj = y.block(row, j, n, y_buf);
    float* out = dz.out(row, j, out_buf);
    grad_block<KIND, TARGET>(zj, yj, out, n, g, k);
    if (j <= label && label < j + n) {
      out[label - j] = grad_entry<KIND, TARGET>(zj[label - j], yj[label - j], true, g, k);
    }
    dz.store(row, j, n, out);
  }
}

void check_divergence_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                             int64_t kind, int64_t target, double coef) {
  check_rows(student, "student");
  check_rows(teacher, "teacher");
  TORCH_CHECK(teacher.sizes() == student.sizes(), "teacher shape ", teacher.sizes(), " != student shape ",
              student.sizes());
  check_per_row(valid, "valid", student.sizes().slice(0, 2), {at::kBool});
  TORCH_CHECK(0 <= kind && kind < kNumKinds, "kind must be in [0, ", int{kNumKinds}, "), got ", kind);
  const bool mixture = kind == JSD || kind == SKEW_FORWARD || kind == SKEW_REVERSE;
  TORCH_CHECK(!mixture || (0.0 <= coef && coef <= 1.0), "coef must be in [0, 1] for kind ", kind, ", got ",
              coef);
  TORCH_CHECK(0 <= target && target < kNumTargets, "target must be in [0, ", int{kNumTargets}, "), got ",
              target);
}

// Calls f(kind_c, target_c): the kind and target as integral constants.
template <typename F>
void dispatch_divergence(int64_t kind, int64_t target, F&& f) {
  dispatch_index<kNumKinds>(kind, [&](auto kind_c) {
    dispatch_index<kNumTargets>(target, [&](auto target_c) { f(kind_c, target_c); });
  });
}

// The forward's six (B, L) fp32 outputs, RowStats's fields, written row by row.
struct RowOutputs {
  at::Tensor tensors[6];
  float* data[6];

  explicit RowOutputs(const at::Tensor& student) {
    for (int i = 0; i < 6; ++i) {
      tensors[i] = at::empty(student.sizes().slice(0, 2), student.options().dtype(at::kFloat));
      data[i] = tensors[i].mutable_data_ptr<float>();
    }
  }

  void write(int64_t row, const RowStats& s) const {
    const float values[6] = {s.loss, s.max_q, s.logsum_q, s.max_t, s.logsum_t, s.gbar};
    for (int i = 0; i < 6; ++i) data[i][row] = values[i];
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid, int64_t kind,
    int64_t target, double temperature, double coef) {
  check_divergence_inputs(student, teacher, valid, kind, target, coef);
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2);
  const RowOutputs out(student);
  const Rows z(student), y(teacher);
  const at::Tensor valid_c = valid.contiguous();
  const bool* is_valid = valid_c.const_data_ptr<bool>();
  const DivergenceParams params = make_params(temperature, coef);
  dispatch_divergence(kind, target, [&](auto kind_c, auto target_c) {
    parallel_rows(B * L, V, [&](int64_t row) {
      RowStats s{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      if (is_valid[row]) s = divergence_row<decltype(kind_c)::value, decltype(target_c)::value>(z, y, row, V, params);
      out.write(row, s);
    });
  });
  const auto& t = out.tensors;
  return {t[0], t[1], t[2], t[3], t[4], t[5]};
}

// The student's gradient into a new tensor, or over the student's logits (over_input:
// divergence_backward_over_student).
at::Tensor divergence_backward_to(const at::Tensor& grad, const std::optional<at::Tensor>& grad_logp,
                                  const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                                  const std::optional<at::Tensor>& labels, const at::Tensor& max_q,
                                  const at::Tensor& logsum_q, const at::Tensor& max_t, const at::Tensor& logsum_t,
                                  const at::Tensor& gbar, int64_t kind, int64_t target, double temperature,
                                  double coef, bool over_input) {
  check_divergence_inputs(student, teacher, valid, kind, target, coef);
  const auto rows_shape = student.sizes().slice(0, 2);
  const at::Tensor* per_row[6] = {&grad, &max_q, &logsum_q, &max_t, &logsum_t, &gbar};
  const char* names[6] = {"grad", "max_q", "logsum_q", "max_t", "logsum_t", "gbar"};
  at::Tensor stats[6];
  for (int i = 0; i < 6; ++i) {
    check_per_row(*per_row[i], names[i], rows_shape, {at::kFloat});
    stats[i] = per_row[i]->contiguous();
  }
  at::Tensor grad_logp_c, labels_c;  // both or neither
  if (grad_logp.has_value()) {
    TORCH_CHECK(labels.has_value(), "grad_logp needs labels");
    check_per_row(*grad_logp, "grad_logp", rows_shape, {at::kFloat});
    check_per_row(*labels, "labels", rows_shape, {at::kLong});
    grad_logp_c = grad_logp->contiguous();
    labels_c = labels->contiguous();
  }
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2);
  at::Tensor dz = grad_like(student, over_input);
  const Rows z(student), y(teacher);
  const GradRows grads(dz, over_input);
  const at::Tensor valid_c = valid.contiguous();
  const bool* is_valid = valid_c.const_data_ptr<bool>();
  const float* stat[6];
  for (int i = 0; i < 6; ++i) stat[i] = stats[i].const_data_ptr<float>();
  const float* g_logp = grad_logp_c.defined() ? grad_logp_c.const_data_ptr<float>() : nullptr;
  const int64_t* label = labels_c.defined() ? labels_c.const_data_ptr<int64_t>() : nullptr;
  const DivergenceParams params = make_params(temperature, coef);
  const float c = params.inv_temperature;
  dispatch_divergence(kind, target, [&](auto kind_c, auto target_c) {
    parallel_rows(B * L, V, [&](int64_t row) {
      if (!is_valid[row]) return grads.zero(row);
      const GradArgs g{{0.0f, stat[1][row], stat[2][row], stat[3][row], stat[4][row], stat[5][row]},
                       stat[0][row] * c, g_logp != nullptr ? g_logp[row] * c : 0.0f};
      divergence_grad_row<decltype(kind_c)::value, decltype(target_c)::value>(
          z, y, grads, row, V, g, g_logp != nullptr ? label[row] : -1, params);
    });
  });
  return dz;
}

at::Tensor divergence_backward(const at::Tensor& grad, const std::optional<at::Tensor>& grad_logp,
                               const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                               const std::optional<at::Tensor>& labels, const at::Tensor& max_q,
                               const at::Tensor& logsum_q, const at::Tensor& max_t, const at::Tensor& logsum_t,
                               const at::Tensor& gbar, int64_t kind, int64_t target, double temperature,
                               double coef) {
  return divergence_backward_to(grad, grad_logp, student, teacher, valid, labels, max_q, logsum_q, max_t, logsum_t,
                                gbar, kind, target, temperature, coef, false);
}

void divergence_backward_over_student(const at::Tensor& grad, const std::optional<at::Tensor>& grad_logp,
                                      const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                                      const std::optional<at::Tensor>& labels, const at::Tensor& max_q,
                                      const at::Tensor& logsum_q, const at::Tensor& max_t,
                                      const at::Tensor& logsum_t, const at::Tensor& gbar, int64_t kind,
                                      int64_t target, double temperature, double coef) {
  divergence_backward_to(grad, grad_logp, student, teacher, valid, labels, max_q, logsum_q, max_t, logsum_t, gbar,
                         kind, target, temperature, coef, true);
}

// Forward KL between logit rows, the forward's sweep 2 and the backward's in one: gbar = sum_v a_v = -sum_v p_v
// is -1 before the sweep (p a softmax), so dz_v = scale (a_v + q_v) = scale (q_v - p_v) is written with D's
// terms: 2 sweeps and 4 exps per entry pair in all, where the forward and the backward take 3 and 5.
RowStats forward_kl_row_and_grad(const Rows& z, const Rows& y, const GradRows& dz, int64_t row, int64_t V,
                                 float weight, const DivergenceParams k) {
  RowStats s = statistics_row<LOGITS>(z, y, row, V, k);
  const float c = k.inv_temperature, scale = weight * c;
  float z_buf[kBlock];
  float y_buf[kBlock];
  float out_buf[kBlock];
  float loss = 0.0f, gbar = 0.0f;
  for (int64_t j = 0; j < V; j += kBlock) {
    const int64_t n = std::min(kBlock, V - j);
    const float* zj = z.block(row, j, n, z_buf);
    const float* yj = y.block(row, j, n, y_buf);
    float* out = dz.out(row, j, out_buf);
    float block_loss = 0.0f, block_gbar = 0.0f;
#pragma omp simd reduction(+ : block_loss, block_gbar)
    for (int64_t i = 0; i < n; ++i) {
      const float lq = (zj[i] - s.max_q) * c - s.logsum_q;
      const Terms t = divergence_terms<FORWARD>(lq, (yj[i] - s.max_t) * c - s.logsum_t, k);
      block_loss += t.loss;
      block_gbar += t.a;
      out[i] = scale * (t.a + vexp(lq));
    }
    dz.store(row, j, n, out);
    const Sum2 sums = Sum2Op{}.combine({loss, gbar}, {block_loss, block_gbar});
    loss = sums.loss;
    gbar = sums.gbar;
  }
  s.loss = loss;
  s.gbar = gbar;
  return s;
}

// Reverse KL between logit rows with an fp32 gradient: its gbar is D itself, known only after the terms sweep,
// which therefore keeps q_v in dz; the gradient sweep then forms dz_v = scale (a_v - q_v D), a_v = q_v (log q_v -
// log p_v), from the row in the cache without an exp: 3 sweeps and 3 exps per entry pair in all, where the
// forward and the backward take 3 and 4 (the same values: q_v is the terms sweep's).
RowStats reverse_kl_row_and_grad(const Rows& z, const Rows& y, const GradRows& dz, int64_t row, int64_t V,
                                 float weight, const DivergenceParams k) {
  RowStats s = statistics_row<LOGITS>(z, y, row, V, k);
  const float c = k.inv_temperature, scale = weight * c;
  float z_buf[kBlock];
  float y_buf[kBlock];
  float loss = 0.0f, gbar = 0.0f;
  for (int64_t j = 0; j < V; j += kBlock) {  // D and gbar; q into dz
    const int64_t n = std::min(kBlock, V - j);
    const float* zj = z.block(row, j, n, z_buf);
    const float* yj = y.block(row, j, n, y_buf);
    float* q = dz.out(row, j, nullptr);
    float block_loss = 0.0f, block_gbar = 0.0f;
#pragma omp simd reduction(+ : block_loss, block_gbar)
    for (int64_t i = 0; i < n; ++i) {
      const float lq = (zj[i] - s.max_q) * c - s.logsum_q;
      const Terms t = divergence_terms<REVERSE>(lq, (yj[i] - s.max_t) * c - s.logsum_t, k);
      block_loss += t.loss;
      block_gbar += t.a;
      q[i] = vexp(lq);
    }
    const Sum2 sums = Sum2Op{}.combine({loss, gbar}, {block_loss, block_gbar});
    loss = sums.loss;
    gbar = sums.gbar;
  }
  s.loss = loss;
  s.gbar = gbar;
  for (int64_t j = 0; j < V; j += kBlock) {  // dz from the row and q, in the cache
    const int64_t n = std::min(kBlock, V - j);
    const float* zj = z.block(row, j, n, z_buf);
    const float* yj = y.block(row, j, n, y_buf);
    float* out = dz.out(row, j, nullptr);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float q = out[i];
      const float lq = (zj[i] - s.max_q) * c - s.logsum_q;
      const float lp = (yj[i] - s.max_t) * c - s.logsum_t;
      out[i] = scale * ((q > 0.0f ? q * (lq - lp) : 0.0f) - q * gbar);
    }
  }
  return s;
}

// The forward's outputs and, in the same pass over each row, its gradient for a scalar loss sum_r w_r D_r
// (row_weight w, fp32 (B, L)): the row's 2 forward sweeps, then the backward's sweep while the row is in the
// cache, rather than a second pass over (B, L, V) from memory in the backward (forward KL between logit rows:
// forward_kl_row_and_grad, 2 sweeps; reverse KL with an fp32 gradient: reverse_kl_row_and_grad, no exp in its third).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
divergence_forward_and_grad(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                            const at::Tensor& row_weight, int64_t kind, int64_t target, double temperature,
                            double coef) {
  check_divergence_inputs(student, teacher, valid, kind, target, coef);
  check_per_row(row_weight, "row_weight", student.sizes().slice(0, 2), {at::kFloat});
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2);
  const RowOutputs out(student);
  at::Tensor dz = grad_like(student, false);
  const Rows z(student), y(teacher);
  const GradRows grads(dz);
  const at::Tensor valid_c = valid.contiguous(), weight_c = row_weight.contiguous();
  const bool* is_valid = valid_c.const_data_ptr<bool>();
  const float* weight = weight_c.const_data_ptr<float>();
  const DivergenceParams params = make_params(temperature, coef);
  dispatch_divergence(kind, target, [&](auto kind_c, auto target_c) {
    constexpr int KIND = decltype(kind_c)::value, TARGET = decltype(target_c)::value;
    parallel_rows(B * L, V, [&](int64_t row) {
      RowStats s{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      if (is_valid[row] && KIND == FORWARD && TARGET == LOGITS) {
        s = forward_kl_row_and_grad(z, y, grads, row, V, weight[row], params);
      } else if (is_valid[row] && KIND == REVERSE && TARGET == LOGITS && grads.dtype == at::kFloat) {
        s = reverse_kl_row_and_grad(z, y, grads, row, V, weight[row], params);
      } else if (is_valid[row]) {
        s = divergence_row<KIND, TARGET>(z, y, row, V, params);
        divergence_grad_row<KIND, TARGET>(z, y, grads, row, V, GradArgs{s, weight[row] * params.inv_temperature, 0.0f},
                                          -1, params);
      } else {
        grads.zero(row);
      }
      out.write(row, s);
    });
  });
  const auto& t = out.tensors;
  return {t[0], t[1], t[2], t[3], t[4], t[5], dz};
}

}  // namespace
}  // namespace cpu
}  // namespace klops

TORCH_LIBRARY_IMPL(klops_cpu, CPU, m) {
  m.impl("divergence_forward_and_grad", &klops::cpu::divergence_forward_and_grad);
  m.impl("divergence_forward", &klops::cpu::divergence_forward);
  m.impl("divergence_backward", &klops::cpu::divergence_backward);
  m.impl("divergence_backward_over_student", &klops::cpu::divergence_backward_over_student);
}
