// CPU registration of the attention ops: the runner kernels of attention_kernels.h on
// CpuParallelRunner (no CPU-specific kernel yet).
#include "../common/cpu_runner.h"
#include "attention_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels, CPU, m) {
  mlk::attention::register_attention<mlk::attention::Kernels<mlk::CpuParallelRunner>>(m);
}
