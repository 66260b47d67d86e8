// CUDA registration of roi_align: the family's kernels (roi_align_kernels.h) over CudaRunner.
#include "../common/cuda_runner.cuh"
#include "roi_align_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels, CUDA, m) {
  mlk::roi_align::register_roi_align<mlk::roi_align::Kernels<mlk::CudaRunner>>(m);
}
