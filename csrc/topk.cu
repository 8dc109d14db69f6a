// Divergences against a sparse top-k teacher (klops.TopK): the CUDA twin of kernels/topk.py, where the
// math is written out. One thread block handles one row r = b * L + l; with S the row's k sorted
// teacher ids, Q the student's mass outside S and qc = softmax over the entries outside S:
//
//     D    = sum_S loss(q_i, p_i) + loss_tail        (tail: the bin, or linear in Q when renormalized)
//     dz_j = (a_j - q_j gbar) / T = d_j / T           j in S
//     dz_j = qc_j (a_tail - Q gbar) / T                j not in S
//
// Forward: a bitmap of S in shared memory (ceil(V / 32) words), then one sweep over the student row
// for the (max, logsum) of the entries outside S (LseOp, raw units), so that log Q keeps full
// precision however small Q is; then three passes over the k members (their lse and the teacher's
// mass; their terms; d_i = a_i - q_i gbar). Backward: one sweep writing qc_j (a_tail - Q gbar) on
// every entry, then, after a barrier, the k corrections d_i in place (both scaled by the row's
// gradient in klops/topk.py, with the label's log-prob folded in when asked); it needs neither the
// teacher nor the kind. Rows with valid = false get 0 in every output and a zero gradient.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "divergence_terms.cuh"
#include "row_reduce.cuh"

