// Per-entry terms of the token-level divergences (docs/losses.md §1) shared by the row kernels of
// divergence.cu (dense teachers) and topk.cu (sparse top-k teachers): the kinds, their parameters,
// loss_v and a_v = q_v g_v of one entry from its log-probabilities, the (D, gbar) sums and the check
// statistics of a teacher given as log-probs or probabilities. Plain
// C++ apart from the torch checks and the warp shuffles, so that tests/csrc/terms_check.cpp runs
// the terms on the CPU.

#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#include <c10/util/Exception.h>  // TORCH_CHECK
#endif

#include "online_stats.cuh"

namespace klops {
namespace {

// Indices of the `kind` op argument: kernels/kinds.py's KINDS, in that order.
enum Kind : int { FORWARD, REVERSE, JSD, SKEW_FORWARD, SKEW_REVERSE, TV, ALPHA, kNumKinds };

struct DivergenceParams {
  float inv_temperature;  // c = 1 / T
  float coef;             // beta (jsd) or alpha (skew_*, alpha)
  float log_coef;         // log(coef), -inf at coef = 0: mixture weight of jsd / skew_*
  float log_1m_coef;      // log(1 - coef), -inf at coef = 1
  float inv_coef;         // 1 / coef (alpha)
  float inv_alpha_norm;   // 1 / (coef (1 - coef)) (alpha)
};

#ifdef __CUDACC__
// Checks the kind index and that the mixture weight of jsd / skew_* lies in [0, 1] (host).
inline void check_kind_and_coef(int64_t kind, double coef) {
  TORCH_CHECK(0 <= kind && kind < kNumKinds, "kind must be in [0, ", int{kNumKinds}, "), got ", kind);
  const bool mixture = kind == JSD || kind == SKEW_FORWARD || kind == SKEW_REVERSE;
  TORCH_CHECK(!mixture || (0.0 <= coef && coef <= 1.0), "coef must be in [0, 1] for kind ", kind,
              ", got ", coef);
}
#endif

// The kernels' DivergenceParams for a temperature and a coefficient (host).
inline DivergenceParams make_params(double temperature, double coef) {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // The mixture logs are only used by jsd / skew_*, where 0 <= coef <= 1.
  const bool mixture = 0.0 <= coef && coef <= 1.0;
  const double log_coef = !mixture ? nan : coef > 0.0 ? std::log(coef) : -inf;
  const double log_1m_coef = !mixture ? nan : coef < 1.0 ? std::log1p(-coef) : -inf;
  return {static_cast<float>(1.0 / temperature),   static_cast<float>(coef),
          static_cast<float>(log_coef),            static_cast<float>(log_1m_coef),
          static_cast<float>(1.0 / coef),          static_cast<float>(1.0 / (coef * (1.0 - coef)))};
}

// log(exp(a) + exp(b)), -inf when both are -inf.
KLOPS_DEVICE float logaddexp(float a, float b) {
  const float mx = vmax(a, b);
  const float mn = vmin(a, b);
  return mx + vlog(1.0f + vexp(mn - finite_or_zero(mx)));
}

struct Terms {
  float loss;  // loss_v
  float a;     // a_v = q_v g_v
};

// Per-entry terms of the kind from lq = log q_v and lp = log p_v (either may be -inf).
template <int KIND>
KLOPS_DEVICE Terms divergence_terms(float lq, float lp, const DivergenceParams& k) {
  const float q = vexp(lq);
  const float p = vexp(lp);
  const bool q_pos = lq != kNegInf;
  const bool p_pos = lp != kNegInf;
  const float coef = k.coef;
  Terms t;
  // p = 0 (or q = 0) adds nothing, also for a finite lp (lq) whose exp underflows: no 0 * inf against -inf.
  if constexpr (KIND == FORWARD) {  // sum p (log p - log q); g = -u
    t.loss = p > 0.0f ? p * (lp - lq) : 0.0f;
    t.a = -p;
  } else if constexpr (KIND == REVERSE) {  // sum q (log q - log p); g = log q - log p + const
    t.loss = q > 0.0f ? q * (lq - lp) : 0.0f;
    t.a = t.loss;
  } else if constexpr (KIND == JSD) {
    // m = beta p + (1-beta) q; beta KL(p||m) + (1-beta) KL(q||m)
    const float lm = logaddexp(k.log_coef + lp, k.log_1m_coef + lq);
    const float kl_qm = q_pos ? q * (lq - lm) : 0.0f;
    t.loss = coef * (p_pos ? p * (lp - lm) : 0.0f) + (1.0f - coef) * kl_qm;
    t.a = (1.0f - coef) * kl_qm;
  } else if constexpr (KIND == SKEW_FORWARD) {
    // m = alpha p + (1-alpha) q; KL(p||m); g = -(1-alpha) p/m
    const float lm = logaddexp(k.log_coef + lp, k.log_1m_coef + lq);
    t.loss = p_pos ? p * (lp - lm) : 0.0f;
    t.a = (p_pos && q_pos) ? -(1.0f - coef) * vexp(lp + lq - lm) : 0.0f;
  } else if constexpr (KIND == SKEW_REVERSE) {
    // n = (1-alpha) p + alpha q; KL(q||n); g = log(q/n) + 1 - alpha q/n
    const float ln = logaddexp(k.log_1m_coef + lp, k.log_coef + lq);
    const float log_qn = q_pos ? lq - ln : 0.0f;
    t.loss = q * log_qn;
    t.a = q * (log_qn + 1.0f - coef * vexp(log_qn));
  } else if constexpr (KIND == TV) {  // 0.5 sum |p - q|; g = 0.5 sign(q - p)
    t.loss = 0.5f * fabsf(p - q);
    t.a = 0.5f * q * (q > p ? 1.0f : (q < p ? -1.0f : 0.0f));
  } else {  // ALPHA (Amari): (1 - sum p^a q^(1-a)) / (a (1-a)); g = -u^a / a
    static_assert(KIND == ALPHA, "unknown divergence kind");
    const float w = vexp(coef * lp + (1.0f - coef) * lq);
    t.loss = (q - w) * k.inv_alpha_norm;
    t.a = -w * k.inv_coef;
  }
  // Entries where both distributions are 0 carry no mass and no gradient.
  if (!p_pos && !q_pos) t = {0.0f, 0.0f};
  return t;
}
// Two running sums (D and gbar) and their operations for block_reduce.
struct Sum2 {
  float loss;
  float gbar;

#ifdef __CUDACC__
  KLOPS_DEVICE Sum2 shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, loss, lane_mask), __shfl_xor_sync(0xffffffffu, gbar, lane_mask)};
  }
