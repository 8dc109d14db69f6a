// The online accumulators of the row kernels of klops._C, in raw logit units: log-sum-exp (Lse),
// entropy (Entropy) and KL between two rows (Kl), each with its operations (identity, push of one
// entry, combine of two partial states) for block_reduce (row_reduce.cuh). Plain C++ apart from the
// warp shuffles, so that tests/csrc/online_check.cpp runs them on the CPU against float64.
#pragma once

#include <cmath>
#include <limits>

#include "math.cuh"

namespace klops {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

KLOPS_DEVICE float finite_or_zero(float m) { return m == kNegInf ? 0.0f : m; }

// An online KL accumulator moved to new row maxima: r_a (acc + shift s_a), 0 where r_a = 0 (its terms'
// weight underflowed, P_a = 0 there), so that an acc of inf (b = -inf) meets no 0 * inf.
KLOPS_DEVICE float move_kl_acc(float acc, float r_a, float shift, float s_a) {
  return r_a > 0.0f ? r_a * (acc + shift * s_a) : 0.0f;
}

// Online log-sum-exp of the scaled row x = z c (c = 1/T) in raw units: m = max z (before the
// scale), s = sum exp((z - m) c). The kernels keep m and log s apart, as the row's
//     max = m (0 when m = -inf),   logsum = log s   (-inf for an empty or all -inf row)
// and form log softmax(x) = (z - max) c - logsum: z - max is exact near the max (Sterbenz), where
// z c - logsumexp(x) would carry the rounding error eps |z c| of both terms.
struct Lse {
  float m;
  float s;

#ifdef __CUDACC__
  KLOPS_DEVICE Lse shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, m, lane_mask), __shfl_xor_sync(0xffffffffu, s, lane_mask)};
  }
#endif
  KLOPS_DEVICE float max() const { return finite_or_zero(m); }
  KLOPS_DEVICE float logsum() const { return vlog(s); }
};

// The operations on Lse for the scale c: identity, push of one raw entry, combine (block_reduce).
struct LseOp {
  using Acc = Lse;
  float c;  // 1 / T

  KLOPS_DEVICE Lse identity() const { return {kNegInf, 0.0f}; }

  // Folds z in with one exp: on a new max z, exp((old m - z) c) rescales s; else
  // s += exp((z - m) c). A NaN z is never "up", so it makes s NaN; -inf entries change nothing.
  // Returns that exp (RowStatsOp::push_squared reuses it).
  KLOPS_DEVICE float push(Lse& a, float z) const {
    const bool up = z > a.m;
    const float m_new = up ? z : a.m;
    const float e = vexp(((up ? a.m : z) - finite_or_zero(m_new)) * c);
    a.s = up ? fmaf(a.s, e, 1.0f) : a.s + e;
    a.m = m_new;
    return e;
  }

  KLOPS_DEVICE Lse combine(const Lse& a, const Lse& b) const {
    const float m = vmax(a.m, b.m);
    const float m_safe = finite_or_zero(m);
    return {m, a.s * vexp((a.m - m_safe) * c) + b.s * vexp((b.m - m_safe) * c)};
  }
};

// Lse plus w = sum exp(d) d with d = (z - m) c, relative to the running raw max m: the row's
// entropy H = log s - w / s (docs/losses.md §2).
struct Entropy {
  float m;
  float s;
  float w;

#ifdef __CUDACC__
  KLOPS_DEVICE Entropy shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, m, lane_mask), __shfl_xor_sync(0xffffffffu, s, lane_mask),
            __shfl_xor_sync(0xffffffffu, w, lane_mask)};
  }
#endif
  KLOPS_DEVICE float max() const { return finite_or_zero(m); }
  KLOPS_DEVICE float logsum() const { return vlog(s); }
  KLOPS_DEVICE float entropy() const { return vlog(s) - w / s; }
};

struct EntropyOp {
  using Acc = Entropy;
  float c;  // 1 / T

  KLOPS_DEVICE Entropy identity() const { return {kNegInf, 0.0f, 0.0f}; }

  // As LseOp::push. On a new max z, with d = (old m - z) c: w = exp(d) (w + d s), the shift d
  // taken as 0 when old m = -inf (s = w = 0 then); the new entry adds exp(0) 0. Else, with
  // d = (z - m) c: w += exp(d) d, nothing for d = -inf (a -inf entry). Returns exp(d), as LseOp::push.
  KLOPS_DEVICE float push(Entropy& a, float z) const {
    const bool up = z > a.m;
    const float m_new = up ? z : a.m;
    const float d = ((up ? a.m : z) - finite_or_zero(m_new)) * c;
    const float e = vexp(d);
    const float d_safe = finite_or_zero(d);
    a.w = up ? e * (a.w + d_safe * a.s) : a.w + e * d_safe;
    a.s = up ? fmaf(a.s, e, 1.0f) : a.s + e;
    a.m = m_new;
    return e;
  }

