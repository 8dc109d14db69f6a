// Compile-time dispatch over a small integer (a divergence kind, a target encoding, a flag), shared by the CUDA
// kernels (row_reduce.cuh) and the C++ CPU kernels (cpu/rows.h).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace klops {

template <typename F, int... Is>
void dispatch_index_impl(int64_t value, F& f, std::integer_sequence<int, Is...>) {
  (void)((value == Is ? (f(std::integral_constant<int, Is>{}), true) : false) || ...);
}

// Calls f(std::integral_constant<int, value>{}) for 0 <= value < N (checked by the caller).
template <int N, typename F>
void dispatch_index(int64_t value, F&& f) {
  TORCH_INTERNAL_ASSERT(0 <= value && value < N, "index ", value, " out of [0, ", N, ")");
  dispatch_index_impl(value, f, std::make_integer_sequence<int, N>{});
}

}  // namespace klops
