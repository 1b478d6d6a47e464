// torch.ops.sparseode.cpu_capability() -> str: the CPU kernel variant in use (dispatch.h), for
// `sparseode info` and the tests. A fragment of the sparseode library, not one of its kernel ops.
#include <torch/library.h>

#include "dispatch.h"

TORCH_LIBRARY_FRAGMENT(sparseode, m) { m.def("cpu_capability() -> str", &sparseode::cpu::cpu_capability); }
