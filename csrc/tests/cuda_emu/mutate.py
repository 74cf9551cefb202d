#!/usr/bin/env python3
"""Checks that the emulated-kernel harnesses can fail: each mutant below injects one bug into one
csrc/cuda/*_kernel.cu, and the harness must catch it under the schedules named.

    python3 csrc/tests/cuda_emu/mutate.py BUILD_DIR [NAME ...]

BUILD_DIR is a CMake build with DCX_CUDA_EMU=ON; the mutants run whose build kind (plain, fma,
asan, tsan: from DCX_SANITIZE and DCX_CUDA_EMU_FMA in its cache) matches. The source tree is never
written: a mutant goes into the build's generated copy of the kernel (cuda_emu_gen/), and the true
one is generated and rebuilt afterwards, also when a mutant fails to build. Exits 1 when a mutant
is not caught or does not apply (the kernel changed: update the pattern).
"""

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


@dataclass
class Mutant:
    name: str
    kernel: str      # csrc/cuda/<kernel>_kernel.cu
    pattern: str     # a regex that must match exactly once
    replacement: str
    kinds: tuple     # the build kinds in which the harness must catch it
    schedules: tuple = ("forward",)  # it must be caught under each of these
    part: str = ""   # the harness part to run (all when empty)


MUTANTS = [
    # A barrier between zeroing the per-warp sums and adding into them.
    Mutant("centroid_grad.no-barrier", "centroid_grad",
           r"(sums\[i\] = Acc\(0\);\n)  __syncthreads\(\);\n", r"\1",
           ("plain", "fma", "asan"), ("forward", "warp")),
    # The warp's int32 dot summed from the wrong first shuffle distance.
    Mutant("spqmm_int8.shuffle-start", "spqmm_int8",
           r"for \(int o = 16; o > 0; o >>= 1\) dot \+=", "for (int o = 8; o > 0; o >>= 1) dot +=",
           ("plain", "fma", "asan")),
    # The window of a step read from the neighbouring lane.
    Mutant("spqmm.sparse-lane", "spqmm", r"__shfl_sync\(kFull, window, t\)",
           "__shfl_sync(kFull, window, t ^ 1)", ("plain", "fma", "asan"), part="sparse"),
    # The group scale left out of a sparse step's weights.
    Mutant("spqmm.sparse-group-scale", "spqmm", r"if \(kScaled\) w \*= srow \? srow\[c0\] : 0\.f;",
           "", ("plain", "fma", "asan"), part="sparse"),
    # The barrier after x is staged in shared memory: only schedules that let one warp run ahead
    # of the others read a half-staged x.
    Mutant("spqmm.staging-barrier", "spqmm",
           r"(xs\[i\] = x\[i\];\n  \}\n)  __syncthreads\(\);\n", r"\1",
           ("plain", "fma"), ("warp", "warp-reverse", "random"), part="sparse"),
    # A shared-memory write one past the codebook table.
    Mutant("spqmm.table-overrun", "spqmm", r"i < 256; i \+= blockDim\.x\) table\[i\]",
           "i <= 256; i += blockDim.x) table[i]", ("asan",), part="dense"),
    # The prefix sums without their explicit roundings: nvcc (and the FMA build) fuses w d * d
    # into the addition, and the sums no longer match the CPU's bit for bit.
    Mutant("kmeans1d.contracted-prefix", "kmeans1d",
           r"s2 = __dadd_rn\(s2, p\.d2\);",
           "s2 = s2 + p.wd * __dsub_rn(static_cast<double>(x[i]), shift);", ("fma",)),
    # The weights' running sum restarted in every tile (the tile offsets of W forgotten).
    Mutant("kmeans1d.weight-offsets", "kmeans1d",
           r"runw = offset\[2 \* tiles \+ t\]", "runw = 0.0", ("plain", "fma", "asan")),
    # AdamW's unfused products left to the compiler: nvcc (and the FMA build) fuses the decayed
    # weight into the update, and the step no longer matches the CPU's bit for bit.
    Mutant("masked_adamw.contracted-product", "masked_adamw",
           r"return __fmul_rn\(a, b\);", "return a * b;", ("fma",)),
    # The mask of a vector's first element used for all of its elements.
    Mutant("masked_adamw.vector-mask", "masked_adamw", r"k\.v\[j\] != 0", "k.v[0] != 0",
           ("plain", "fma", "asan")),
    # The bad-label flag as a plain store from many threads (the race this harness once found).
    Mutant("centroid_grad.flag-store", "centroid_grad",
           r"if \(bad\) atomicOr\(bad_flag, 1\);  //", "if (bad) *bad_flag = 1;  //",
           ("tsan",), part="bad-labels"),
]


