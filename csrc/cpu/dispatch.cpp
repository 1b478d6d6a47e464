// The variant choice of dispatch.h and the threading hooks of kernel_table.h (baseline code).
#include "dispatch.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string_view>

namespace sparseode::cpu {

void parallel_for(int64_t n, int64_t grain, RangeFn fn, void* ctx) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(ctx, begin, end); });
}

int64_t num_threads() { return at::get_num_threads(); }

#if defined(SPARSEODE_CPU_NATIVE)

const KernelTable& active_kernels() {
  static const bool warned = [] {
    if (std::getenv("SPARSEODE_CPU_CAPABILITY") != nullptr)
      TORCH_WARN("SPARSEODE_CPU_CAPABILITY is ignored: this sparseode was built with SPARSEODE_NATIVE=1 and holds ",
                 "only the 'native' variant");
    return true;
  }();
  (void)warned;
  return kernel_table_native();
}

#else

namespace {

enum class Level : int { Default = 0, Avx2 = 1, Avx512 = 2 };

const KernelTable& table_of(Level level) {
#if defined(__x86_64__) || defined(__i386__)
  if (level == Level::Avx512) return kernel_table_avx512();
  if (level == Level::Avx2) return kernel_table_avx2();
#endif
  (void)level;
  return kernel_table_default();
}

// The widest variant this CPU (and its OS, for the wider register state) can run.
Level supported_level() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512) return Level::Avx512;
  if (avx2) return Level::Avx2;
#endif
  return Level::Default;
}

Level requested_level(Level supported) {
  const char* env = std::getenv("SPARSEODE_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return supported;
  const std::string_view name(env);
  if (name == "default") return Level::Default;
  if (name == "avx2") return Level::Avx2;
  if (name == "avx512") return Level::Avx512;
  TORCH_CHECK(false, "SPARSEODE_CPU_CAPABILITY must be one of default, avx2, avx512 (or unset); got '", env, "'");
}

const KernelTable& choose() {
  const Level supported = supported_level();
  const Level requested = requested_level(supported);
  if (static_cast<int>(requested) > static_cast<int>(supported)) {
    TORCH_WARN("SPARSEODE_CPU_CAPABILITY=", std::getenv("SPARSEODE_CPU_CAPABILITY"),
               " asks for instructions this CPU lacks; using '", table_of(supported).name, "'");
    return table_of(supported);
  }
  return table_of(requested);
}

}  // namespace

const KernelTable& active_kernels() {
  static const KernelTable& table = choose();  // a throw leaves it unset: the next call retries
  return table;
}

#endif

std::string cpu_capability() { return active_kernels().name; }

}  // namespace sparseode::cpu
