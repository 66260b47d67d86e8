// CUDA registration of the NMS and proposal ops: the family's kernels (proposals_kernels.h) over
// CudaRunner.
#include "../common/cuda_runner.cuh"
#include "proposals_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels, CUDA, m) {
  mlk::proposals::register_proposals<mlk::proposals::Kernels<mlk::CudaRunner>>(m);
}
