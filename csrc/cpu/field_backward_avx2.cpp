// The avx2 variant of the fused field's backward (field_backward_kernels.h, on the forward's pieces in
// field_kernels.h); field_backward_kernels() runs it where field_kernels() runs the avx2 forward. Every
// header comes before the target pragma, so only this variant's own code gets its instruction set.
#if defined(__x86_64__) || defined(__i386__)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "activation.h"
#include "field_backward_table.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FIELD_VARIANT avx2::field
#define FIELD_VEC_BYTES 32
#include "field_kernels.h"
#include "field_backward_kernels.h"
#pragma GCC pop_options

namespace sparseode::cpu {
const FieldBackwardKernels& field_backward_kernels_avx2() {
  static const FieldBackwardKernels table = avx2::field::backward::make_field_backward_table("avx2");
  return table;
}
}  // namespace sparseode::cpu
#endif
