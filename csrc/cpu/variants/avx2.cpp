// The AVX2 + FMA variant (x86-64 only): the kernels of kernels.h compiled for AVX2 and FMA through
// `#pragma GCC target`, after kernel_prelude.h so that only this variant's own code gets the wider
// instruction set. dispatch.cpp runs it only where the CPU reports avx2 and fma.
#if defined(__x86_64__) || defined(__i386__)
#include "../kernel_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SPARSEODE_CPU_VARIANT avx2
#define SPARSEODE_CPU_VEC_BYTES 32
#define SPARSEODE_CPU_AVX 1
#include "../kernels.h"
#pragma GCC pop_options

namespace sparseode::cpu {
const KernelTable& kernel_table_avx2() {
  static const KernelTable table = avx2::make_table("avx2");
  return table;
}
}  // namespace sparseode::cpu
#endif
