// Token-level divergences over the vocabulary (docs/losses.md §1): the CUDA twin of kernels/divergence.py.
//
// One thread block handles one row (token) r = b * L + l and streams its V entries; nothing of size
// (N, V) is allocated besides the gradient. With z the student logits, y the teacher, c = 1/T and
// the raw row maxes / shifted log-sums of online_stats.cuh (Lse):
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
// Forward: 2 sweeps (max/logsum of q, and of p for logits; then D and gbar). Forward and reverse KL
// between two logit rows need no sweep 2: D = E_a[log P_a - log P_b] is accumulated online in
// sweep 1 (KlOp), and gbar = sum_v q_v g_v is -1 (forward) or D (reverse). Backward: 1 sweep
// recomputing a from the saved max/logsum and gbar. Rows with valid = false get 0 in every output
// and a zero gradient.

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "divergence_terms.cuh"
#include "row_reduce.cuh"

namespace klops {
namespace {

// Indices of the `target` op argument (TARGET_KINDS in Python); the kinds are in divergence_terms.cuh.
enum Target : int { LOGITS, LOGPROBS, PROBS, kNumTargets };

// Entries per 16-byte access of the wider of the student and teacher storage types.
template <typename Fs, typename Ft>
constexpr int kDivergenceVec =
    16 / std::max(sizeof(typename Fs::Storage), sizeof(typename Ft::Storage));

// log p of a teacher entry y (fp32): (y - max_t) c - logsum_t for logits, y for log-probs, log y
// for probabilities.
template <int TARGET>
__device__ __forceinline__ float teacher_log(float y, float max_t, float logsum_t, float c) {
  if constexpr (TARGET == LOGITS) {
    return (y - max_t) * c - logsum_t;
  } else if constexpr (TARGET == LOGPROBS) {
    return y;
  } else {
    return logf(y);
  }
}

// W consecutive entries of the student and teacher rows, as stored.
template <typename Ss, typename St, int W>
struct Entries {
  static constexpr int kWidth = W;
  AlignedVec<Ss, W> z;
  AlignedVec<St, W> y;
};

// The load of sweep_row for one row of the student and the teacher, each with its own alignment.
template <int VEC, typename Ss, typename St>
struct RowLoader {
  RowReader<VEC, Ss> z;
  RowReader<VEC, St> y;

