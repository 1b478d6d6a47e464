// The one variant of a SPARSEODE_NATIVE=1 build: the kernels of kernels.h compiled with the build's
// own flags (-march=native), for the build machine only.
#include "../kernel_prelude.h"

#define SPARSEODE_CPU_VARIANT native
#if defined(__AVX512F__)
#define SPARSEODE_CPU_VEC_BYTES 64
#else
#define SPARSEODE_CPU_VEC_BYTES 32
#endif
#if defined(__AVX__)
#define SPARSEODE_CPU_AVX 1
#else
#define SPARSEODE_CPU_AVX 0
#endif
#include "../kernels.h"

namespace sparseode::cpu {
const KernelTable& kernel_table_native() {
  static const KernelTable table = native::make_table("native");
  return table;
}
}  // namespace sparseode::cpu
