// How one thread block sweeps a row of n entries, with 16-byte (or 8-byte) accesses for every pointer
// whatever their relative alignment. Free of torch and CUDA headers so that the host check
// tests/csrc/sweep_check.cpp compiles it with g++ and runs every misalignment pair on the CPU.
//
// The sweep follows one primary pointer (the stored row in a backward, the first loaded row in a
// forward): entries [0, head) before its first VEC-aligned entry go one at a time, the body VEC at a
// time, the tail one at a time. Every other row pointer p is read in the body with aligned vector
// loads when p + head is VEC-aligned too, and otherwise with load_shifted: the two aligned chunks
// around its VEC entries, funnel-shifted into place (twice the L1 traffic of the aligned load, the
// same DRAM traffic, and none of the scalar fallback's one-entry-per-instruction cost). Rows of
// bf16 logits with V odd, sliced as logits[:, :-1], differ in alignment from their contiguous
// gradient on every other batch entry.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device.cuh"

// Hooks of the host check (tests/csrc/sweep_check.cpp): every access, its address and size.
#ifndef KLOPS_TRACE_ACCESS
#define KLOPS_TRACE_ACCESS(ptr, bytes, aligned_to)
#endif

namespace klops {

template <int W>
using Width = std::integral_constant<int, W>;

// W consecutive entries of a row as stored; one 16-byte (or 8-byte) access when W > 1.
template <typename S, int W>
struct alignas(sizeof(S) * W) AlignedVec {
  static constexpr int kWidth = W;
  S val[W];
};

// p[0 .. W); p is aligned to W * sizeof(S) bytes.
template <int W, typename S>
KLOPS_DEVICE AlignedVec<S, W> load_vec(const S* p) {
  KLOPS_TRACE_ACCESS(p, sizeof(S) * W, sizeof(S) * W);
  return *reinterpret_cast<const AlignedVec<S, W>*>(p);
}

// p[0 .. W) = v; p is aligned to W * sizeof(S) bytes.
template <int W, typename S>
KLOPS_DEVICE void store_vec(S* p, const AlignedVec<S, W>& v) {
  KLOPS_TRACE_ACCESS(p, sizeof(S) * W, sizeof(S) * W);
  *reinterpret_cast<AlignedVec<S, W>*>(p) = v;
}

template <int VEC, typename S>
KLOPS_DEVICE bool is_vec_aligned(const S* p) {
  return reinterpret_cast<uintptr_t>(p) % (VEC * sizeof(S)) == 0;
}

// Entries before the first VEC-aligned entry of p, at most n.
template <int VEC, typename S>
KLOPS_DEVICE int64_t vec_head(const S* p, int64_t n) {
  const int64_t misaligned = static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) / sizeof(S)) % VEC);
  const int64_t head = (VEC - misaligned) % VEC;
  return head < n ? head : n;
}

// The low 32 bits of (hi:lo) >> bits, bits < 32.
KLOPS_DEVICE uint32_t funnel_shift_right(uint32_t lo, uint32_t hi, int bits) {
#ifdef __CUDA_ARCH__
  return __funnelshift_r(lo, hi, bits);
#else
  return static_cast<uint32_t>(((uint64_t{hi} << 32) | lo) >> bits);
#endif
}

