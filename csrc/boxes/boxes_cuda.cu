// CUDA registration of the box ops: the family's kernels (boxes_kernels.h) over CudaRunner.
#include "../common/cuda_runner.cuh"
#include "boxes_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels, CUDA, m) {
  mlk::boxes::register_boxes<mlk::boxes::Kernels<mlk::CudaRunner>>(m);
}
