// The avx2 variant of the fused field's kernels (field_tiles.h, field_kernels.h); field_kernels() in field_cpu.cpp
// runs it only where the CPU has its instruction set. Every header comes before the target pragma,
// so only this variant's own code gets the wider instruction set.
#if defined(__x86_64__) || defined(__i386__)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "activation.h"
#include "field_table.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FIELD_VARIANT avx2::field
#define FIELD_VEC_BYTES 32
#include "field_tiles.h"
#pragma GCC pop_options

namespace sparseode::cpu {
const FieldKernels& field_kernels_avx2() {
  static const FieldKernels table = avx2::field::make_field_table("avx2");
  return table;
}
}  // namespace sparseode::cpu
#endif
