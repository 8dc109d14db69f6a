// The forward / reverse KL pair and AKL's adaptive weights (docs/losses.md §6) on the CPU: the twin of
// kernels/distill.py. With z the student logits, y the teacher's, c = 1/T:
//
//     log q = (z - max_q) c - logsum_q            log p = (y - max_p) c - logsum_p
//     KL(p||q) = sum_{p_v > 0} p_v (log p_v - log q_v)      KL(q||p) = sum_{q_v > 0} q_v (log q_v - log p_v)
//     dz = (g_pq (q - p) + g_qp q (log q - log p - KL(q||p))) / T      (q = 0 adds nothing to the second term)
//
// AKL (akl_split of klops/distill.py): with gap_v = |p_v - q_v| and p_b the teacher probability of the entry at
// which the descending running sum of p first exceeds mu (the smallest p when none does), the head is
// {p_v > p_b} plus, of the entries tied with p_b, the proportion fit / ties that fits under mu,
// fit = clamp(floor((mu - sum_{p_v > p_b} p_v) / p_b), 0, ties), at least 1 when p_b is the row's max;
// w = head gaps / all gaps (1/2 when every gap is 0).
//
// p_b without a sort: F(t) = sum_{p_v >= t} p_v does not increase with t, and p_b = max {t : F(t) > mu} is a
// p of the row. For t >= 0 the fp32 bits order like the values, so a binary search over the bits of t finds it,
// each step one vectorized pass over the row's p (cached in a per-thread buffer, no exp); the passes read the
// same entries in the same order, so the rounded F is monotone too.
//
// Forward: sweep 1 (both rows' maxima), sweep 2 from the cache (the sums of both KLs and log-sum-exps, two exps per
// entry pair; for AKL e^b and e^a into the buffer), then for AKL one pass making them p and |p - q|, at most ~31
// passes over p and one over (p, gap). Backward: 1 sweep, 2
// entries read and 1 written per entry pair. Rows with valid = false get 0 in every output and a zero gradient.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../online_stats.cuh"
#include "rows.h"

