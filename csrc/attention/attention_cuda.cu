// CUDA registration of the attention ops: the family's kernels (attention_kernels.h) over
// CudaRunner.
#include "../common/cuda_runner.cuh"
#include "attention_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels, CUDA, m) {
  mlk::attention::register_attention<mlk::attention::Kernels<mlk::CudaRunner>>(m);
}
