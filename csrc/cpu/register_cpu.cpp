// Registers the CPU kernels (spmm_cpu.h) as the CPU implementations of the sparseode ops declared
// in csrc/ops.cpp. Kept apart from the kernels so the op layer can change names and signatures here
// without touching kernel code.
#include <torch/library.h>

#include "spmm_cpu.h"

TORCH_LIBRARY_IMPL(sparseode, CPU, m) {
  m.impl("bsr_spmm", &sparseode::cpu::bsr_spmm);
  m.impl("bsr_spmm_t", &sparseode::cpu::bsr_spmm_t);
  m.impl("bsr_spmm_fm", &sparseode::cpu::bsr_spmm_fm);
  m.impl("bsr_sddmm", &sparseode::cpu::bsr_sddmm);
}