#endif
};

struct Sum2Op {
  KLOPS_DEVICE Sum2 identity() const { return {0.0f, 0.0f}; }
  KLOPS_DEVICE Sum2 combine(const Sum2& a, const Sum2& b) const {
    return {a.loss + b.loss, a.gbar + b.gbar};
  }
};

// The statistics of a teacher given as log-probs or probabilities for the check that it is normalized
// (check_teacher_rows in klops/_inputs.py; kernels/divergence.py's teacher_check_terms): top, the largest
// entry that must not be positive, log p (log-probs) or -p (probabilities); mass = sum_v p_v, NaN for a
// NaN entry. Reduced over a row like Sum2.
struct TeacherCheck {
  float top;
  float mass;

  // One entry: y as stored (in fp32) and lp = log p.
  template <bool PROBS>
  KLOPS_DEVICE void push(float y, float lp) {
    if constexpr (PROBS) {
      top = vmax(top, -y);
      mass += y;
    } else {
      top = vmax(top, lp);
      mass += vexp(lp);
    }
  }

#ifdef __CUDACC__
  KLOPS_DEVICE TeacherCheck shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, top, lane_mask), __shfl_xor_sync(0xffffffffu, mass, lane_mask)};
  }
#endif
};

struct TeacherCheckOp {
  KLOPS_DEVICE TeacherCheck identity() const { return {-std::numeric_limits<float>::infinity(), 0.0f}; }
  KLOPS_DEVICE TeacherCheck combine(const TeacherCheck& a, const TeacherCheck& b) const {
    return {vmax(a.top, b.top), a.mass + b.mass};
  }
};

}  // namespace
}  // namespace klops
