// Every header the variant kernels (kernels.h) use, included by each csrc/cpu/variants/*.cpp BEFORE
// its `#pragma GCC target`: functions and templates defined here keep the baseline instruction set
// even when instantiated from AVX2/AVX-512 code, so the copies the linker merges across variants
// are all baseline (a wider copy winning the merge would crash a CPU without it).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "../common.h"
#include "activation.h"
#include "kernel_table.h"
