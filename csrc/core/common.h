// Torch-free helpers shared by the CPU and CUDA kernels and the native tests.
#pragma once

#if defined(__CUDACC__)
#define DCX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DCX_HOST_DEVICE inline
#endif

// CPU loops that must use fused multiply-add (to round exactly as ATen's vectorised kernels do)
// are compiled twice: once for x86-64-v3 (AVX2 + FMA, where fmaf is one instruction and the
// loop vectorises) and once for the baseline; the loader picks one at start-up.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    !defined(__SANITIZE_ADDRESS__)
#define DCX_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DCX_CPU_MULTIVERSION
#endif
