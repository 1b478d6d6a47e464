// The default variant of the fused field's kernels (field_tiles.h, field_kernels.h); field_kernels() in field_cpu.cpp
// runs it only where the CPU has its instruction set. Every header comes before the target pragma,
// so only this variant's own code gets the wider instruction set.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "activation.h"
#include "field_table.h"

#define FIELD_VARIANT field_default
#define FIELD_VEC_BYTES 32
#include "field_tiles.h"

namespace sparseode::cpu {
const FieldKernels& field_kernels_default() {
  static const FieldKernels table = field_default::make_field_table("default");
  return table;
}
}  // namespace sparseode::cpu
