// The AVX-512 variant (x86-64 only): the kernels of kernels.h compiled for AVX-512 F/BW/VL/DQ (with
// AVX2 and FMA) through `#pragma GCC target`, after kernel_prelude.h so that only this variant's own
// code gets the wider instruction set; 64-byte vectors. dispatch.cpp runs it only where the CPU
// reports all of these.
#if defined(__x86_64__) || defined(__i386__)
#include "../kernel_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define SPARSEODE_CPU_VARIANT avx512
#define SPARSEODE_CPU_VEC_BYTES 64
#define SPARSEODE_CPU_AVX 1
#include "../kernels.h"
#pragma GCC pop_options

namespace sparseode::cpu {
const KernelTable& kernel_table_avx512() {
  static const KernelTable table = avx512::make_table("avx512");
  return table;
}
}  // namespace sparseode::cpu
#endif