  template <int W>
  __device__ __forceinline__ Entries<Ss, St, W> operator()(int64_t j, Width<W> width) const {
    return {z(j, width), y(j, width)};
  }
  __device__ __forceinline__ bool any_shifted() const { return z.shifted || y.shifted; }
};

// The loader of the rows z_row, y_row for a sweep whose primary pointer's head is `head`.
template <int VEC, typename Ss, typename St>
__device__ __forceinline__ RowLoader<VEC, Ss, St> row_loader(const Ss* z_row, const St* y_row, int64_t head) {
  return {row_reader<VEC>(z_row, head), row_reader<VEC>(y_row, head)};
}

// Forward and reverse KL between two logit rows: D in one sweep (KlOp).
template <int KIND, int TARGET>
constexpr bool kOneSweepKl = TARGET == LOGITS && (KIND == FORWARD || KIND == REVERSE);

// Forward of row r = blockIdx.x over its V entries, in 2 sweeps:
//   sweep 1: max_q, logsum_q of z and, for logits only, max_t, logsum_t of y (Lse, raw units);
//            for log-probs / probs the teacher is not read and max_t = logsum_t = 0
//   sweep 2: D = sum_v loss_v, gbar = sum_v a_v, with log q_v = (z_v - max_q) c - logsum_q and
//            log p_v from teacher_log; for log-probs / probs also TeacherCheck, stored as
//            max_t = its top (max_v log p_v or max_v -p_v) and logsum_t = log sum_v p_v;
// or in 1 sweep for forward / reverse KL between logit rows (kOneSweepKl): KL(P_a || P_b) with
// (a, b) = (y, z) for forward, (z, y) for reverse, and the max / logsum of both rows from the same
// KlOp state (equal to those of LseOp); gbar = sum_v q_v g_v is -sum_v p_v = -1 (forward) or
// sum_v q_v (log q_v - log p_v) = D (reverse).
// Writes D, max_q, logsum_q, max_t, logsum_t, gbar of the row (all 0 for an invalid row).
template <typename Fs, typename Ft, int KIND, int TARGET>
__global__ void __launch_bounds__(kMaxThreads) divergence_forward_kernel(
    const typename Fs::Storage* __restrict__ z,  // (B, L, V) student logits, last-dim stride 1
    const typename Ft::Storage* __restrict__ y,  // (B, L, V) teacher, last-dim stride 1
    const bool* __restrict__ valid,              // (B*L,)
    float* __restrict__ loss_out,                // (B*L,) out: D
    float* __restrict__ max_q_out,               // (B*L,) out
    float* __restrict__ logsum_q_out,            // (B*L,) out
    float* __restrict__ max_t_out,               // (B*L,) out
    float* __restrict__ logsum_t_out,            // (B*L,) out
    float* __restrict__ gbar_out,                // (B*L,) out
    int64_t L, int64_t V, int64_t stride_zb, int64_t stride_zl, int64_t stride_yb,
    int64_t stride_yl, DivergenceParams k) {
  const int64_t row = blockIdx.x;
  const auto store = [&](float loss, float max_q, float logsum_q, float max_t, float logsum_t,
                         float gbar) {
    if (threadIdx.x == 0) {
      loss_out[row] = loss;
      max_q_out[row] = max_q;
      logsum_q_out[row] = logsum_q;
      max_t_out[row] = max_t;
      logsum_t_out[row] = logsum_t;
      gbar_out[row] = gbar;
    }
  };
  if (!valid[row]) {
    store(0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f);
    return;
  }
  const auto* z_row = z + (row / L) * stride_zb + (row % L) * stride_zl;
  const auto* y_row = y + (row / L) * stride_yb + (row % L) * stride_yl;
  constexpr int VEC = kDivergenceVec<Fs, Ft>;
  const int64_t head = vec_head<VEC>(z_row, V);  // z sets the alignment; y may be shifted
  const auto load = row_loader<VEC>(z_row, y_row, head);
  const SweepPlan plan = plan_sweep<VEC>(V, head, load.any_shifted());
  const SweepPlan plan_z = plan_sweep<VEC>(V, head, false);
  const int tid = threadIdx.x, threads = blockDim.x;
  const float c = k.inv_temperature;

  if constexpr (kOneSweepKl<KIND, TARGET>) {
    const KlOp kl_op{c};
    Kl acc = kl_op.identity();
    sweep_row<VEC>(V, plan, tid, threads, load, [&](int64_t, auto e) {
#pragma unroll
      for (int i = 0; i < decltype(e)::kWidth; ++i) {
        const float zi = Fs::to_float(e.z.val[i]);
        const float yi = Ft::to_float(e.y.val[i]);
        if constexpr (KIND == FORWARD) {  // KL(p || q): weights p
          kl_op.push(acc, yi, zi);
        } else {  // KL(q || p): weights q
          kl_op.push(acc, zi, yi);
        }
      }
    });
    acc = block_reduce(acc, kl_op);
    const float loss = acc.kl();
    const Lse q = KIND == FORWARD ? acc.lse_b() : acc.lse_a();
    const Lse p = KIND == FORWARD ? acc.lse_a() : acc.lse_b();
    store(loss, q.max(), q.logsum(), p.max(), p.logsum(), KIND == FORWARD ? -1.0f : loss);
  } else {
    const LseOp lse_op{c};
    Lse acc_q = lse_op.identity();
    float max_t = 0.0f;
    float logsum_t = 0.0f;
    if constexpr (TARGET == LOGITS) {
      Lse acc_t = lse_op.identity();
      sweep_row<VEC>(V, plan, tid, threads, load, [&](int64_t, auto e) {
#pragma unroll
        for (int i = 0; i < decltype(e)::kWidth; ++i) {
          lse_op.push(acc_q, Fs::to_float(e.z.val[i]));
          lse_op.push(acc_t, Ft::to_float(e.y.val[i]));
        }
      });
      acc_t = block_reduce(acc_t, lse_op);
      max_t = acc_t.max();
      logsum_t = acc_t.logsum();
    } else {  // the teacher is taken as given: sweep 1 reads the student only
      sweep_row<VEC>(V, plan_z, tid, threads, load.z, [&](int64_t, auto zv) {
#pragma unroll
        for (int i = 0; i < decltype(zv)::kWidth; ++i) lse_op.push(acc_q, Fs::to_float(zv.val[i]));
      });
    }
    acc_q = block_reduce(acc_q, lse_op);
    const float max_q = acc_q.max();
    const float logsum_q = acc_q.logsum();

    Sum2 acc{0.0f, 0.0f};
    TeacherCheck check = TeacherCheckOp{}.identity();
    sweep_row<VEC>(V, plan, tid, threads, load, [&](int64_t, auto e) {
#pragma unroll
      for (int i = 0; i < decltype(e)::kWidth; ++i) {
        const float lq = (Fs::to_float(e.z.val[i]) - max_q) * c - logsum_q;
        const float yi = Ft::to_float(e.y.val[i]);
        const float lp = teacher_log<TARGET>(yi, max_t, logsum_t, c);
        const Terms t = divergence_terms<KIND>(lq, lp, k);
        acc.loss += t.loss;
        acc.gbar += t.a;
        if constexpr (TARGET != LOGITS) check.push<TARGET == PROBS>(yi, lp);
      }
    });
    acc = block_reduce(acc, Sum2Op{});
    if constexpr (TARGET != LOGITS) {
      check = block_reduce(check, TeacherCheckOp{});
      max_t = check.top;
      logsum_t = logf(check.mass);
    }
    store(acc.loss, max_q, logsum_q, max_t, logsum_t, acc.gbar);
  }
}

// Backward of row r = blockIdx.x, 1 sweep: dz_v = grad_r c (a_v - q_v gbar_r), with q_v and a_v
// recomputed from the saved max_q, logsum_q, max_t, logsum_t (logits only) and gbar, plus
// grad_logp_r c (1[v = label_r] - q_v) with labels. Zeros for an invalid row.
template <typename Fs, typename Ft, int KIND, int TARGET>
__global__ void __launch_bounds__(kMaxThreads) divergence_backward_kernel(
    const float* __restrict__ grad,              // (B*L,) dLoss/dD
    const float* __restrict__ grad_logp,         // (B*L,) dLoss/dlogp, or nullptr
    const typename Fs::Storage* __restrict__ z,  // (B, L, V) student logits, last-dim stride 1
    const typename Ft::Storage* __restrict__ y,  // (B, L, V) teacher, last-dim stride 1
    const bool* __restrict__ valid,              // (B*L,)
    const int64_t* __restrict__ labels,          // (B*L,) (read with grad_logp only)
    const float* __restrict__ max_q_in,          // (B*L,)
    const float* __restrict__ logsum_q_in,       // (B*L,)
    const float* __restrict__ max_t_in,          // (B*L,) (read for logits only)
    const float* __restrict__ logsum_t_in,       // (B*L,) (read for logits only)
    const float* __restrict__ gbar_in,           // (B*L,)
    typename Fs::Storage* __restrict__ dz,       // (B*L, V) out, contiguous, student dtype
    int64_t L, int64_t V, int64_t stride_zb, int64_t stride_zl, int64_t stride_yb,
    int64_t stride_yl, DivergenceParams k) {
  const int64_t row = blockIdx.x;
  auto* dz_row = dz + row * V;
  if (!valid[row]) {
    zero_row(dz_row, V);
    return;
  }
  const auto* z_row = z + (row / L) * stride_zb + (row % L) * stride_zl;
  const auto* y_row = y + (row / L) * stride_yb + (row % L) * stride_yl;
  constexpr int VEC = kDivergenceVec<Fs, Ft>;
  const int64_t head = vec_head<VEC>(dz_row, V);  // the stored row sets the alignment
  const auto load = row_loader<VEC>(z_row, y_row, head);
  const SweepPlan plan = plan_sweep<VEC>(V, head, load.any_shifted());

  const float c = k.inv_temperature;
  const float max_q = max_q_in[row];
  const float logsum_q = logsum_q_in[row];
  const float max_t = TARGET == LOGITS ? max_t_in[row] : 0.0f;
  const float logsum_t = TARGET == LOGITS ? logsum_t_in[row] : 0.0f;
  const float gbar = gbar_in[row];
  const float scale = grad[row] * c;
  const float scale_logp = grad_logp != nullptr ? grad_logp[row] * c : 0.0f;
  const int64_t label = grad_logp != nullptr ? labels[row] : -1;
  sweep_row<VEC>(V, plan, threadIdx.x, blockDim.x, load, [&](int64_t j, auto e) {
    constexpr int W = decltype(e)::kWidth;
    float out[W];
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float lq = (Fs::to_float(e.z.val[i]) - max_q) * c - logsum_q;
      const float lp = teacher_log<TARGET>(Ft::to_float(e.y.val[i]), max_t, logsum_t, c);
      const Terms t = divergence_terms<KIND>(lq, lp, k);
      const float q = expf(lq);
      out[i] = scale * (t.a - q * gbar) + scale_logp * ((j + i == label ? 1.0f : 0.0f) - q);
    }
    store_floats<Fs>(dz_row + j, out);
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
  check_kind_and_coef(kind, coef);
  TORCH_CHECK(0 <= target && target < kNumTargets, "target must be in [0, ", int{kNumTargets},
              "), got ", target);
}

// Calls f(fs, ft, kind_c, target_c): the storage formats of the student and the teacher and the
// kind and target as integral constants, i.e. one of the 3 x 3 x 7 x 3 kernel instantiations.
template <typename F>
void dispatch_divergence(const at::Tensor& student, const at::Tensor& teacher, int64_t kind,
                         int64_t target, F&& f) {
  dispatch_format(student.scalar_type(), [&](auto fs) {
    dispatch_format(teacher.scalar_type(), [&](auto ft) {
      dispatch_index<kNumKinds>(kind, [&](auto kind_c) {
        dispatch_index<kNumTargets>(target,
                                    [&](auto target_c) { f(fs, ft, kind_c, target_c); });
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
divergence_forward(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid,
                   int64_t kind, int64_t target, double temperature, double coef) {
  check_divergence_inputs(student, teacher, valid, kind, target, coef);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(student));
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2);
  const auto options = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B, L}, options);
  at::Tensor max_q = at::empty({B, L}, options);
  at::Tensor logsum_q = at::empty({B, L}, options);
  at::Tensor max_t = at::empty({B, L}, options);
  at::Tensor logsum_t = at::empty({B, L}, options);
  at::Tensor gbar = at::empty({B, L}, options);
  if (B * L == 0) return {loss, max_q, logsum_q, max_t, logsum_t, gbar};

  const at::Tensor valid_c = valid.contiguous();
  const DivergenceParams params = make_params(temperature, coef);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto fs, auto ft, auto kind_c, auto target_c) {
    using Fs = decltype(fs);
    using Ft = decltype(ft);
    const int threads = row_threads(V, kDivergenceVec<Fs, Ft>);
    divergence_forward_kernel<Fs, Ft, decltype(kind_c)::value, decltype(target_c)::value>
        <<<static_cast<unsigned>(B * L), threads, 0, stream>>>(
            storage_ptr<Fs>(student), storage_ptr<Ft>(teacher), valid_c.const_data_ptr<bool>(),
            loss.mutable_data_ptr<float>(), max_q.mutable_data_ptr<float>(),
            logsum_q.mutable_data_ptr<float>(), max_t.mutable_data_ptr<float>(),
            logsum_t.mutable_data_ptr<float>(), gbar.mutable_data_ptr<float>(), L, V,
            student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  dispatch_divergence(student, teacher, kind, target, launch);
  return {loss, max_q, logsum_q, max_t, logsum_t, gbar};
}

at::Tensor divergence_backward(const at::Tensor& grad, const std::optional<at::Tensor>& grad_logp,
                               const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& valid, const std::optional<at::Tensor>& labels,
                               const at::Tensor& max_q, const at::Tensor& logsum_q,
                               const at::Tensor& max_t, const at::Tensor& logsum_t,
                               const at::Tensor& gbar, int64_t kind, int64_t target,
                               double temperature, double coef) {
  check_divergence_inputs(student, teacher, valid, kind, target, coef);
  const auto rows_shape = student.sizes().slice(0, 2);
  check_per_row(grad, "grad", rows_shape, student.device(), {at::kFloat});
  check_per_row(max_q, "max_q", rows_shape, student.device(), {at::kFloat});
  check_per_row(logsum_q, "logsum_q", rows_shape, student.device(), {at::kFloat});
  check_per_row(max_t, "max_t", rows_shape, student.device(), {at::kFloat});
  check_per_row(logsum_t, "logsum_t", rows_shape, student.device(), {at::kFloat});
  check_per_row(gbar, "gbar", rows_shape, student.device(), {at::kFloat});
  std::optional<at::Tensor> grad_logp_c, labels_c;  // both or neither
  if (grad_logp.has_value()) {
    TORCH_CHECK(labels.has_value(), "grad_logp needs labels");
    check_per_row(*grad_logp, "grad_logp", rows_shape, student.device(), {at::kFloat});
    check_per_row(*labels, "labels", rows_shape, student.device(), {at::kLong});
    grad_logp_c = grad_logp->contiguous();
    labels_c = labels->contiguous();
  }
  const at::cuda::OptionalCUDAGuard device_guard(device_of(student));
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2);
  at::Tensor dz = at::empty({B, L, V}, student.options());
  if (B * L == 0) return dz;

  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor valid_c = valid.contiguous();
  const at::Tensor max_q_c = max_q.contiguous();
  const at::Tensor logsum_q_c = logsum_q.contiguous();
  const at::Tensor max_t_c = max_t.contiguous();
  const at::Tensor logsum_t_c = logsum_t.contiguous();
  const at::Tensor gbar_c = gbar.contiguous();
  const DivergenceParams params = make_params(temperature, coef);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto fs, auto ft, auto kind_c, auto target_c) {
    using Fs = decltype(fs);
    using Ft = decltype(ft);
    const int threads = row_threads(V, kDivergenceVec<Fs, Ft>);
    divergence_backward_kernel<Fs, Ft, decltype(kind_c)::value, decltype(target_c)::value>
        <<<static_cast<unsigned>(B * L), threads, 0, stream>>>(
            grad_c.const_data_ptr<float>(),
            grad_logp_c.has_value() ? grad_logp_c->const_data_ptr<float>() : nullptr,
            storage_ptr<Fs>(student), storage_ptr<Ft>(teacher), valid_c.const_data_ptr<bool>(),
            labels_c.has_value() ? labels_c->const_data_ptr<int64_t>() : nullptr,
            max_q_c.const_data_ptr<float>(),
            logsum_q_c.const_data_ptr<float>(), max_t_c.const_data_ptr<float>(),
            logsum_t_c.const_data_ptr<float>(), gbar_c.const_data_ptr<float>(),
            mutable_storage_ptr<Fs>(dz), L, V, student.stride(0), student.stride(1),
            teacher.stride(0), teacher.stride(1), params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  dispatch_divergence(student, teacher, kind, target, launch);
  return dz;
}

}  // namespace
}  // namespace klops

TORCH_LIBRARY_IMPL(klops_C, CUDA, m) {
  m.impl("divergence_forward", &klops::divergence_forward);
  m.impl("divergence_backward", &klops::divergence_backward);
}
