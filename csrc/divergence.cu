// Token-level divergences over the vocabulary (SPEC.md §1): the CUDA twin of kernels/divergence.py.
//
// One thread block handles one row (token) r = b * L + l and streams its V entries; nothing of size
// (N, V) is allocated besides the gradient. With z the student logits, y the teacher, T the
// temperature:
//
//     log q = z/T - lse_q                         lse_q = logsumexp(z/T)
//     log p = t - lse_t  (target "logits", t = y/T)
//     log p = t          (target "logprobs", t = y; "probs", t = log y)
//
//     D    = sum_v loss_v                         loss_v: the kind's per-entry term
//     a_v  = q_v g_v                              g_v = f(u_v) - u_v f'(u_v), u = p/q
//     gbar = sum_v a_v
//     dD/dz_j = (a_j - q_j gbar) / T
//
// Forward: 2 sweeps (lse_q and lse_t, then D and gbar). Backward: 1 sweep recomputing a from the
// saved lse_q, lse_t and gbar. Rows with valid = false get D = 0 and a zero gradient.

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "row_reduce.cuh"

namespace klops {
namespace {

// Indices of the `kind` and `target` op arguments (DIVERGENCE_KINDS, TARGET_KINDS in Python).
enum Kind : int { FORWARD, REVERSE, JSD, SKEW_FORWARD, SKEW_REVERSE, TV, ALPHA, kNumKinds };
enum Target : int { LOGITS, LOGPROBS, PROBS, kNumTargets };

struct DivergenceParams {
  float inv_temperature;  // 1 / T
  float coef;             // beta (jsd) or alpha (skew_*, alpha)
  float log_coef;         // log(coef), -inf at coef = 0: mixture weight of jsd / skew_*
  float log_1m_coef;      // log(1 - coef), -inf at coef = 1
  float inv_coef;         // 1 / coef (alpha)
  float inv_alpha_norm;   // 1 / (coef (1 - coef)) (alpha)
};

template <typename Ts, typename Tt>
constexpr int kDivergenceVec = 16 / (sizeof(Ts) > sizeof(Tt) ? sizeof(Ts) : sizeof(Tt));

// t = y/T for logits, y for log-probs, log y for probabilities.
template <int TARGET>
__device__ __forceinline__ float teacher_log(float y, float inv_temperature) {
  if constexpr (TARGET == LOGITS) {
    return y * inv_temperature;
  } else if constexpr (TARGET == LOGPROBS) {
    return y;
  } else {
    return logf(y);
  }
}

// log(exp(a) + exp(b)), -inf when both are -inf.
__device__ __forceinline__ float logaddexp(float a, float b) {
  const float mx = fmaxf(a, b);
  const float mn = fminf(a, b);
  return mx + logf(1.0f + expf(mn - finite_or_zero(mx)));
}

struct Terms {
  float loss;  // loss_v
  float a;     // a_v = q_v g_v
};

// Per-entry terms of the kind from lq = log q_v and lp = log p_v (either may be -inf).
template <int KIND>
__device__ __forceinline__ Terms divergence_terms(float lq, float lp, const DivergenceParams& k) {
  const float q = expf(lq);
  const float p = expf(lp);
  const bool q_pos = lq != kNegInf;
  const bool p_pos = lp != kNegInf;
  const float coef = k.coef;
  Terms t;
  if constexpr (KIND == FORWARD) {  // sum p (log p - log q); g = -u
    t.loss = p_pos ? p * (lp - lq) : 0.0f;
    t.a = -p;
  } else if constexpr (KIND == REVERSE) {  // sum q (log q - log p); g = log q - log p + const
    t.loss = q_pos ? q * (lq - lp) : 0.0f;
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
    t.a = (p_pos && q_pos) ? -(1.0f - coef) * expf(lp + lq - lm) : 0.0f;
  } else if constexpr (KIND == SKEW_REVERSE) {
    // n = (1-alpha) p + alpha q; KL(q||n); g = log(q/n) + 1 - alpha q/n
    const float ln = logaddexp(k.log_1m_coef + lp, k.log_coef + lq);
    const float log_qn = q_pos ? lq - ln : 0.0f;
    t.loss = q * log_qn;
    t.a = q * (log_qn + 1.0f - coef * expf(log_qn));
  } else if constexpr (KIND == TV) {  // 0.5 sum |p - q|; g = 0.5 sign(q - p)
    t.loss = 0.5f * fabsf(p - q);
    t.a = 0.5f * q * (q > p ? 1.0f : (q < p ? -1.0f : 0.0f));
  } else {  // ALPHA (Amari): (1 - sum p^a q^(1-a)) / (a (1-a)); g = -u^a / a
    static_assert(KIND == ALPHA, "unknown divergence kind");
    const float w = expf(coef * lp + (1.0f - coef) * lq);
    t.loss = (q - w) * k.inv_alpha_norm;
    t.a = -w * k.inv_coef;
  }
  // Entries where both distributions are 0 carry no mass and no gradient.
  if (!p_pos && !q_pos) t = {0.0f, 0.0f};
  return t;
}

// Two running sums (D and gbar) for block_reduce.
struct Sum2 {
  float loss;
  float gbar;