  // Both sides moved to the common max M: with r_i = exp((m_i - M) c) and the shift
  // (m_i - M) c (0 for an empty side), s = sum r_i s_i, w = sum r_i (w_i + shift_i s_i).
  KLOPS_DEVICE Entropy combine(const Entropy& a, const Entropy& b) const {
    const float m = vmax(a.m, b.m);
    const float m_safe = finite_or_zero(m);
    const float shift_a = a.m == kNegInf ? 0.0f : (a.m - m_safe) * c;
    const float shift_b = b.m == kNegInf ? 0.0f : (b.m - m_safe) * c;
    const float ra = vexp((a.m - m_safe) * c);
    const float rb = vexp((b.m - m_safe) * c);
    return {m, a.s * ra + b.s * rb, ra * (a.w + shift_a * a.s) + rb * (b.w + shift_b * b.s)};
  }
};

// The extra row statistics of the log-prob ops (TRL's fused LM head outputs), pushed in the same sweep as
// Lse / Entropy, in raw logit units: s2 = sum exp((z - m) 2c) over the running raw max m, so that
//     log sum_v q_v^2 = log s2 - 2 logsum     (the same m as Lse's: the max does not depend on c)
// sum = sum_v z_v (the mean logit is sum c / V), and before = max of the entries before the label: the
// label is the row's first argmax iff z_label >= max z and z_label > before.
struct RowStats {
  float m;
  float s2;
  float sum;
  float before;

#ifdef __CUDACC__
  KLOPS_DEVICE RowStats shfl_xor(int lane_mask) const {
    const auto shfl = [lane_mask](float v) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); };
    return {shfl(m), shfl(s2), shfl(sum), shfl(before)};
  }
#endif
  KLOPS_DEVICE float log_sum_sq(float logsum) const { return vlog(s2) - 2.0f * logsum; }
  KLOPS_DEVICE bool is_top1(float z_label, float max_z) const { return z_label >= max_z && z_label > before; }
};

struct RowStatsOp {
  using Acc = RowStats;
  float c2;  // 2 / T

  KLOPS_DEVICE RowStats identity() const { return {kNegInf, 0.0f, 0.0f, kNegInf}; }

  // Folds z in at the scale 2c (as LseOp::push at c) with e, the exp that LseOp / EntropyOp::push (scale c)
  // returned for the same z: their running max is this one's (the same pushes from the same identity), and
  // exp(2 x) = exp(x)^2, so that a sweep pushing both keeps one exp per entry. The entry joins `before` when it
  // precedes the label.
  KLOPS_DEVICE void push_squared(RowStats& a, float z, float e, bool before_label) const {
    const bool up = z > a.m;
    a.s2 = up ? fmaf(a.s2, e * e, 1.0f) : fmaf(e, e, a.s2);
    a.m = up ? z : a.m;
    a.sum += z;
    a.before = before_label ? vmax(a.before, z) : a.before;
  }

  KLOPS_DEVICE RowStats combine(const RowStats& a, const RowStats& b) const {
    const float m = vmax(a.m, b.m);
    const float m_safe = finite_or_zero(m);
    return {m, a.s2 * vexp((a.m - m_safe) * c2) + b.s2 * vexp((b.m - m_safe) * c2), a.sum + b.sum,
            vmax(a.before, b.before)};
  }
};

// KL(P_a || P_b) between two logit rows in one sweep, P = softmax(x c): the online (max, sum) of
// both rows as in Lse, and
//     acc = sum_v exp(d_a) (d_a - d_b),   d = (x_v - m) c
// relative to the running raw maxima m_a, m_b, so that its terms keep the precision of
// log-probabilities. Once moved to the row maxima, KL = acc / s_a - log s_a + log s_b.
struct Kl {
  float m_a;
  float s_a;
  float m_b;
  float s_b;
  float acc;

#ifdef __CUDACC__
  KLOPS_DEVICE Kl shfl_xor(int lane_mask) const {
    const auto shfl = [lane_mask](float v) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); };
    return {shfl(m_a), shfl(s_a), shfl(m_b), shfl(s_b), shfl(acc)};
  }
