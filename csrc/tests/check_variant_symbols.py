"""Check a built binary of the portable CPU kernels for wide instructions outside the variants.

The AVX2 and AVX-512 variants are csrc/cpu/kernels.h compiled under `#pragma GCC target(...)`, with
their own functions in namespace sparseode::cpu::avx2 / ::avx512 (or <kernel>_avx2 / _avx512 for
another kernel family built the same way). Any other function holding AVX
code would run on every CPU: typically an inline or template function from a shared header,
compiled inside a variant and kept by the linker in place of the baseline copy. After linking
(the extension .so or the ctest executable) no function outside the variant namespaces may hold a
VEX/EVEX instruction (a mnemonic starting with 'v') or touch a ymm/zmm/mask register.

    python check_variant_symbols.py BINARY... [--objdump objdump]

Prints the offenders and exits 1 if there are any. Not for a SPARSEODE_NATIVE=1 build, where
every function may use the build machine's instruction set.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys

WIDE = re.compile(r"^\s*[0-9a-f]+:\s+(v\w+|.*%[yz]mm\d|.*%k[0-7]\b)")
VARIANT_NAMESPACE = re.compile(r"sparseode::cpu::(\w+_)?(avx2|avx512)::")  # also e.g. field_avx2


def wide_functions(binary: str, objdump: str = "objdump") -> list[str]:
    """Demangled names of the functions in ``binary`` whose code holds a wide instruction."""
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", binary], check=True, capture_output=True,
                         text=True).stdout
    wide, current = [], None
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            current = head.group(1)
        elif current is not None and WIDE.match(line):
            wide.append(current)
            current = None  # one hit per function is enough
    return wide


def leaked(binary: str, objdump: str = "objdump") -> list[str]:
    """The wide functions of ``binary`` outside the variant namespaces."""
    return [name for name in wide_functions(binary, objdump) if not VARIANT_NAMESPACE.search(name)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binaries", nargs="+")
    parser.add_argument("--objdump", default="objdump")
    args = parser.parse_args(argv)
    bad = [(b, name) for b in args.binaries for name in leaked(b, args.objdump)]
    for binary, name in bad:
        print(f"{binary}: wide instructions outside the CPU kernel variants: {name}")
    print(f"checked {len(args.binaries)} binary(ies): {len(bad)} leaked function(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
