// Portability macros shared by every kernel header. The same headers are compiled by g++ (CPU
// kernels and the grid emulator) and by nvcc (CUDA kernels), so nothing here may assume either.
#pragma once

#if defined(__CUDACC__)
#define MLK_HOST_DEVICE __host__ __device__ __forceinline__
#define MLK_DEVICE_CODE 1
#else
#define MLK_HOST_DEVICE inline
#define MLK_DEVICE_CODE 0
#endif

#if defined(__CUDA_ARCH__)
// True only in the device compilation pass of nvcc.
#define MLK_ON_DEVICE 1
#else
#define MLK_ON_DEVICE 0
#endif

#if defined(__CUDACC__)
// Marks a lambda that a kernel runs on the device (needs nvcc --extended-lambda); on g++ the same
// lambda runs in the grid emulator. Device-only rather than __host__ __device__: nvcc refuses
// generic host-device lambdas and host-device code calling device-only barriers; the host copy
// of the lambda is never needed because the emulator is compiled by g++ in its own file.
#define MLK_LAMBDA __device__
#else
#define MLK_LAMBDA
#endif

// Keeps a loop rolled on the device (#pragma unroll 1), where unrolling would copy a large body
// called from inside it; g++ has no such pragma and needs none.
#if defined(__CUDACC__)
#define MLK_NO_UNROLL _Pragma("unroll 1")
#else
#define MLK_NO_UNROLL
#endif