namespace klops {
namespace {

// The bitmap of S and the kernel's static shared memory (block_reduce's partial arrays, 512 B) must fit
// the 48 KiB a launch gets without opting in to more: 1 KiB is left for the static part, V <= 385024.
constexpr int64_t kMaxTopkVocab = (48 - 1) * 1024 * 8;

// (max, logsum) of the union of two sets of entries from theirs; an empty set has logsum -inf.
__device__ __forceinline__ Lse combine_lse(float max_a, float logsum_a, float max_b,
                                           float logsum_b, float c) {
  const float mx =
      logsum_a == kNegInf ? max_b : (logsum_b == kNegInf ? max_a : fmaxf(max_a, max_b));
  return {mx, expf((max_a - mx) * c + logsum_a) + expf((max_b - mx) * c + logsum_b)};
}

// The student logit of member i in fp32: NaN for an id outside [0, V) (possible only when the eager
// checks are skipped), which is never read.
template <typename Fs>
__device__ __forceinline__ float member_logit(const typename Fs::Storage* z_row, const int32_t* ids,
                                              int i, int64_t V) {
  const int32_t id = ids[i];
  return (0 <= id && id < V) ? Fs::to_float(z_row[id]) : __int_as_float(0x7fc00000);
}

// Forward of row r = blockIdx.x. Writes D, max_c, logsum_c, tail_scale of the row and its k d_i.
template <typename Fs, typename Ft, int KIND, int BIN>
__global__ void __launch_bounds__(kMaxThreads) topk_divergence_forward_kernel(
    const typename Fs::Storage* __restrict__ z,    // (B, L, V) student logits, last-dim stride 1
    const int32_t* __restrict__ indices,           // (B*L, K) sorted teacher ids
    const typename Ft::Storage* __restrict__ tlp,  // (B*L, K) teacher log-probs of those ids
    const bool* __restrict__ valid,                // (B*L,)
    float* __restrict__ loss_out,                  // (B*L,) out: D
    float* __restrict__ max_c_out,                 // (B*L,) out: raw max of z outside S
    float* __restrict__ logsum_c_out,              // (B*L,) out
    float* __restrict__ tail_scale_out,            // (B*L,) out: a_tail - Q gbar
    float* __restrict__ member_d,                  // (B*L, K) out: d_i = a_i - q_i gbar
    int64_t L, int64_t V, int K, int64_t stride_zb, int64_t stride_zl, DivergenceParams k,
    float tail_loss, float tail_grad) {
  extern __shared__ uint32_t in_topk[];  // bit v: v is in S
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, threads = blockDim.x;
  const int32_t* ids = indices + row * K;
  const auto* lp_row = tlp + row * K;
  float* d_row = member_d + row * K;
  if (!valid[row]) {
    for (int i = tid; i < K; i += threads) d_row[i] = 0.0f;
    if (tid == 0) {
      loss_out[row] = max_c_out[row] = logsum_c_out[row] = tail_scale_out[row] = 0.0f;
    }
    return;
  }
  const auto* z_row = z + (row / L) * stride_zb + (row % L) * stride_zl;
  const int64_t words = (V + 31) / 32;
  for (int64_t w = tid; w < words; w += threads) in_topk[w] = 0u;
  __syncthreads();
  for (int i = tid; i < K; i += threads) {
    const int32_t id = ids[i];
    if (0 <= id && id < V) atomicOr(&in_topk[id >> 5], 1u << (id & 31));
  }
  __syncthreads();

  // Sweep: (max, logsum) of the entries outside S.
  const float c = k.inv_temperature;
  const LseOp lse_op{c};
  constexpr int VEC = 16 / sizeof(typename Fs::Storage);
  const int64_t head = vec_head<VEC>(z_row, V);
  const auto load = row_reader<VEC>(z_row, head);
  const SweepPlan plan = plan_sweep<VEC>(V, head, false);
  Lse outside = lse_op.identity();
  sweep_row<VEC>(V, plan, tid, threads, load, [&](int64_t j, auto zv) {
#pragma unroll
    for (int i = 0; i < decltype(zv)::kWidth; ++i) {
      const int64_t v = j + i;
      const bool member = (in_topk[v >> 5] >> (v & 31)) & 1u;
      lse_op.push(outside, member ? kNegInf : Fs::to_float(zv.val[i]));
    }
  });
  outside = block_reduce(outside, lse_op);
  const float max_c = outside.max();
  const float logsum_c = outside.logsum();

  // Members, pass 1: their (max, logsum), for the full lse; and log sum p_S of the teacher.
  const LseOp teacher_op{1.0f};
  Lse members = lse_op.identity();
  Lse mass_p = teacher_op.identity();
  for (int i = tid; i < K; i += threads) {
    lse_op.push(members, member_logit<Fs>(z_row, ids, i, V));
    teacher_op.push(mass_p, Ft::to_float(lp_row[i]));
  }
  members = block_reduce(members, lse_op);
  mass_p = block_reduce(mass_p, teacher_op);
  const float max_s = members.max();
  const float logsum_s = members.logsum();
  const float log_mass_p = mass_p.max() + mass_p.logsum();  // log sum p_S
  const Lse all = combine_lse(max_c, logsum_c, max_s, logsum_s, c);
  const float max_q = all.max();
  const float logsum_q = all.logsum();
  const float log_tail_q = (max_c - max_q) * c + logsum_c - logsum_q;  // log Q
  float loss_tail, a_tail, shift_p;
  if constexpr (BIN) {
    const float log_tail_p = K < V ? logf(fmaxf(1.0f - expf(log_mass_p), 0.0f)) : kNegInf;
    const Terms t = divergence_terms<KIND>(K < V ? log_tail_q : kNegInf, log_tail_p, k);
    loss_tail = t.loss;
    a_tail = t.a;
    shift_p = 0.0f;
  } else {
    loss_tail = tail_loss * expf(log_tail_q);
    a_tail = tail_grad * expf(log_tail_q);
    shift_p = log_mass_p;
  }

  // Members, pass 2: their terms; a_i is parked in member_d until gbar is known (each thread reads
  // back only what it wrote, so no barrier is needed).
  Sum2 sums{0.0f, 0.0f};
  for (int i = tid; i < K; i += threads) {
    const float lq = (member_logit<Fs>(z_row, ids, i, V) - max_q) * c - logsum_q;
    const Terms t = divergence_terms<KIND>(lq, Ft::to_float(lp_row[i]) - shift_p, k);
    sums.loss += t.loss;
    sums.gbar += t.a;
    d_row[i] = t.a;
  }
  sums = block_reduce(sums, Sum2Op{});
  const float gbar = sums.gbar + a_tail;

  // Members, pass 3: d_i = a_i - q_i gbar.
  for (int i = tid; i < K; i += threads) {
    const float lq = (member_logit<Fs>(z_row, ids, i, V) - max_q) * c - logsum_q;
    d_row[i] -= expf(lq) * gbar;
  }
  if (tid == 0) {
    loss_out[row] = sums.loss + loss_tail;
    max_c_out[row] = max_c;
    logsum_c_out[row] = logsum_c;
    // a_tail - Q gbar = a_tail sum q_S - Q sum a_S: nothing of size 1 cancels when Q is near 1.
    const float mass_q_s = expf((max_s - max_q) * c + logsum_s - logsum_q);
    tail_scale_out[row] = a_tail * mass_q_s - expf(log_tail_q) * sums.gbar;
  }
}

// Backward of row r = blockIdx.x: dz_j = c qc_j tail_coef_r on every entry (0 where z_j = -inf), then
// the k members' dz_i = c value_i over them; + c label_coef_r at the label when there are labels
// (klops/topk.py folds the rows' gradients, and the -q of the label's log-prob, into tail_coef and
// value). Zeros for an invalid row.
template <typename Fs>
__global__ void __launch_bounds__(kMaxThreads) topk_divergence_backward_kernel(
    const float* __restrict__ tail_coef,         // (B*L,)
    const typename Fs::Storage* __restrict__ z,  // (B, L, V) student logits, last-dim stride 1
    const int32_t* __restrict__ indices,         // (B*L, K) sorted teacher ids
    const bool* __restrict__ valid,              // (B*L,)
    const float* __restrict__ max_c_in,          // (B*L,)
    const float* __restrict__ logsum_c_in,       // (B*L,)
    const float* __restrict__ member_value,      // (B*L, K)
    const float* __restrict__ label_coef,        // (B*L,) or nullptr
    const int64_t* __restrict__ labels,          // (B*L,) (read with label_coef only)
    typename Fs::Storage* __restrict__ dz,       // (B*L, V) out, contiguous, student dtype
    int64_t L, int64_t V, int K, int64_t stride_zb, int64_t stride_zl, float inv_temperature) {
  const int64_t row = blockIdx.x;
  auto* dz_row = dz + row * V;
  if (!valid[row]) {
    zero_row(dz_row, V);
    return;
  }
  const auto* z_row = z + (row / L) * stride_zb + (row % L) * stride_zl;
  constexpr int VEC = 16 / sizeof(typename Fs::Storage);
  const int64_t head = vec_head<VEC>(dz_row, V);  // the stored row sets the alignment
  const auto load = row_reader<VEC>(z_row, head);
  const SweepPlan plan = plan_sweep<VEC>(V, head, load.shifted);

  const float max_c = max_c_in[row];
  const float logsum_c = logsum_c_in[row];
  const float tail = tail_coef[row] * inv_temperature;
  const float label_scale = label_coef != nullptr ? label_coef[row] * inv_temperature : 0.0f;
  const int64_t label = label_coef != nullptr ? labels[row] : -1;
  sweep_row<VEC>(V, plan, threadIdx.x, blockDim.x, load, [&](int64_t j, auto zv) {
    constexpr int W = decltype(zv)::kWidth;
    float out[W];
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float zi = Fs::to_float(zv.val[i]);
      out[i] = (zi == kNegInf ? 0.0f : tail * expf((zi - max_c) * inv_temperature - logsum_c)) +
               (j + i == label ? label_scale : 0.0f);
    }
    store_floats<Fs>(dz_row + j, out);
  });
  __syncthreads();  // the sweep's stores are visible to (and overwritten by) the block's below
  const int32_t* ids = indices + row * K;
  for (int i = threadIdx.x; i < K; i += blockDim.x) {
    const int32_t id = ids[i];
    if (0 <= id && id < V) {
      const float value = member_value[row * K + i] * inv_temperature + (id == label ? label_scale : 0.0f);
      dz_row[id] = Fs::from_float(value);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side

void check_topk_inputs(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& valid) {
  check_rows(student, "student");
  TORCH_CHECK(student.size(2) <= kMaxTopkVocab, "the CUDA top-k kernels take V <= ", kMaxTopkVocab,
              ", got ", student.size(2), "; use backend='triton'");
  TORCH_CHECK(indices.dim() == 3 && indices.size(0) == student.size(0) &&
                  indices.size(1) == student.size(1) && indices.size(2) >= 1,
              "indices must have shape (B, L, K) with K >= 1, got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt && indices.is_contiguous(),
              "indices must be contiguous int32");
  TORCH_CHECK(indices.device() == student.device(), "indices must be on ", student.device());
  check_per_row(valid, "valid", student.sizes().slice(0, 2), student.device(), {at::kBool});
}

void check_per_member(const at::Tensor& t, const char* name, const at::Tensor& indices) {
  TORCH_CHECK(t.sizes() == indices.sizes() && t.is_contiguous() && t.device() == indices.device(),
              name, " must be contiguous with the shape of indices ", indices.sizes(), " on ",
              indices.device(), ", got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_divergence_forward(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& teacher_logprobs,
    const at::Tensor& valid, int64_t kind, bool bin, double temperature, double coef,
    double tail_loss, double tail_grad) {
  check_topk_inputs(student, indices, valid);
  check_per_member(teacher_logprobs, "teacher_logprobs", indices);
  check_kind_and_coef(kind, coef);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(student));
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2);
  const int K = static_cast<int>(indices.size(2));
  const auto options = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B, L}, options);
  at::Tensor max_c = at::empty({B, L}, options);
  at::Tensor logsum_c = at::empty({B, L}, options);
  at::Tensor tail_scale = at::empty({B, L}, options);
  at::Tensor member_d = at::empty({B, L, K}, options);
  if (B * L == 0) return {loss, max_c, logsum_c, tail_scale, member_d};