def build_kind(build):
    cache = {}
    with open(os.path.join(build, "CMakeCache.txt")) as f:
        for line in f:
            m = re.match(r"([A-Za-z0-9_]+):\w+=(.*)", line.strip())
            if m:
                cache[m[1]] = m[2]
    if cache.get("DCX_CUDA_EMU", "OFF").upper() not in ("ON", "1", "TRUE", "YES"):
        sys.exit(f"{build}: not configured with DCX_CUDA_EMU=ON")
    sanitize = cache.get("DCX_SANITIZE", "OFF").lower()
    if sanitize in ("on", "address"):
        return "asan"
    if sanitize == "thread":
        return "tsan"
    return "fma" if cache.get("DCX_CUDA_EMU_FMA", "OFF").upper() in ("ON", "1", "TRUE", "YES") else "plain"


def run(cmd, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def try_mutant(build, m):
    """'caught', 'MISSED under ...', or why it could not run."""
    source = os.path.join(ROOT, "csrc", "cuda", f"{m.kernel}_kernel.cu")
    with open(source) as f:
        text = f.read()
    mutated, count = re.subn(m.pattern, m.replacement, text)
    if count != 1:
        return f"DOES NOT APPLY ({count} matches)"
    mutant_dir = os.path.join(build, "mutants")
    os.makedirs(mutant_dir, exist_ok=True)
    mutant_source = os.path.join(mutant_dir, f"{m.kernel}_kernel.cu")
    with open(mutant_source, "w") as f:
        f.write(mutated)
    generated = os.path.join(build, "cuda_emu_gen", f"{m.kernel}_kernel.cpp")
    target = f"test_{m.kernel}_kernel"
    try:
        r = run([sys.executable, os.path.join(HERE, "cu2cpp.py"), mutant_source, generated])
        if r.returncode == 0:
            r = run(["cmake", "--build", build, "--target", target])
        if r.returncode != 0:
            return "DOES NOT BUILD:\n" + r.stdout[-2000:]
        missed = []
        for schedule in m.schedules:
            env = dict(os.environ, EMU_SCHEDULE=schedule, TSAN_OPTIONS="halt_on_error=1")
            try:
                r = run([os.path.join(build, target)] + ([m.part] if m.part else []), env=env,
                        timeout=600)
                if r.returncode == 0:
                    missed.append(schedule)
            except subprocess.TimeoutExpired:
                pass  # a hang is caught too (ctest's timeout would fail it)
        return f"MISSED under {', '.join(missed)}" if missed else "caught"
    finally:
        os.remove(generated) if os.path.exists(generated) else None  # regenerated from the source
        restored = run(["cmake", "--build", build, "--target", target])
        if restored.returncode != 0:
            sys.exit(f"could not rebuild {target} from the true source:\n{restored.stdout[-2000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", help="a CMake build directory with DCX_CUDA_EMU=ON")
    ap.add_argument("names", nargs="*", help="mutants to run (default: all of the build's kind)")
    args = ap.parse_args()
    kind = build_kind(args.build)
    chosen = [m for m in MUTANTS if (m.name in args.names if args.names else kind in m.kinds)]
    if not chosen:
        sys.exit(f"no mutant for a {kind} build" + (f" named {args.names}" if args.names else ""))
    failed = 0
    for m in chosen:
        result = try_mutant(args.build, m)
        ok = result == "caught"
        failed += not ok
        print(f"{kind} mutant {m.name} ({', '.join(m.schedules)}): {result}", flush=True)
    print(f"{len(chosen) - failed} of {len(chosen)} mutants caught in the {kind} build")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
