// KLOPS_DEVICE: the qualifiers of the functions that run in the kernels and, compiled by the host compiler, in
// the host checks of tests/csrc.
#pragma once

#ifdef __CUDACC__
#define KLOPS_DEVICE __device__ __forceinline__
#else
#define KLOPS_DEVICE inline
#endif
