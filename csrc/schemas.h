// The schemas of the row ops of klops, shared by the CUDA ops (klops._C, namespace klops_C: csrc/klops.cpp)
// and the CPU ops (namespace klops_cpu: csrc/cpu/ops.cpp), so that both backends take the same arguments.
//
// kind indexes kernels/kinds.py's KINDS (enum Kind of divergence_terms.cuh), target ("logits", "logprobs",
// "probs"); coef is the kind's coefficient (beta of jsd, alpha of skew_* and alpha).
#pragma once

namespace klops {
namespace schemas {

// max_* are raw row maxes of the logits (before the temperature) and logsum_* the logs of the
// shifted sums, log sum_v exp((z_v - max) / T): log softmax = (z - max) / T - logsum.
constexpr const char* kDivergenceForward =
    "divergence_forward(Tensor student, Tensor teacher, Tensor valid, int kind, int target, "
    "float temperature, float coef) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";
// With grad_logp and labels (int64) the backward adds grad_logp (1[v = label] - q) / T: the gradient
// of the label's log-prob, which the op computes from the forward's max_q and logsum_q.
constexpr const char* kDivergenceBackward =
    "divergence_backward(Tensor grad, Tensor? grad_logp, Tensor student, Tensor teacher, "
    "Tensor valid, Tensor? labels, Tensor max_q, Tensor logsum_q, Tensor max_t, Tensor logsum_t, "
    "Tensor gbar, int kind, int target, float temperature, float coef) -> Tensor";
// Sparse top-k teachers: indices (B, L, K) int32 sorted within each row, teacher_logprobs (B, L, K);
// max_c / logsum_c are the student's statistics outside the top-k, tail_scale the tail's gradient
// coefficient and member_d (B, L, K) the members' gradient numerators (kernels/topk.py).
constexpr const char* kTopkDivergenceForward =
    "topk_divergence_forward(Tensor student, Tensor indices, Tensor teacher_logprobs, Tensor valid, "
    "int kind, bool bin, float temperature, float coef, float tail_loss, float tail_grad) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor)";
// The backward reads tail_coef (B, L) and member_value (B, L, K): the rows' gradients times tail_scale
// and member_d, less the -q part of the label's log-prob; label_coef / labels add its onehot.
constexpr const char* kTopkDivergenceBackward =
    "topk_divergence_backward(Tensor tail_coef, Tensor student, Tensor indices, Tensor valid, "
    "Tensor max_c, Tensor logsum_c, Tensor member_value, Tensor? label_coef, Tensor? labels, "
    "float temperature) -> Tensor";
// (logprob, entropy, max, logsum, log_sum_sq_probs, mean_logit, is_top1), each (B, L) fp32; the last three
// (online_stats.cuh's RowStats; is_top1 0 or 1) with_stats only, else 0.
constexpr const char* kLogprobsForward =
    "logprobs_forward(Tensor logits, Tensor labels, float temperature, bool with_entropy, bool with_stats, "
    "int ignore_index) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";
constexpr const char* kLogprobsBackward =
    "logprobs_backward(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor labels, "
    "Tensor max, Tensor logsum, Tensor entropy, float temperature, bool with_entropy, "
    "int ignore_index) -> Tensor";

}  // namespace schemas
}  // namespace klops
