"""Check the AVX2/AVX-512 variant objects of the CPU kernels for leaked wide instructions.

A variant is csrc/cpu/kernels.h compiled under `#pragma GCC target(...)`. Its own functions live in
namespace sparseode::cpu::<variant>; any other function the object defines as weak (an inline or
template function from a header, which the linker merges with the copies of other objects) must
use baseline instructions only, or the merge may hand a baseline CPU an AVX instruction.

    python check_variant_symbols.py OBJECT... [--nm nm] [--objdump objdump]

Exits 1, listing the offenders, when a weak symbol outside the variant namespace holds a VEX/EVEX
instruction (a mnemonic starting with 'v') or touches a ymm/zmm/mask register.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

WIDE = re.compile(r"^\s*[0-9a-f]+:\s+(v\w+|.*%[yz]mm\d|.*%k[0-7]\b)")
VARIANT = re.compile(r"(avx2|avx512)\.cpp\.o$|(avx2|avx512)\.o$")


def weak_symbols(obj: str, nm: str) -> list[str]:
    out = subprocess.run([nm, "--defined-only", obj], check=True, capture_output=True, text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if len(line.split()) == 3 and line.split()[1] in "WVu"]


def demangle(names: list[str]) -> list[str]:
    return subprocess.run(["c++filt"], input="\n".join(names), check=True, capture_output=True,
                          text=True).stdout.splitlines()


def wide_functions(obj: str, objdump: str) -> set[str]:
    """Mangled names of the functions in `obj` whose code holds a wide instruction."""
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", obj], check=True, capture_output=True, text=True).stdout
    wide, current = set(), None
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            current = head.group(1)
        elif current and WIDE.match(line):
            wide.add(current)
    return wide


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("objects", nargs="+")
    parser.add_argument("--nm", default="nm")
    parser.add_argument("--objdump", default="objdump")
    args = parser.parse_args(argv)
    checked, bad = 0, []
    for obj in args.objects:
        match = VARIANT.search(os.path.basename(obj))
        if not match:
            continue
        variant = match.group(1) or match.group(2)
        checked += 1
        weak = weak_symbols(obj, args.nm)
        wide = wide_functions(obj, args.objdump)
        for mangled, name in zip(weak, demangle(weak)):
            if mangled in wide and f"sparseode::cpu::{variant}::" not in name:
                bad.append(f"{os.path.basename(obj)}: {name}")
    if checked == 0:
        print("no avx2/avx512 variant object among", args.objects, file=sys.stderr)
        return 1
    for line in bad:
        print("wide instructions in a shared (weak) function:", line)
    print(f"checked {checked} variant object(s): {len(bad)} leaked function(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
