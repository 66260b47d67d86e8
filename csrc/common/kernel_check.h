// MLK_KERNEL_CHECK: a check of values that only a kernel reads (device memory), written once in a
// family's host+device math so that every runner runs it where the value is read.
//
//  * On the device it is CUDA_KERNEL_ASSERT, as in PyTorch's own index kernels: the kernel stops,
//    the failed condition and the message literal are printed, and the error surfaces at the
//    next synchronising call as "device-side assert triggered" (the CUDA context is then
//    unusable, as after any device-side assert). Checking on the host instead would cost a
//    device-to-host copy, a synchronisation, on every call, and rule out CUDA graph capture.
//  * In a host build (the grid emulator, the CPU kernels) it throws c10::Error with the full
//    message, `message` followed by the other arguments (the value that came), as TORCH_CHECK.
//
// Kernels must not rely on it to stop: a build may compile device asserts out
// (TORCH_DISABLE_GPU_ASSERTS), so the code after a check still keeps every read in range.
#pragma once

#include <c10/macros/Macros.h>

#include "macros.h"

#if MLK_ON_DEVICE
#define MLK_KERNEL_CHECK(cond, message, ...) CUDA_KERNEL_ASSERT((cond) && message)
#else
#include <c10/util/Exception.h>
#define MLK_KERNEL_CHECK(cond, message, ...) TORCH_CHECK(cond, message, __VA_ARGS__)
#endif
