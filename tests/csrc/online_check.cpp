// Host check of csrc/online_stats.cuh, compiled with g++ by tests/test_cuda_sweep.py: the online
// accumulators of the CUDA row kernels (LseOp, EntropyOp, KlOp, RowStatsOp), run as one thread block
// would run them (each thread pushes 8 consecutive entries per step of a strided sweep, then
// block_reduce's two butterflies of combine over 32 lanes), against float64 on random rows: odd and
// large V, temperatures, logits of 1e4, -inf entries, and masks of -1e30 (probability 0) facing -inf,
// which add nothing to the KL (0 log 0 = 0), while P_a > 0 facing P_b = 0 gives KL = +inf. RowStats'
// is_top1 also meets a label at the row max alone, tied with an entry before it (not the first argmax)
// and tied with one after it (the first).
// Prints "ok <cases>" and exits 0, or prints the first failures and exits 1.

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "../../csrc/online_stats.cuh"

using klops::Entropy;
using klops::EntropyOp;
using klops::Kl;
using klops::KlOp;
using klops::Lse;
using klops::LseOp;
using klops::RowStats;
using klops::RowStatsOp;

constexpr int kThreads = 256;  // 8 warps
constexpr int kWidth = 8;      // entries per thread per step (16-byte bf16 loads)
constexpr double kInf = std::numeric_limits<double>::infinity();

// block_reduce of row_reduce.cuh over kThreads per-thread states: a butterfly of combine with
// lane ^ offset in each warp, lane 0's results to the first warp (identity beyond the warp count),
// a second butterfly; returns thread 0's state (every thread ends with the same one on the GPU).
template <typename Acc, typename Op>
Acc block_reduce(std::vector<Acc> acc, const Op& op) {
  auto butterfly = [&op](Acc* lanes) {
    for (int offset = 16; offset > 0; offset /= 2) {
      Acc next[32];
      for (int lane = 0; lane < 32; ++lane) next[lane] = op.combine(lanes[lane], lanes[lane ^ offset]);
      for (int lane = 0; lane < 32; ++lane) lanes[lane] = next[lane];
    }
  };
  for (int warp = 0; warp < kThreads / 32; ++warp) butterfly(&acc[warp * 32]);
  std::vector<Acc> first(32, op.identity());
  for (int warp = 0; warp < kThreads / 32; ++warp) first[warp] = acc[warp * 32];
  butterfly(first.data());
  return first[0];
}

// Each thread's state after the sweep: thread t pushes entries [t W, t W + W) + k kThreads W.
template <typename Acc, typename Op, typename Push>
Acc sweep(int64_t V, const Op& op, Push push) {
  std::vector<Acc> acc(kThreads, op.identity());
  for (int64_t start = 0; start < V; start += kThreads * kWidth)
    for (int t = 0; t < kThreads; ++t)
      for (int i = 0; i < kWidth; ++i) {
        const int64_t j = start + t * kWidth + i;
        if (j < V) push(acc[t], j);
      }
  return block_reduce(acc, op);
}

// (max x, log sum exp((x - max x) c)) in float64, the max taken as 0 for an all -inf row.
std::pair<double, double> max_logsum(const std::vector<float>& x, double c) {
  double m = -kInf;
  for (float v : x) m = std::fmax(m, v);
  const double m_safe = m == -kInf ? 0.0 : m;
  double s = 0.0;
  for (float v : x) s += std::exp((v - m_safe) * c);
  return {m_safe, std::log(s)};
}

static int g_failures = 0;
static int g_cases = 0;

void expect_close(double got, double want, double rtol, double atol, const char* what, int64_t V, double T) {
  ++g_cases;
  const bool ok = (std::isinf(want) && got == want) || std::fabs(got - want) <= atol + rtol * std::fabs(want);
  if (!ok && g_failures++ < 10) std::printf("FAILED %s V=%lld T=%g: got %.9g, expected %.9g\n", what, (long long)V, T, got, want);
}

// Rows of V entries: normal * scale, then the masks of `pattern`.
//   0: none; 1: both -inf on a stretch; 2: a = -1e30 where b = -inf, and a = -inf where b = -1e30
//   (whole 8-wide chunks and single entries); 3: a finite where b = -inf (KL(P_a || P_b) = +inf).
void make_rows(std::mt19937& rng, int64_t V, float scale, int pattern, std::vector<float>& a, std::vector<float>& b) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  a.resize(V);
  b.resize(V);
  for (int64_t j = 0; j < V; ++j) a[j] = normal(rng) * scale, b[j] = normal(rng) * scale;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < V; ++j) {
    if (pattern == 1 && j % 7 == 3) a[j] = b[j] = -inf;
    if (pattern == 2 && (j < 24 || j % 5 == 2)) a[j] = -1e30f, b[j] = -inf;
    if (pattern == 2 && j % 11 == 6) a[j] = -inf, b[j] = -1e30f;
    if (pattern == 3 && j == V / 2) b[j] = -inf;
  }
}