namespace klops {
namespace cpu {
namespace {

struct PairStats {  // a row's (B*L, 6) statistics, in their order
  float kl_pq, kl_qp, max_q, logsum_q, max_p, logsum_p;
};

// The row's online sums after sweep 2, with a = (z - max_q) c and b = (y - max_p) c: s_q = sum e^a, s_p = sum e^b,
// acc_pq = sum_{e^b > 0} e^b (b - a), acc_qp = sum_{e^a > 0} e^a (a - b); then log q = a - log s_q, log p = b - log s_p
// and KL(p||q) = acc_pq / s_p - log s_p + log s_q, KL(q||p) = acc_qp / s_q - log s_q + log s_p.
struct PairSums {
  float s_q, s_p, acc_pq, acc_qp;
};

// Sweep 2 over one block: PairSums added to `sums`, two exps per entry; with AKL, e^b and e^a stored. The maxima
// come by value and the pointers are restrict, so GCC vectorizes the loop (the selects keep the 0 (-inf) products
// of an underflowed e^a or e^b out of the sums).
template <bool AKL>
void sums_block(const float* __restrict__ z, const float* __restrict__ y, int64_t n, float max_q, float max_p,
                float c, PairSums& sums, float* __restrict__ e_p_out, float* __restrict__ e_q_out) {
  float s_q = 0.0f, s_p = 0.0f, acc_pq = 0.0f, acc_qp = 0.0f;
#pragma omp simd reduction(+ : s_q, s_p, acc_pq, acc_qp)
  for (int64_t i = 0; i < n; ++i) {
    const float a = (z[i] - max_q) * c;
    const float b = (y[i] - max_p) * c;
    const float e_q = vexp(a);
    const float e_p = vexp(b);
    s_q += e_q;
    s_p += e_p;
    acc_pq += e_p > 0.0f ? e_p * (b - a) : 0.0f;
    acc_qp += e_q > 0.0f ? e_q * (a - b) : 0.0f;
    if constexpr (AKL) {
      e_p_out[i] = e_p;
      e_q_out[i] = e_q;
    }
  }
  sums = {sums.s_q + s_q, sums.s_p + s_p, sums.acc_pq + acc_pq, sums.acc_qp + acc_qp};
}

// The buffer's (e^b, e^a) made (p, |p - q|) in place, as the torch backend forms p (e^b / s_p); the smallest and
// largest p returned.
std::pair<float, float> probs_and_gaps(float* __restrict__ p, float* __restrict__ gap, int64_t V, float s_p,
                                       float s_q) {
  float lo = std::numeric_limits<float>::infinity(), hi = 0.0f;
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int64_t v = 0; v < V; ++v) {
    const float pv = p[v] / s_p;
    gap[v] = std::fabs(pv - gap[v] / s_q);
    p[v] = pv;
    lo = vmin(lo, pv);
    hi = vmax(hi, pv);
  }
  return {lo, hi};
}

// F(t) = sum of the p[v] >= t.
float mass_from(const float* __restrict__ p, int64_t V, float t) {
  float mass = 0.0f;
#pragma omp simd reduction(+ : mass)
  for (int64_t v = 0; v < V; ++v) mass += p[v] >= t ? p[v] : 0.0f;
  return mass;
}

// p_b of the header: the largest p with F(p) > mu, or the smallest p where F(p_min) (all the mass) <= mu.
float boundary_p(const float* p, int64_t V, float mu, float p_min, float p_max) {
  if (!(mass_from(p, V, p_min) > mu)) return p_min;
  uint32_t lo = float_to_bits(p_min);      // F(lo) > mu
  uint32_t hi = float_to_bits(p_max) + 1;  // F(hi) = 0 <= mu
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    (mass_from(p, V, bits_to_float(mid)) > mu ? lo : hi) = mid;
  }
  return bits_to_float(lo);
}

// The forward-KL weight of a row from its p and gaps (akl_split).
float akl_weight(const float* __restrict__ p, const float* __restrict__ gap, int64_t V, float mu, float p_min,
                 float p_max) {
  const float p_b = boundary_p(p, V, mu, p_min, p_max);
  float above = 0.0f, head = 0.0f, tie_gap = 0.0f, ties = 0.0f, total = 0.0f;
#pragma omp simd reduction(+ : above, head, tie_gap, ties, total)
  for (int64_t v = 0; v < V; ++v) {
    const bool is_above = p[v] > p_b;
    const bool is_tie = p[v] == p_b;
    above += is_above ? p[v] : 0.0f;
    head += is_above ? gap[v] : 0.0f;
    tie_gap += is_tie ? gap[v] : 0.0f;
    ties += is_tie ? 1.0f : 0.0f;
    total += gap[v];
  }
  float fit = std::fmin(std::fmax(std::floor((mu - above) / p_b), 0.0f), ties);
  if (p_b == p_max) fit = std::fmax(fit, 1.0f);
  const float head_sum = head + (ties > 0.0f ? fit / ties : 0.0f) * tie_gap;
  return total > 0.0f ? head_sum / total : 0.5f;
}

// Forward of one row: its statistics and, with AKL, its weight (p and the gaps go through `buffer`, 2 V floats).
template <bool AKL>
std::pair<PairStats, float> kl_pair_row(const Rows& z, const Rows& y, int64_t row, int64_t V, float c, float mu,
                                        float* buffer) {
  float z_buf[kBlock];
  float y_buf[kBlock];
  float m_z = kNegInf, m_y = kNegInf;
  for (int64_t j = 0; j < V; j += kBlock) {  // sweep 1: the row maxima, no exp
    const int64_t n = std::min(kBlock, V - j);
    const float* zj = z.block(row, j, n, z_buf);
    const float* yj = y.block(row, j, n, y_buf);
#pragma omp simd reduction(max : m_z, m_y)
    for (int64_t i = 0; i < n; ++i) {
      m_z = vmax(m_z, zj[i]);
      m_y = vmax(m_y, yj[i]);
    }
  }
  const float max_q = finite_or_zero(m_z), max_p = finite_or_zero(m_y);
  PairSums sums{0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t j = 0; j < V; j += kBlock) {  // sweep 2, from the cache
    const int64_t n = std::min(kBlock, V - j);
    sums_block<AKL>(z.block(row, j, n, z_buf), y.block(row, j, n, y_buf), n, max_q, max_p, c, sums, buffer + j,
                    buffer + V + j);
  }
  const float logsum_q = vlog(sums.s_q), logsum_p = vlog(sums.s_p);
  const PairStats s{sums.acc_pq / sums.s_p - logsum_p + logsum_q, sums.acc_qp / sums.s_q - logsum_q + logsum_p,
                    max_q, logsum_q, max_p, logsum_p};
  if constexpr (!AKL) return {s, 0.0f};
  const auto [p_min, p_max] = probs_and_gaps(buffer, buffer + V, V, sums.s_p, sums.s_q);
  return {s, akl_weight(buffer, buffer + V, V, mu, p_min, p_max)};
}

void check_pair_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid) {
  check_rows(student, "student");
  check_rows(teacher, "teacher");
  TORCH_CHECK(teacher.sizes() == student.sizes(), "teacher shape ", teacher.sizes(), " != student shape ",
              student.sizes());
  check_per_row(valid, "valid", student.sizes().slice(0, 2), {at::kBool});
}

