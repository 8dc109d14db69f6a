// KLOPS_DEVICE: the qualifiers of the functions that run in the kernels and, compiled by the host compiler, in
// the CPU kernels of csrc/cpu/ and the host checks of tests/csrc. On the host they are always inlined: the CPU
// kernels' loops vectorize only where every call in them is inlined, which GCC's size limits would otherwise
// refuse in a translation unit of many instantiations.
#pragma once

#ifdef __CUDACC__
#define KLOPS_DEVICE __device__ __forceinline__
#elif defined(__GNUC__)
#define KLOPS_DEVICE inline __attribute__((always_inline))
#else
#define KLOPS_DEVICE inline
#endif
