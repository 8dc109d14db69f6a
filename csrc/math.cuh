// exp, log, max and min of the row math shared by the CUDA kernels and the CPU kernels of csrc/cpu/
// (online_stats.cuh, divergence_terms.cuh): vexp, vlog, vmax, vmin.
//
// On CUDA they are expf, logf, fmaxf and fminf. On the host they are branch-free fp32 code with no
// libm call, so that GCC vectorizes the loops that call them (a libm expf / logf call never
// vectorizes without -ffast-math, which klops does not use: -inf entries are legal). Each keeps the
// special values of its libm twin: vexp(-inf) = 0, vexp(inf) = inf, vlog(0) = -inf, vlog(x < 0) =
// NaN, vmax(NaN, b) = b as fmaxf; NaN in, NaN out for vexp and vlog. Accuracy (Cephes' expf / logf
// polynomials): within 2 ulp of the libm functions, subnormal results included.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "device.cuh"

namespace klops {

#ifdef __CUDACC__

KLOPS_DEVICE float vexp(float x) { return expf(x); }
KLOPS_DEVICE float vlog(float x) { return logf(x); }
KLOPS_DEVICE float vmax(float a, float b) { return fmaxf(a, b); }
KLOPS_DEVICE float vmin(float a, float b) { return fminf(a, b); }

#else

KLOPS_DEVICE float bits_to_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

KLOPS_DEVICE uint32_t float_to_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// 2^k for -126 <= k <= 127, from the exponent bits.
KLOPS_DEVICE float exp2i(int32_t k) { return bits_to_float(static_cast<uint32_t>(k + 127) << 23); }

// fmaxf / fminf: the other operand where one is NaN.
KLOPS_DEVICE float vmax(float a, float b) { return b != b ? a : (a > b ? a : b); }
KLOPS_DEVICE float vmin(float a, float b) { return b != b ? a : (a < b ? a : b); }

// exp(x) = 2^n e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts: exact n C1) and e^r
// from a degree-7 polynomial on |r| <= ln(2) / 2. x is clamped to [-104, 89] first: exp(-104) rounds
// to 0, exp(89) to inf. 2^n is applied in two halves, so that the product is rounded once also where
// it is subnormal.
KLOPS_DEVICE float vexp(float x) {
  const bool nan = x != x;
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  xc = nan ? 0.0f : xc;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * (r * r) + r + 1.0f;
  const int32_t k = static_cast<int32_t>(n);
  const int32_t k1 = k >> 1;
  const float y = er * exp2i(k1) * exp2i(k - k1);
  return nan ? x : y;
}

// log(x) = e ln 2 + log(1 + f) for x = 2^e (1 + f), sqrt(1/2) <= 1 + f < sqrt(2), log(1 + f) from a
// degree-9 polynomial; subnormal x are scaled by 2^23 first.
KLOPS_DEVICE float vlog(float x) {
  const bool subnormal = x < std::numeric_limits<float>::min();
  const float xs = subnormal ? x * 8388608.0f : x;
  const uint32_t bits = float_to_bits(xs);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 126 - (subnormal ? 23 : 0);
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float fe = static_cast<float>(e);
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float y = p * m * z - 2.12194440e-4f * fe - 0.5f * z;
  y = m + y + 0.693359375f * fe;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  y = x == kInf ? kInf : y;
  y = x == 0.0f ? -kInf : y;
  return (x < 0.0f || x != x) ? std::numeric_limits<float>::quiet_NaN() : y;
}

#endif

}  // namespace klops