// (B, L, V) logits, (B, L) valid -> (B*L,) fp32 AKL weights (0 without akl_weights) and (B*L, 6) fp32
// (KL(p||q), KL(q||p), max_q, logsum_q, max_p, logsum_p); 0 on invalid rows.
std::tuple<at::Tensor, at::Tensor> kl_pair_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                   const at::Tensor& valid, double temperature, double mu,
                                                   bool akl_weights) {
  check_pair_inputs(student, teacher, valid);
  const int64_t rows = student.size(0) * student.size(1), V = student.size(2);
  const auto options = student.options().dtype(at::kFloat);
  at::Tensor w = at::empty({rows}, options);
  at::Tensor stats = at::empty({rows, 6}, options);
  float* w_out = w.mutable_data_ptr<float>();
  float* stats_out = stats.mutable_data_ptr<float>();
  const Rows z(student), y(teacher);
  const at::Tensor valid_c = valid.contiguous();
  const bool* is_valid = valid_c.const_data_ptr<bool>();
  const float c = static_cast<float>(1.0 / temperature);
  dispatch_index<2>(akl_weights, [&](auto akl_c) {
    constexpr bool AKL = decltype(akl_c)::value == 1;
    parallel_rows(rows, V, [&](int64_t row) {
      std::pair<PairStats, float> out{{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, 0.0f};
      if (is_valid[row]) {
        thread_local std::vector<float> buffer;  // p and the gaps of the thread's row (AKL only)
        if (AKL && buffer.size() < static_cast<size_t>(2 * V)) buffer.resize(2 * V);
        out = kl_pair_row<AKL>(z, y, row, V, c, static_cast<float>(mu), buffer.data());
      }
      const PairStats& s = out.first;
      const float values[6] = {s.kl_pq, s.kl_qp, s.max_q, s.logsum_q, s.max_p, s.logsum_p};
      for (int i = 0; i < 6; ++i) stats_out[row * 6 + i] = values[i];
      w_out[row] = out.second;
    });
  });
  return {w, stats};
}

// dz of one block: (g_pq (q - p) + g_qp q (log q - log p - KL(q||p))) / T, with scale_* = g_* / T.
void grad_block(const float* __restrict__ z, const float* __restrict__ y, float* __restrict__ out, int64_t n,
                const PairStats s, float c, float scale_pq, float scale_qp) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float lq = (z[i] - s.max_q) * c - s.logsum_q;
    const float lp = (y[i] - s.max_p) * c - s.logsum_p;
    const float q = vexp(lq);
    const float reverse = q > 0.0f ? q * (lq - lp - s.kl_qp) : 0.0f;  // q = 0 adds nothing, even where lp = -inf
    out[i] = scale_pq * (q - vexp(lp)) + scale_qp * reverse;
  }
}

// (B*L, 2) fp32 grads of KL(p||q), KL(q||p) -> (B, L, V) gradient of the student logits, in their dtype.
at::Tensor kl_pair_backward(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                            const at::Tensor& valid, const at::Tensor& stats, double temperature) {
  check_pair_inputs(student, teacher, valid);
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2), rows = B * L;
  const int64_t grad_shape[2] = {rows, 2}, stats_shape[2] = {rows, 6};
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.sizes() == grad_shape,
              "grad must be a (", rows, ", 2) fp32 CPU tensor, got ", grad.sizes(), " ", grad.scalar_type());
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kFloat &&
                  stats.sizes() == stats_shape,
              "stats must be a (", rows, ", 6) fp32 CPU tensor, got ", stats.sizes(), " ", stats.scalar_type());
  at::Tensor dz = at::empty({B, L, V}, student.options());
  const Rows z(student), y(teacher);
  const GradRows grads(dz);
  const at::Tensor valid_c = valid.contiguous(), grad_c = grad.contiguous(), stats_c = stats.contiguous();
  const bool* is_valid = valid_c.const_data_ptr<bool>();
  const float* g = grad_c.const_data_ptr<float>();
  const float* st = stats_c.const_data_ptr<float>();
  const float c = static_cast<float>(1.0 / temperature);
  parallel_rows(rows, V, [&](int64_t row) {
    if (!is_valid[row]) return grads.zero(row);
    const float* r = st + row * 6;
    const PairStats s{r[0], r[1], r[2], r[3], r[4], r[5]};
    float z_buf[kBlock];
    float y_buf[kBlock];
    float out_buf[kBlock];
    for (int64_t j = 0; j < V; j += kBlock) {
      const int64_t n = std::min(kBlock, V - j);
      float* out = grads.out(row, j, out_buf);
      grad_block(z.block(row, j, n, z_buf), y.block(row, j, n, y_buf), out, n, s, c, g[row * 2] * c,
                 g[row * 2 + 1] * c);
      grads.store(row, j, n, out);
    }
  });
  return dz;
}

}  // namespace
}  // namespace cpu
}  // namespace klops

// Schemas of klops::kl_pair / kl_pair_backward's launchers (klops/distill.py); no CUDA twin, so not in schemas.h.
TORCH_LIBRARY_FRAGMENT(klops_cpu, m) {
  m.def("kl_pair_forward(Tensor student, Tensor teacher, Tensor valid, float temperature, float mu, "
        "bool akl_weights) -> (Tensor, Tensor)");
  m.def("kl_pair_backward(Tensor grad, Tensor student, Tensor teacher, Tensor valid, Tensor stats, "
        "float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(klops_cpu, CPU, m) {
  m.impl("kl_pair_forward", &klops::cpu::kl_pair_forward);
  m.impl("kl_pair_backward", &klops::cpu::kl_pair_backward);
}
