// The baseline variant: x86-64 as the compiler targets it by default (SSE2), or any other ISA.
// 16-byte vectors, one SSE register (wider generic vectors are lowered through memory without AVX).
#include "../kernel_prelude.h"

#define SPARSEODE_CPU_VARIANT default_isa
#define SPARSEODE_CPU_VEC_BYTES 16
#define SPARSEODE_CPU_AVX 0
#include "../kernels.h"

namespace sparseode::cpu {
const KernelTable& kernel_table_default() {
  static const KernelTable table = default_isa::make_table("default");
  return table;
}
}  // namespace sparseode::cpu
