// The default variant of the fused field's backward (field_backward_kernels.h, on the forward's pieces in
// field_kernels.h); field_backward_kernels() runs it where field_kernels() runs the default forward. Every
// header comes before the target pragma, so only this variant's own code gets its instruction set.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "activation.h"
#include "field_backward_table.h"

#define FIELD_VARIANT field_default
#define FIELD_VEC_BYTES 32
#include "field_kernels.h"
#include "field_backward_kernels.h"

namespace sparseode::cpu {
const FieldBackwardKernels& field_backward_kernels_default() {
  static const FieldBackwardKernels table = field_default::backward::make_field_backward_table("default");
  return table;
}
}  // namespace sparseode::cpu