  static __device__ __forceinline__ Sum2 identity() { return {0.0f, 0.0f}; }
  static __device__ __forceinline__ Sum2 combine(const Sum2& a, const Sum2& b) {
    return {a.loss + b.loss, a.gbar + b.gbar};
  }
  __device__ __forceinline__ Sum2 shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, loss, lane_mask), __shfl_xor_sync(0xffffffffu, gbar, lane_mask)};
  }
};

// W consecutive entries of the student and teacher rows, as loaded.
template <typename Ts, typename Tt, int W>
struct Entries {
  static constexpr int kWidth = W;
  AlignedVec<Ts, W> z;
  AlignedVec<Tt, W> y;
};

// The load of sweep_row for one row of the student and the teacher.
template <typename Ts, typename Tt>
struct RowLoader {
  const Ts* z_row;
  const Tt* y_row;

  template <int W>
  __device__ __forceinline__ Entries<Ts, Tt, W> operator()(int64_t j, Width<W>) const {
    return {load_vec<W>(z_row + j), load_vec<W>(y_row + j)};
  }
};

// Forward of row r = blockIdx.x, 2 sweeps over its V entries:
//   sweep 1: lse_q = logsumexp_v(z_v / T), lse_t = logsumexp_v(t_v)
//   sweep 2: D = sum_v loss_v, gbar = sum_v a_v, with log q_v = z_v/T - lse_q and
//            log p_v = t_v - lse_t for logits, t_v for log-probs / probs (not renormalized).
// Writes D, lse_q, lse_t, gbar of the row (all 0 for an invalid row).
template <typename Ts, typename Tt, int KIND, int TARGET>
__global__ void __launch_bounds__(kMaxThreads) divergence_forward_kernel(
    const Ts* __restrict__ z, const Tt* __restrict__ y, const bool* __restrict__ valid,
    float* __restrict__ loss_out, float* __restrict__ lse_q_out, float* __restrict__ lse_t_out,
    float* __restrict__ gbar_out, int64_t L, int64_t V, int64_t stride_zb, int64_t stride_zl,
    int64_t stride_yb, int64_t stride_yl, DivergenceParams k) {
  const int64_t row = blockIdx.x;
  if (!valid[row]) {
    if (threadIdx.x == 0) {
      loss_out[row] = 0.0f;
      lse_q_out[row] = 0.0f;
      lse_t_out[row] = 0.0f;
      gbar_out[row] = 0.0f;
    }
    return;
  }
  const Ts* z_row = z + (row / L) * stride_zb + (row % L) * stride_zl;
  const Tt* y_row = y + (row / L) * stride_yb + (row % L) * stride_yl;
  constexpr int VEC = kDivergenceVec<Ts, Tt>;
  const int64_t head = vec_head<VEC>(z_row, V);
  const bool vectorized = is_vec_aligned<VEC>(z_row + head) && is_vec_aligned<VEC>(y_row + head);

  const RowLoader<Ts, Tt> load{z_row, y_row};
  LseAcc acc_q = LseAcc::identity();
  LseAcc acc_t = LseAcc::identity();
  sweep_row<VEC>(V, head, vectorized, load, [&](int64_t, auto e) {
#pragma unroll
    for (int i = 0; i < decltype(e)::kWidth; ++i) {
      acc_q.push(e.z.get(i) * k.inv_temperature);
      acc_t.push(teacher_log<TARGET>(e.y.get(i), k.inv_temperature));
    }
  });
  const float lse_q = block_reduce(acc_q).lse();
  const float lse_t = block_reduce(acc_t).lse();
  const float norm_t = TARGET == LOGITS ? lse_t : 0.0f;  // log-probs / probs are taken as given

  Sum2 acc = Sum2::identity();
  sweep_row<VEC>(V, head, vectorized, load, [&](int64_t, auto e) {
#pragma unroll
    for (int i = 0; i < decltype(e)::kWidth; ++i) {
      const float lp = teacher_log<TARGET>(e.y.get(i), k.inv_temperature) - norm_t;
      const Terms t = divergence_terms<KIND>(e.z.get(i) * k.inv_temperature - lse_q, lp, k);
      acc.loss += t.loss;
      acc.gbar += t.a;
    }
  });
  acc = block_reduce(acc);
  if (threadIdx.x == 0) {
    loss_out[row] = acc.loss;
    lse_q_out[row] = lse_q;
    lse_t_out[row] = lse_t;
    gbar_out[row] = acc.gbar;
  }
}

