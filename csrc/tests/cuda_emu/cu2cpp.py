#!/usr/bin/env python3
"""cu2cpp.py IN.cu OUT.cpp: rewrites the two CUDA syntax forms a C++ compiler cannot take, for
cuda_emu.h (everything else, __global__, __device__, the intrinsics, is the header's job):

    kernel<<<grid, block[, smem[, stream]]>>>(args)  ->  ::emu::launch(::emu::cfg(grid, block, ...), kernel, args)
    __shared__ T name[dims];                          ->  EMU_SHARED(T, name, [dims]);
    extern __shared__ [__align__(n)] T name[];        ->  #define name (static_cast<T*>(::emu::dynamic_smem()))

Every line keeps its number (a #line directive names the .cu file), so the emulator's reports and
the compiler's errors point into the kernel source. A form it does not know is left for the
compiler, and cuda_emu.h makes a stray __shared__ a compile error: nothing runs half-rewritten.
"""

import os
import re
import sys

DYNAMIC_SHARED = re.compile(
    r"^[ \t]*extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:\s]+?)\s+(\w+)\s*\[\s*\]\s*;[ \t]*$",
    re.M,
)
STATIC_SHARED = re.compile(
    r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>\s]+?)\s+(\w+)\s*((?:\[[^\]]*\]\s*)*);"
)
# A kernel template whose arguments a launch may leave to deduction.
KERNEL_TEMPLATE = re.compile(
    r"template\s*<[^{;]*?>\s*__global__\s+void\s+"
    r"(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(",
    re.S,
)
# The kernel (a name, maybe qualified, maybe with template arguments) before <<<.
LAUNCH = re.compile(
    r"([A-Za-z_]\w*(?:::[A-Za-z_]\w*)*(?:\s*<[^<>;{}]*>)?)\s*<<<(.+?)>>>\s*\(", re.S
)


def rewrite(source: str) -> str:
    s = DYNAMIC_SHARED.sub(
        lambda m: f"#define {m[2]} (static_cast<{m[1]}*>(::emu::dynamic_smem()))", source
    )
    s = STATIC_SHARED.sub(lambda m: f"EMU_SHARED({m[1]}, {m[2]}, {m[3]});", s)
    templates = set(KERNEL_TEMPLATE.findall(s))

    def launch(m: re.Match) -> str:
        kernel = re.sub(r"\s+", " ", m[1])
        config = re.sub(r"\s+", " ", m[2])
        if kernel in templates:
            # An overload set cannot be passed as a function pointer: a generic lambda calls it.
            call = (f"::emu::launch_deduced(::emu::cfg({config}), "
                    f"[](auto... emu_a) {{ {kernel}(emu_a...); }}, ")
        else:
            call = f"::emu::launch(::emu::cfg({config}), {kernel}, "
        return call + "\n" * m[0].count("\n")  # the launch's line breaks after it: lines keep their numbers

    s = LAUNCH.sub(launch, s)
    for left in ("<<<", "__shared__"):
        if left in s:
            raise ValueError(f"a {left} is left after rewriting (a form cu2cpp.py does not know)")
    return s


def main(argv):
    if len(argv) != 3:
        sys.exit("usage: cu2cpp.py IN.cu OUT.cpp")
    src, dst = argv[1], argv[2]
    with open(src, encoding="utf-8") as f:
        source = f.read()
    try:
        out = f'#line 1 "{src}"\n' + rewrite(source)
    except ValueError as e:
        sys.exit(f"{src}: {e}")
    tmp = dst + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(out)
    os.replace(tmp, dst)  # never a half-written file for the compiler to pick up


if __name__ == "__main__":
    main(sys.argv)