  const at::Tensor valid_c = valid.contiguous();
  const DivergenceParams params = make_params(temperature, coef);
  const size_t bitmap_bytes = static_cast<size_t>((V + 31) / 32) * sizeof(uint32_t);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_format(student.scalar_type(), [&](auto fs) {
    dispatch_format(teacher_logprobs.scalar_type(), [&](auto ft) {
      dispatch_index<kNumKinds>(kind, [&](auto kind_c) {
        dispatch_index<2>(bin, [&](auto bin_c) {
          using Fs = decltype(fs);
          using Ft = decltype(ft);
          const int threads = row_threads(V, 16 / sizeof(typename Fs::Storage));
          topk_divergence_forward_kernel<Fs, Ft, decltype(kind_c)::value, decltype(bin_c)::value>
              <<<static_cast<unsigned>(B * L), threads, bitmap_bytes, stream>>>(
                  storage_ptr<Fs>(student), indices.const_data_ptr<int32_t>(),
                  storage_ptr<Ft>(teacher_logprobs), valid_c.const_data_ptr<bool>(),
                  loss.mutable_data_ptr<float>(), max_c.mutable_data_ptr<float>(),
                  logsum_c.mutable_data_ptr<float>(), tail_scale.mutable_data_ptr<float>(),
                  member_d.mutable_data_ptr<float>(), L, V, K, student.stride(0), student.stride(1),
                  params, static_cast<float>(tail_loss), static_cast<float>(tail_grad));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return {loss, max_c, logsum_c, tail_scale, member_d};
}

at::Tensor topk_divergence_backward(const at::Tensor& tail_coef, const at::Tensor& student,
                                    const at::Tensor& indices, const at::Tensor& valid,
                                    const at::Tensor& max_c, const at::Tensor& logsum_c,
                                    const at::Tensor& member_value,
                                    const std::optional<at::Tensor>& label_coef,
                                    const std::optional<at::Tensor>& labels, double temperature) {
  check_topk_inputs(student, indices, valid);
  check_per_member(member_value, "member_value", indices);
  const auto rows_shape = student.sizes().slice(0, 2);
  check_per_row(tail_coef, "tail_coef", rows_shape, student.device(), {at::kFloat});
  check_per_row(max_c, "max_c", rows_shape, student.device(), {at::kFloat});
  check_per_row(logsum_c, "logsum_c", rows_shape, student.device(), {at::kFloat});
  TORCH_CHECK(member_value.scalar_type() == at::kFloat, "member_value must be float32");
  std::optional<at::Tensor> label_coef_c, labels_c;  // both or neither
  if (label_coef.has_value()) {
    TORCH_CHECK(labels.has_value(), "label_coef needs labels");
    check_per_row(*label_coef, "label_coef", rows_shape, student.device(), {at::kFloat});
    check_per_row(*labels, "labels", rows_shape, student.device(), {at::kLong});
    label_coef_c = label_coef->contiguous();
    labels_c = labels->contiguous();
  }
  const at::cuda::OptionalCUDAGuard device_guard(device_of(student));
  const int64_t B = student.size(0), L = student.size(1), V = student.size(2);
  at::Tensor dz = at::empty({B, L, V}, student.options());
  if (B * L == 0) return dz;

  const at::Tensor tail_coef_c = tail_coef.contiguous();
  const at::Tensor valid_c = valid.contiguous();
  const at::Tensor max_c_c = max_c.contiguous();
  const at::Tensor logsum_c_c = logsum_c.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_format(student.scalar_type(), [&](auto fs) {
    using Fs = decltype(fs);
    const int threads = row_threads(V, 16 / sizeof(typename Fs::Storage));
    topk_divergence_backward_kernel<Fs><<<static_cast<unsigned>(B * L), threads, 0, stream>>>(
        tail_coef_c.const_data_ptr<float>(), storage_ptr<Fs>(student), indices.const_data_ptr<int32_t>(),
        valid_c.const_data_ptr<bool>(), max_c_c.const_data_ptr<float>(),
        logsum_c_c.const_data_ptr<float>(), member_value.const_data_ptr<float>(),
        label_coef_c.has_value() ? label_coef_c->const_data_ptr<float>() : nullptr,
        labels_c.has_value() ? labels_c->const_data_ptr<int64_t>() : nullptr,
        mutable_storage_ptr<Fs>(dz), L, V, static_cast<int>(indices.size(2)), student.stride(0),
        student.stride(1), static_cast<float>(1.0 / temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dz;
}

}  // namespace
}  // namespace klops

TORCH_LIBRARY_IMPL(klops_C, CUDA, m) {
  m.impl("topk_divergence_forward", &klops::topk_divergence_forward);
  m.impl("topk_divergence_backward", &klops::topk_divergence_backward);
}