// Backward of row r = blockIdx.x, 1 sweep: dz_v = grad_r / T * (a_v - q_v gbar_r), with q_v and
// a_v recomputed from the saved lse_q, lse_t (logits only) and gbar. Zeros for an invalid row.
template <typename Ts, typename Tt, int KIND, int TARGET>
__global__ void __launch_bounds__(kMaxThreads) divergence_backward_kernel(
    const float* __restrict__ grad, const Ts* __restrict__ z, const Tt* __restrict__ y,
    const bool* __restrict__ valid, const float* __restrict__ lse_q_in,
    const float* __restrict__ lse_t_in, const float* __restrict__ gbar_in, Ts* __restrict__ dz,
    int64_t L, int64_t V, int64_t stride_zb, int64_t stride_zl, int64_t stride_yb,
    int64_t stride_yl, DivergenceParams k) {
  const int64_t row = blockIdx.x;
  Ts* dz_row = dz + row * V;
  if (!valid[row]) {
    zero_row(dz_row, V);
    return;
  }
  const Ts* z_row = z + (row / L) * stride_zb + (row % L) * stride_zl;
  const Tt* y_row = y + (row / L) * stride_yb + (row % L) * stride_yl;
  constexpr int VEC = kDivergenceVec<Ts, Tt>;
  const int64_t head = vec_head<VEC>(z_row, V);
  const bool vectorized = is_vec_aligned<VEC>(z_row + head) &&
                          is_vec_aligned<VEC>(y_row + head) && is_vec_aligned<VEC>(dz_row + head);

  const float lse_q = lse_q_in[row];
  const float norm_t = TARGET == LOGITS ? lse_t_in[row] : 0.0f;
  const float gbar = gbar_in[row];
  const float scale = grad[row] * k.inv_temperature;
  const RowLoader<Ts, Tt> load{z_row, y_row};
  sweep_row<VEC>(V, head, vectorized, load, [&](int64_t j, auto e) {
    constexpr int W = decltype(e)::kWidth;
    float out[W];
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float lq = e.z.get(i) * k.inv_temperature - lse_q;
      const float lp = teacher_log<TARGET>(e.y.get(i), k.inv_temperature) - norm_t;
      const Terms t = divergence_terms<KIND>(lq, lp, k);
      out[i] = scale * (t.a - expf(lq) * gbar);
    }
    store_floats<W>(dz_row + j, out);
  });
}

// ------------------------------------------------------------------------------------------------
// Host side

void check_divergence_inputs(const at::Tensor& student, const at::Tensor& teacher,
                             const at::Tensor& valid, int64_t kind, int64_t target, double coef) {
  check_rows(student, "student");
  check_rows(teacher, "teacher");
  TORCH_CHECK(teacher.device() == student.device(), "teacher must be on ", student.device(),
              ", got ", teacher.device());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "teacher shape ", teacher.sizes(),
              " != student shape ", student.sizes());
  check_per_row(valid, "valid", student.sizes().slice(0, 2), student.device(), {at::kBool});
  TORCH_CHECK(0 <= kind && kind < kNumKinds, "kind must be in [0, ", int{kNumKinds}, "), got ", kind);
  TORCH_CHECK(0 <= target && target < kNumTargets, "target must be in [0, ", int{kNumTargets},
              "), got ", target);
  const bool mixture = kind == JSD || kind == SKEW_FORWARD || kind == SKEW_REVERSE;
  TORCH_CHECK(!mixture || (0.0 <= coef && coef <= 1.0), "coef must be in [0, 1] for kind ", kind,
              ", got ", coef);
}

