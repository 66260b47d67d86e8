// CUDA registration of beam_search_step: the family's kernel (beam_search_kernels.h) over
// CudaRunner.
#include "../common/cuda_runner.cuh"
#include "beam_search_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels, CUDA, m) {
  mlk::beam_search::register_beam_search<mlk::beam_search::Kernels<mlk::CudaRunner>>(m);
}