void check_row(const std::vector<float>& a, const std::vector<float>& b, double T, double rtol) {
  const int64_t V = static_cast<int64_t>(a.size());
  const float c = static_cast<float>(1.0 / T);
  const auto [max_a, logsum_a] = max_logsum(a, 1.0 / T);
  const auto [max_b, logsum_b] = max_logsum(b, 1.0 / T);
  double entropy = 0.0, kl = 0.0;
  for (int64_t j = 0; j < V; ++j) {
    const double la = (a[j] - max_a) / T - logsum_a, lb = (b[j] - max_b) / T - logsum_b, p = std::exp(la);
    if (p > 0) entropy -= p * la, kl += p * (la - lb);  // lb = -inf: kl = inf
  }

  const LseOp lse_op{c};
  const Lse lse = sweep<Lse>(V, lse_op, [&](Lse& s, int64_t j) { lse_op.push(s, a[j]); });
  expect_close(lse.max(), max_a, 0.0, 0.0, "Lse max", V, T);
  expect_close(lse.logsum(), logsum_a, 1e-6, 1e-6, "Lse logsum", V, T);

  const EntropyOp entropy_op{c};
  const Entropy h = sweep<Entropy>(V, entropy_op, [&](Entropy& s, int64_t j) { entropy_op.push(s, a[j]); });
  expect_close(h.entropy(), entropy, rtol, 1e-5, "Entropy", V, T);

  const KlOp kl_op{c};
  const Kl k = sweep<Kl>(V, kl_op, [&](Kl& s, int64_t j) { kl_op.push(s, a[j], b[j]); });
  expect_close(k.kl(), kl, rtol, 1e-5, "KL(P_a || P_b)", V, T);
  expect_close(k.lse_b().logsum(), logsum_b, 1e-6, 1e-6, "Kl logsum_b", V, T);
}

// RowStats of row a with the label `label` against float64: log sum q^2 (from the fp32 logsum of Lse, as
// the kernels pass it), the mean logit c sum a / V, and is_top1 = the label is the first argmax.
void check_stats(const std::vector<float>& a, int64_t label, double T, double rtol) {
  const int64_t V = static_cast<int64_t>(a.size());
  const float c = static_cast<float>(1.0 / T);
  const auto [max_a, logsum_a] = max_logsum(a, 1.0 / T);
  double sum_sq = 0.0, sum = 0.0, sum_abs = 0.0;
  int64_t first_argmax = 0;
  for (int64_t j = 0; j < V; ++j) {
    sum_sq += std::exp(2.0 * ((a[j] - max_a) / T - logsum_a));
    sum += a[j];
    sum_abs += std::fabs(a[j]);
    if (a[j] > a[first_argmax]) first_argmax = j;
  }
  const bool has_max = a[first_argmax] != -std::numeric_limits<float>::infinity();

  const LseOp lse_op{c};
  const Lse lse = sweep<Lse>(V, lse_op, [&](Lse& s, int64_t j) { lse_op.push(s, a[j]); });
  const RowStatsOp stats_op{2.0f * c};
  // push_squared with the exp of LseOp::push (scale c), as csrc/logprobs.cu sweeps them
  const RowStats stats = sweep<RowStats>(V, stats_op, [&](RowStats& s, int64_t j) {
    Lse shadow{s.m, 0.0f};  // the Lse of the same lane has the same running max
    stats_op.push_squared(s, a[j], lse_op.push(shadow, a[j]), j < label);
  });
  expect_close(stats.log_sum_sq(lse.logsum()), std::log(sum_sq), rtol, 1e-5, "RowStats log_sum_sq", V, T);
  expect_close(stats.sum * c / static_cast<float>(V), sum / T / V, 0.0, 1e-6 * (sum_abs / T / V + 1.0),
               "RowStats mean logit", V, T);
  expect_close(stats.is_top1(a[label], lse.max()), has_max && first_argmax == label, 0.0, 0.0,
               "RowStats is_top1", V, T);
}

// check_stats of row a (modified in place) with its label in the middle: as drawn, then the label the row
// max alone, tied with an entry before it, tied with the last entry.
void check_stats_cases(std::vector<float>& a, double T, double rtol) {
  const int64_t V = static_cast<int64_t>(a.size());
  const int64_t label = V / 2;
  check_stats(a, label, T, rtol);
  float top = -std::numeric_limits<float>::infinity();
  for (float v : a) top = std::fmax(top, v);
  top = top == -std::numeric_limits<float>::infinity() ? 0.0f : top + 1.0f;
  a[label] = top;
  check_stats(a, label, T, rtol);
  if (label > 0) {
    const float kept = a[label / 2];
    a[label / 2] = top;
    check_stats(a, label, T, rtol);
    a[label / 2] = kept;
  }
  if (label < V - 1) {
    a[V - 1] = top;
    check_stats(a, label, T, rtol);
  }
}

int main() {
  std::mt19937 rng(1234);
  std::vector<float> a, b;
  for (int64_t V : {1, 7, 33, 1000, 2048, 4097, 20011})
    for (double T : {1.0, 0.3, 3.0})
      for (int pattern = 0; pattern < 4; ++pattern) {
        if (V < 24 && pattern >= 2) continue;  // the masked stretch needs room; b keeps a finite entry
        make_rows(rng, V, 2.0f, pattern, a, b);
        check_row(a, b, T, 2e-5);
        check_stats_cases(a, T, 2e-5);
      }
  for (double T : {1.0, 0.3}) {  // logits of 1e4: fp32 rounds (z - max) c at ~1e-3 of 1
    make_rows(rng, 3001, 1e4f, 0, a, b);
    check_row(a, b, T, 1e-4);
    check_stats_cases(a, T, 1e-4);
  }
  if (g_failures) {
    std::printf("%d of %d checks failed\n", g_failures, g_cases);
    return 1;
  }
  std::printf("ok %d\n", g_cases);
  return 0;
}
