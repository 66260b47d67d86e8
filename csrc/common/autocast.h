// What every family's autocast kernels share (registered at AutocastCPU and AutocastCUDA, as
// torchvision's csrc/ops/autocast/ does, so torch.ops.mlkernels.* behaves as the Python wrappers
// under torch.autocast): the cast of the floating inputs, and the call below autocast.
#pragma once

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace mlk {

// A floating tensor below float32 on kDevice (a bfloat16/float16 activation), in float32;
// float64 and every other tensor unchanged.
template <c10::DeviceType kDevice>
at::Tensor autocast_to_float32(const at::Tensor& t) {
  return at::autocast::cached_cast(at::kFloat, t, kDevice);
}

// The dispatcher's handle of the op `name` ("mlkernels::nms") with its C++ signature, e.g.
// at::Tensor(const at::Tensor&, const at::Tensor&, double). An autocast kernel keeps it in a
// function-local static and calls it under c10::impl::ExcludeDispatchKeyGuard of its own key, so
// the call goes on to the device's kernel.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Signature>();
}

}  // namespace mlk