// p[0 .. W) for p aligned to sizeof(S) only (W * sizeof(S) = 8 or 16 bytes: C): the aligned chunks
// [P, P + C) and [P + C, P + 2C) around it, P = p rounded down to C, shifted by the offset p - P. Both
// chunks hold entries of p[0 .. W), so neither leaves a C-aligned allocation; the sweep keeps the
// second inside the row as well (plan_sweep).
template <int W, typename S>
KLOPS_DEVICE AlignedVec<S, W> load_shifted(const S* p) {
  constexpr int kBytes = sizeof(S) * W;
  constexpr int kWords = kBytes / 4;
  static_assert(kBytes == 8 || kBytes == 16, "load_shifted reads 8- or 16-byte chunks");
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  const auto* chunks = reinterpret_cast<const AlignedVec<uint32_t, kWords>*>(address & ~uintptr_t{kBytes - 1});
  KLOPS_TRACE_ACCESS(chunks, 2 * kBytes, kBytes);
  const AlignedVec<uint32_t, kWords> lo = chunks[0];
  const AlignedVec<uint32_t, kWords> hi = chunks[1];
  const int offset = static_cast<int>(address % kBytes);  // bytes, a multiple of sizeof(S)
  const int word = offset / 4;
  const int bits = offset % 4 * 8;
  uint32_t words[2 * kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    words[i] = lo.val[i];
    words[kWords + i] = hi.val[i];
  }
  // out word i = the 32 bits at byte offset + 4 i of the two chunks: the word-aligned shift is a
  // select among kWords candidates (no register array indexed at run time), the rest a funnel shift.
  uint32_t out_words[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    uint32_t low = words[i];
    uint32_t high = words[i + 1];
#pragma unroll
    for (int k = 1; k < kWords; ++k) {
      low = word == k ? words[i + k] : low;
      high = word == k ? words[i + k + 1] : high;
    }
    out_words[i] = bits == 0 ? low : funnel_shift_right(low, high, bits);
  }
  AlignedVec<S, W> out;
  memcpy(out.val, out_words, kBytes);
  return out;
}

// The reads of one row pointer in a sweep: aligned vector loads when row + head is VEC-aligned,
// else load_shifted; single entries in the head and the tail.
template <int VEC, typename S>
struct RowReader {
  const S* row;
  bool shifted;

  template <int W>
  KLOPS_DEVICE AlignedVec<S, W> operator()(int64_t j, Width<W>) const {
    if constexpr (W == 1) {
      return load_vec<1>(row + j);
    } else {
      return shifted ? load_shifted<W>(row + j) : load_vec<W>(row + j);
    }
  }
};

template <int VEC, typename S>
KLOPS_DEVICE RowReader<VEC, S> row_reader(const S* row, int64_t head) {
  return {row, !is_vec_aligned<VEC>(row + head)};
}

// The entries [head, body_end) a sweep of n entries reads VEC at a time: the full VEC groups after
// the primary pointer's head, less the last one when a reader is shifted (load_shifted reads up to
// one chunk past its group, which the next group keeps inside the row).
struct SweepPlan {
  int64_t head;
  int64_t body_end;
  bool shifted;  // some reader of the sweep is shifted
};

template <int VEC>
KLOPS_DEVICE SweepPlan plan_sweep(int64_t n, int64_t head, bool any_shifted) {
  int64_t groups = (n - head) / VEC;
  if (any_shifted && groups > 0) --groups;
  return {head, head + groups * VEC, any_shifted};
}

// Streams a row of n entries through `threads` threads (this one is `tid`): consume(j, load(j,
// Width<W>{})) for the entries [j, j + W). [0, head) and [body_end, n) go one entry at a time, the body
// VEC at a time: two vectors per thread and step, so that both loads are in flight before either is
// consumed, or one when a reader is shifted (its two chunks are already in flight, and the registers
// they hold stay those of the aligned loop, which sets the kernel's occupancy).
template <int VEC, typename Load, typename Consume>
KLOPS_DEVICE void sweep_row(int64_t n, SweepPlan plan, int tid, int threads, Load&& load, Consume&& consume) {
  for (int64_t j = tid; j < plan.head; j += threads) consume(j, load(j, Width<1>{}));
  const int64_t stride = int64_t{threads} * VEC;
  int64_t j = plan.head + int64_t{tid} * VEC;
  if (plan.shifted) {
    for (; j < plan.body_end; j += stride) consume(j, load(j, Width<VEC>{}));
  } else {
    for (; j + stride < plan.body_end; j += 2 * stride) {
      const auto first = load(j, Width<VEC>{});
      const auto second = load(j + stride, Width<VEC>{});
      consume(j, first);
      consume(j + stride, second);
    }
    if (j < plan.body_end) consume(j, load(j, Width<VEC>{}));
  }
  for (j = plan.body_end + tid; j < n; j += threads) consume(j, load(j, Width<1>{}));
}

}  // namespace klops
