// What code shared by the CPU and CUDA trees needs to compile under both nvcc and a host compiler alone
// (csrc/cpu, the tests' host builds of csrc/cuda): HK_HOST_DEVICE marks a function for host and device.
// Torch-free and CUDA-header-free.
#pragma once

#if defined(__CUDACC__)
#define HK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HK_HOST_DEVICE inline
#endif