#endif
  KLOPS_DEVICE Lse lse_a() const { return {m_a, s_a}; }
  KLOPS_DEVICE Lse lse_b() const { return {m_b, s_b}; }
  // Once reduced over the row. Infinite where P_a > 0 = P_b.
  KLOPS_DEVICE float kl() const { return acc / s_a - vlog(s_a) + vlog(s_b); }
};

struct KlOp {
  using Acc = Kl;
  float c;  // 1 / T

  KLOPS_DEVICE Kl identity() const { return {kNegInf, 0.0f, kNegInf, 0.0f, 0.0f}; }

  // Folds the entry pair (a, b) in with one exp per row, as LseOp::push (same m and s). A new max
  // moves the reference point of every earlier term: with shift = (m - m') c (0 when m = -inf) and
  // r = exp(shift), acc' = r_a (acc + (shift_a - shift_b) s_a). Per row, on a new max x the exp is
  // r and the entry's d is 0; else shift = 0, r = 1 and the exp is exp(d) of the entry. The new
  // term is exp(d_a) (d_a - d_b). A term or an earlier acc whose weight (exp(d_a), r_a) is 0 in fp32
  // adds nothing (P_a = 0 there: a = -inf, or an underflow), so that b = -inf meets no 0 * inf;
  // b = -inf where P_a > 0 gives acc = inf (D inf). NaN entries give NaN (through s).
  KLOPS_DEVICE void push(Kl& k, float a, float b) const {
    const bool up_a = a > k.m_a;
    const bool up_b = b > k.m_b;
    const float m_a = up_a ? a : k.m_a;
    const float m_b = up_b ? b : k.m_b;
    const float x_a = ((up_a ? k.m_a : a) - finite_or_zero(m_a)) * c;  // shift_a or d_a
    const float x_b = ((up_b ? k.m_b : b) - finite_or_zero(m_b)) * c;  // shift_b or d_b
    const float e_a = vexp(x_a);
    const float e_b = vexp(x_b);
    const float shift_a = up_a ? finite_or_zero(x_a) : 0.0f;
    const float shift_b = up_b ? finite_or_zero(x_b) : 0.0f;
    const float d_a = up_a ? 0.0f : x_a;
    const float d_b = up_b ? 0.0f : x_b;
    const float weight = up_a ? 1.0f : e_a;
    const float r_a = up_a ? e_a : 1.0f;
    const float term = weight > 0.0f ? weight * (d_a - d_b) : 0.0f;
    k.acc = move_kl_acc(k.acc, r_a, shift_a - shift_b, k.s_a) + term;
    k.s_a = up_a ? fmaf(k.s_a, e_a, 1.0f) : k.s_a + e_a;
    k.s_b = up_b ? fmaf(k.s_b, e_b, 1.0f) : k.s_b + e_b;
    k.m_a = m_a;
    k.m_b = m_b;
  }

  // Both sides moved to the common maxima M_a, M_b: with shift_i = (m_i - M) c (0 for an empty
  // side) and r_i = exp((m_i - M) c), s = sum_i r_i s_i per row and
  // acc = sum_i r_a,i (acc_i + (shift_a,i - shift_b,i) s_a,i). (s_a, s_b) as LseOp::combine.
  KLOPS_DEVICE Kl combine(const Kl& x, const Kl& y) const {
    const float m_a = vmax(x.m_a, y.m_a);
    const float m_b = vmax(x.m_b, y.m_b);
    const float m_a_safe = finite_or_zero(m_a);
    const float m_b_safe = finite_or_zero(m_b);
    const float shift_xa = (x.m_a - m_a_safe) * c;
    const float shift_ya = (y.m_a - m_a_safe) * c;
    const float shift_xb = (x.m_b - m_b_safe) * c;
    const float shift_yb = (y.m_b - m_b_safe) * c;
    const float r_xa = vexp(shift_xa);
    const float r_ya = vexp(shift_ya);
    // finite_or_zero: shift = -inf only for an empty side (m_i = -inf), which moves nothing
    const float dx = finite_or_zero(shift_xa) - finite_or_zero(shift_xb);
    const float dy = finite_or_zero(shift_ya) - finite_or_zero(shift_yb);
    return {m_a, x.s_a * r_xa + y.s_a * r_ya, m_b, x.s_b * vexp(shift_xb) + y.s_b * vexp(shift_yb),
            move_kl_acc(x.acc, r_xa, dx, x.s_a) + move_kl_acc(y.acc, r_ya, dy, y.s_a)};
  }
};

}  // namespace klops