DivergenceParams make_params(double temperature, double coef) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid, int64_t kind,
    int64_t target, double temperature, double coef) {
  check_divergence_inputs(student, teacher, valid, kind, target, coef);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(student));
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2);
  const auto options = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B, L}, options);
  at::Tensor lse_q = at::empty({B, L}, options);
  at::Tensor lse_t = at::empty({B, L}, options);
  at::Tensor gbar = at::empty({B, L}, options);
  if (B * L == 0) return {loss, lse_q, lse_t, gbar};

  const at::Tensor valid_c = valid.contiguous();
  const DivergenceParams params = make_params(temperature, coef);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(student.scalar_type(), [&](auto s) {
    using Ts = decltype(s);
    dispatch_float(teacher.scalar_type(), [&](auto t) {
      using Tt = decltype(t);
      dispatch_index<kNumKinds>(kind, [&](auto kind_c) {
        dispatch_index<kNumTargets>(target, [&](auto target_c) {
          const int threads = row_threads(V, kDivergenceVec<Ts, Tt>);
          divergence_forward_kernel<Ts, Tt, decltype(kind_c)::value, decltype(target_c)::value>
              <<<static_cast<unsigned>(B * L), threads, 0, stream>>>(
                  student.const_data_ptr<Ts>(), teacher.const_data_ptr<Tt>(),
                  valid_c.const_data_ptr<bool>(), loss.mutable_data_ptr<float>(),
                  lse_q.mutable_data_ptr<float>(), lse_t.mutable_data_ptr<float>(),
                  gbar.mutable_data_ptr<float>(), L, V, student.stride(0), student.stride(1),
                  teacher.stride(0), teacher.stride(1), params);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return {loss, lse_q, lse_t, gbar};
}

at::Tensor divergence_backward(const at::Tensor& grad, const at::Tensor& student,
                               const at::Tensor& teacher, const at::Tensor& valid,
                               const at::Tensor& lse_q, const at::Tensor& lse_t,
                               const at::Tensor& gbar, int64_t kind, int64_t target,
                               double temperature, double coef) {
  check_divergence_inputs(student, teacher, valid, kind, target, coef);
  const auto rows_shape = student.sizes().slice(0, 2);
  check_per_row(grad, "grad", rows_shape, student.device(), {at::kFloat});
  check_per_row(lse_q, "lse_q", rows_shape, student.device(), {at::kFloat});
  check_per_row(lse_t, "lse_t", rows_shape, student.device(), {at::kFloat});
  check_per_row(gbar, "gbar", rows_shape, student.device(), {at::kFloat});
  const at::cuda::OptionalCUDAGuard device_guard(device_of(student));
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2);
  at::Tensor dz = at::empty({B, L, V}, student.options());
  if (B * L == 0) return dz;

  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor valid_c = valid.contiguous();
  const at::Tensor lse_q_c = lse_q.contiguous();
  const at::Tensor lse_t_c = lse_t.contiguous();
  const at::Tensor gbar_c = gbar.contiguous();
  const DivergenceParams params = make_params(temperature, coef);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(student.scalar_type(), [&](auto s) {
    using Ts = decltype(s);
    dispatch_float(teacher.scalar_type(), [&](auto t) {
      using Tt = decltype(t);
      dispatch_index<kNumKinds>(kind, [&](auto kind_c) {
        dispatch_index<kNumTargets>(target, [&](auto target_c) {
          const int threads = row_threads(V, kDivergenceVec<Ts, Tt>);
          divergence_backward_kernel<Ts, Tt, decltype(kind_c)::value, decltype(target_c)::value>
              <<<static_cast<unsigned>(B * L), threads, 0, stream>>>(
                  grad_c.const_data_ptr<float>(), student.const_data_ptr<Ts>(),
                  teacher.const_data_ptr<Tt>(), valid_c.const_data_ptr<bool>(),
                  lse_q_c.const_data_ptr<float>(), lse_t_c.const_data_ptr<float>(),
                  gbar_c.const_data_ptr<float>(), dz.mutable_data_ptr<Ts>(), L, V,
                  student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
                  params);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return dz;
}

}  // namespace
}  // namespace klops

TORCH_LIBRARY_IMPL(klops_C, CUDA, m) {
  m.impl("divergence_forward", &klops::divergence_forward);
  m.impl("divergence_backward", &klops::divergence_backward);
}
