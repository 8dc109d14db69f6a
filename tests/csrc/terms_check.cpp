// Host run of the CUDA divergence math (csrc/divergence_terms.cuh, csrc/online_stats.cuh), compiled with
// g++ by tests/test_cuda_sweep.py, which compares its output with the float64 reference. It follows
// divergence_forward_kernel and divergence_backward_kernel of csrc/divergence.cu row by row, one entry
// after another (the block reduction is checked by online_check.cpp):
//   forward   D and gbar: one KlOp sweep for forward / reverse KL between logit rows (gbar = -1 or D),
//             else LseOp sweeps for max / logsum, then sums of divergence_terms;
//   backward  dz_v = c (a_v - q_v gbar) for an upstream gradient of 1;
//   and for a teacher given as log-probs / probs, the statistics of its check (TeacherCheck) in max_t, logsum_t.
// Input (stdin): int32 N, V, kind, target; float32 temperature, coef; float32 z[N V], y[N V].
// Output (stdout): float32 D[N], dz[N V], max_t[N], logsum_t[N].

#include <cstdint>
#include <cstdio>
#include <vector>

#include "../../csrc/divergence_terms.cuh"

using namespace klops;

enum Target : int { LOGITS, LOGPROBS, PROBS };  // as in csrc/divergence.cu

float teacher_log(int target, float y, float max_t, float logsum_t, float c) {  // divergence.cu's teacher_log
  return target == LOGITS ? (y - max_t) * c - logsum_t : target == LOGPROBS ? y : logf(y);
}

template <int KIND>
void run_row(const float* z, const float* y, int64_t V, int target, const DivergenceParams& k, float* loss,
             float* dz, float* max_t_out, float* logsum_t_out) {
  const float c = k.inv_temperature;
  float max_q, logsum_q, max_t = 0.0f, logsum_t = 0.0f, gbar;
  TeacherCheck check = TeacherCheckOp{}.identity();
  if (target == LOGITS && (KIND == FORWARD || KIND == REVERSE)) {
    const KlOp kl_op{c};
    Kl acc = kl_op.identity();
    for (int64_t v = 0; v < V; ++v) {
      if (KIND == FORWARD) kl_op.push(acc, y[v], z[v]);  // KL(p || q): weights p
      else kl_op.push(acc, z[v], y[v]);
    }
    *loss = acc.kl();
    const Lse q = KIND == FORWARD ? acc.lse_b() : acc.lse_a();
    const Lse p = KIND == FORWARD ? acc.lse_a() : acc.lse_b();
    max_q = q.max(), logsum_q = q.logsum(), max_t = p.max(), logsum_t = p.logsum();
    gbar = KIND == FORWARD ? -1.0f : *loss;
  } else {
    const LseOp lse_op{c};
    Lse acc_q = lse_op.identity(), acc_t = lse_op.identity();
    for (int64_t v = 0; v < V; ++v) {
      lse_op.push(acc_q, z[v]);
      if (target == LOGITS) lse_op.push(acc_t, y[v]);
    }
    max_q = acc_q.max(), logsum_q = acc_q.logsum();
    if (target == LOGITS) max_t = acc_t.max(), logsum_t = acc_t.logsum();
    Sum2 sums{0.0f, 0.0f};
    for (int64_t v = 0; v < V; ++v) {
      const float lp = teacher_log(target, y[v], max_t, logsum_t, c);
      const Terms t = divergence_terms<KIND>((z[v] - max_q) * c - logsum_q, lp, k);
      sums = Sum2Op{}.combine(sums, {t.loss, t.a});
      if (target == LOGPROBS) check.push<false>(y[v], lp);
      if (target == PROBS) check.push<true>(y[v], lp);
    }
    *loss = sums.loss, gbar = sums.gbar;
  }
  // As stored: the logits' statistics (which the backward reads), or the check's of log-probs / probs.
  *max_t_out = target == LOGITS ? max_t : check.top;
  *logsum_t_out = target == LOGITS ? logsum_t : logf(check.mass);
  for (int64_t v = 0; v < V; ++v) {
    const float lq = (z[v] - max_q) * c - logsum_q;
    const Terms t = divergence_terms<KIND>(lq, teacher_log(target, y[v], max_t, logsum_t, c), k);
    dz[v] = c * (t.a - expf(lq) * gbar);
  }
}

// run_row<kind> for a run-time kind in [0, kNumKinds); false for any other.
template <int KIND = 0>
bool run_kind(int kind, const float* z, const float* y, int64_t V, int target, const DivergenceParams& k, float* loss,
              float* dz, float* max_t, float* logsum_t) {
  if constexpr (KIND < kNumKinds) {
    if (kind == KIND) {
      run_row<KIND>(z, y, V, target, k, loss, dz, max_t, logsum_t);
      return true;
    }
    return run_kind<KIND + 1>(kind, z, y, V, target, k, loss, dz, max_t, logsum_t);
  }
  return false;
}

int main() {
  int32_t header[4];
  float options[2];
  if (fread(header, sizeof header, 1, stdin) != 1 || fread(options, sizeof options, 1, stdin) != 1) return 2;
  const int64_t N = header[0], V = header[1];
  const int kind = header[2], target = header[3];
  std::vector<float> z(N * V), y(N * V), loss(N), dz(N * V), max_t(N), logsum_t(N);
  if (fread(z.data(), sizeof(float), N * V, stdin) != size_t(N * V)) return 2;
  if (fread(y.data(), sizeof(float), N * V, stdin) != size_t(N * V)) return 2;
  const DivergenceParams k = make_params(options[0], options[1]);
  for (int64_t r = 0; r < N; ++r) {
    const float* zr = &z[r * V];
    const float* yr = &y[r * V];
    float* out = &dz[r * V];
    if (!run_kind(kind, zr, yr, V, target, k, &loss[r], out, &max_t[r], &logsum_t[r])) return 2;
  }
  fwrite(loss.data(), sizeof(float), N, stdout);
  fwrite(dz.data(), sizeof(float), N * V, stdout);
  fwrite(max_t.data(), sizeof(float), N, stdout);
  fwrite(logsum_t.data(), sizeof(float), N, stdout);
  return 0;
}
