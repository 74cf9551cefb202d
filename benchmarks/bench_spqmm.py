"""spqmm (dcx.ops.spqmm on the packed sparse-quantized weight) against what a user runs instead,
in the same process: dense F.linear (fp32; on GPU also fp16 / bf16 through cuBLAS) and
torch.sparse CSR (MKL / cuSPARSE) holding the same pruned weight.

Weights are random: a uniform random mask at the given density, random codebook ids, a random
codebook. Bytes counted for dcx are the packed weight it reads (codes, pointers, codebook);
GB/s on those bytes is compared with the measured copy bandwidth (read + write GB/s, as in the
other benchmarks). Several copies of every weight (dense, CSR and packed alike) are rotated so that
a compressed layer is not read from the GPU's L2 or the CPU's L3 cache.

    python benchmarks/bench_spqmm.py                       # full grid (long)
    python benchmarks/bench_spqmm.py --preset cpu-table    # the committed CPU table
    python benchmarks/bench_spqmm.py --anchors             # against torch's quantized CPU paths
    python benchmarks/bench_spqmm.py --shapes fc7 --densities 0.1 --bits 5 --batches 1 --threads 2
Environment: DCX_BENCH_SHAPES, DCX_BENCH_DENSITIES, DCX_BENCH_BITS, DCX_BENCH_BATCHES and
DCX_BENCH_THREADS give the same lists (comma-separated). Writes
benchmarks/results/spqmm-<device>.md (or --name).
"""

import argparse
import itertools
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import dcx  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

# name: (out_features N, in_features K); the weight is [N, K].
SHAPES = {
    "alexnet-fc6": (4096, 9216),
    "fc7": (4096, 4096),
    "vgg16-fc6": (4096, 25088),
    "mlp-up": (11008, 4096),
    "mlp-down": (4096, 11008),
}
DENSITIES = [0.05, 0.1, 0.25, 0.5, 1.0]
BITS = [4, 5, 8]
BATCHES = [1, 4, 16, 64]
# Rotate weight copies until this many bytes are cycled through, on every device: a compressed
# layer (a few MB) would otherwise be read from the GPU's L2 or the CPU's L3 while the dense
# baseline is not.
ROTATE_BYTES = 256 << 20

# The committed CPU table: every listed shape at batch 1 and 16, 10% and 100% density, 5 bits,
# plus the target cases (fc7, 10% / 5 bits and 100% / 6 bits, batch 1), 4-bit dense mode, other
# densities and bit widths, and a batch sweep of fc7.
PRESETS = {
    "cpu-table": [
        dict(shapes=list(SHAPES), densities=[0.1, 1.0], bits=[5], batches=[1, 16]),
        dict(shapes=["fc7"], densities=[1.0], bits=[6], batches=[1, 16]),
        # weight sharing without pruning at 4 bits (dense mode, two ids per byte)
        dict(shapes=["fc7", "mlp-up"], densities=[1.0], bits=[4], batches=[1, 16]),
        dict(shapes=["fc7"], densities=[0.05, 0.1, 0.25, 0.5], bits=[4, 8], batches=[1]),
        dict(shapes=["fc7"], densities=[0.1, 1.0], bits=[5], batches=[4, 64]),
    ],
    # The GPU table (benchmarks/gpu_check.sh, about a minute): AlexNet fc6 at 10% / 5 bits over
    # the batch sizes, then fc7 and an LLM projection, sparse and dense, 4 and 8 bits, batch 1.
    "gpu-table": [
        dict(shapes=["alexnet-fc6"], densities=[0.1], bits=[5], batches=[1, 4, 16, 64]),
        dict(shapes=["fc7", "mlp-up"], densities=[0.1, 1.0], bits=[4, 8], batches=[1]),
    ],
}


def clock_for(device, cpu_clock):
    """Wall clock, or with cpu_clock on the CPU the CPU time of this process (single-threaded
    runs on a shared machine: time slices given to other processes are not counted)."""
    return time.process_time if cpu_clock and device == "cpu" else time.perf_counter


def copy_bandwidth(device, cpu_clock, nbytes=1 << 28):
    """common.copy_bandwidth, timed with the same clock as the cases."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = common.bench_side_by_side({"copy": lambda: dst.copy_(src)}, device,
                                        clock=clock_for(device, cpu_clock))["copy"]
    return 2 * nbytes / seconds / 1e9


def make_packed(n, k, density, bits, device, dtype, gen):
    mask = torch.rand(n, k, generator=gen) < density
    labels = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    codebook = torch.randn(1 << bits, generator=gen).to(dtype)
    packed = dcx.pack(mask, labels, codebook, bits)
    packed = packed.to(device)
    return mask, packed


def copies_for(nbytes, device):
    return max(1, -(-ROTATE_BYTES // max(nbytes, 1)))


def rotating(make_fn, items):
    """A callable that runs make_fn(item) on the next of several copies each call."""
    cycle = itertools.cycle(items)
    return lambda: make_fn(next(cycle))


def run_case(rows, device, name, n, k, density, bits, batches, act_dtype, copy_gbs, cache, gen,
             cpu_clock=False, crossover=-1):
    mask, packed = make_packed(n, k, density, bits, device, act_dtype, gen)
    packs = [packed] + [packed._replace(codes=packed.codes.clone())
                        for _ in range(copies_for(packed.nbytes(), device) - 1)]
    key = (name, density)
    if key not in cache:  # baselines depend on shape and density only
        cache.clear()
        w32 = torch.randn(n, k, generator=gen).to(device)
        dense = {torch.float32: [w32]}
        if device == "cuda":
            for dt in (torch.float16, torch.bfloat16):
                dense[dt] = [w32.to(dt)]
        for dt, ws in dense.items():
            ws += [ws[0].clone() for _ in range(copies_for(ws[0].numel() * ws[0].element_size(), device) - 1)]
        csr = None
        if density < 1.0:
            wc = (w32 * mask.to(device)).to(act_dtype)
            first = wc.to_sparse_csr()
            csr = [first] + [first.clone() for _ in range(copies_for(
                first.values().numel() * (first.values().element_size() + 8), device) - 1)]
            del wc
        cache[key] = dense, csr
    dense, csr = cache[key]
    for m in batches:
        x = torch.randn(m, k, generator=gen).to(device=device, dtype=act_dtype)
        x32 = x.float()
        xt = x.t().contiguous()
        fns = {"dense": rotating(lambda w: F.linear(x32, w), dense[torch.float32])}
        if device == "cuda":
            fns["half"] = rotating(lambda w: F.linear(x, w), dense[act_dtype])
        if csr is not None:
            fns["csr"] = rotating(lambda w: w @ xt, csr)
        # check=False as SparseQuantLinear calls it (on CUDA the check is a host sync per call).
        fns["dcx"] = rotating(lambda p: p.spqmm(x, check=False, crossover=crossover), packs)
        times = common.bench_side_by_side(fns, device, clock=clock_for(device, cpu_clock))
        t_dense, t_half, t_csr, t_dcx = (times.get(f) for f in ("dense", "half", "csr", "dcx"))
        gbs = packed.nbytes() / t_dcx / 1e9
        fmt = lambda t: "-" if t is None else f"{t * 1e3:.3f}"  # noqa: E731
        ratio = lambda t: "-" if t is None else f"{t / t_dcx:.2f}x"  # noqa: E731
        row = [name, f"{n}x{k}", f"{density:.0%}", bits, "dense" if packed.dense else "sparse", m,
               torch.get_num_threads() if device == "cpu" else "-", fmt(t_dense)]
        if device == "cuda":
            row.append(fmt(t_half))
        row += [fmt(t_csr), fmt(t_dcx), f"{packed.nbytes() / (n * k):.3f}", f"{gbs:.1f}",
                f"{gbs / copy_gbs:.0%}", ratio(t_dense)]
        if device == "cuda":
            row.append(ratio(t_half))
        row.append(ratio(t_csr))
        rows.append(row)
        print(" | ".join(str(c) for c in row), flush=True)


# Against the fastest CPU paths torch itself has (--anchors): bf16 F.linear (oneDNN), dynamic
# int8 (quantize_dynamic: fbgemm), int8 and int4 (group 32) weight-only with bf16 activations;
# the 4096 x 4096 layer of the targets, dense 4 and 6 bits and 10% at 5 bits, batch 1, 16, 128.
ANCHOR_CASES = [("fc7", 1.0, 4), ("fc7", 1.0, 6), ("fc7", 0.1, 5)]
ANCHOR_BATCHES = [1, 16, 128]


def read_bandwidth(nbytes=1 << 28):
    """GB/s of a read-only pass over `nbytes` (a sum of float32), the ceiling of a layer that
    streams its weight once."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    seconds = common.bench_side_by_side({"read": lambda: src.sum()}, "cpu")["read"]
    return nbytes / seconds / 1e9


def torch_anchors(n, k, gen):
    """{method: (list of rotated weight objects, fn(weight, x32, xb) -> y, bytes read per call)}."""
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    anchors = {}
    anchors["fp32"] = ([w], lambda t, x, xb: F.linear(x, t), 4 * n * k)
    anchors["bf16"] = ([w.bfloat16()], lambda t, x, xb: F.linear(xb, t), 2 * n * k)
    dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)),
                                                 {torch.nn.Linear}, dtype=torch.qint8)
    anchors["int8 dyn"] = ([dyn], lambda t, x, xb: t(x), n * k)
    scale = w.abs().amax(1) / 127
    w8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    anchors["int8 wo"] = ([(w8, scale.bfloat16())],
                          lambda t, x, xb: torch.ops.aten._weight_int8pack_mm(xb, *t), n * k + 2 * n)
    g = 32
    wg = w.reshape(n, k // g, g)
    low, high = wg.amin(-1), wg.amax(-1)
    step = (high - low) / 15
    q = torch.round((wg - low[..., None]) / step[..., None]).clamp(0, 15).to(torch.int32)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 2)
    sz = torch.stack([step.t(), (low + 8 * step).t()], -1).bfloat16()
    anchors["int4 wo"] = ([(packed4, sz)],
                          lambda t, x, xb: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t[0], g, t[1]),
                          n * k // 2 + sz.numel() * 2)
    for name, (items, fn, nbytes) in anchors.items():
        first = items[0]
        for _ in range(copies_for(nbytes, "cpu") - 1):
            items.append(_clone(first))
    return anchors


def _clone(obj):
    import copy

    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        return tuple(_clone(t) for t in obj)
    return copy.deepcopy(obj)


def run_anchors(args):
    """The --anchors table: every method's ms and GB/s (bytes it reads per call over the measured
    read bandwidth), and dcx's best mode against each of torch's."""
    gen = torch.Generator().manual_seed(0)
    torch.set_num_threads(args.threads[0])
    read_gbs = read_bandwidth()
    rows = []
    methods = ["fp32", "bf16", "int8 dyn", "int8 wo", "int4 wo", "dcx fp32", "dcx bf16", "dcx int8"]
    for name, density, bits in ANCHOR_CASES:
        n, k = SHAPES[name]
        anchors = torch_anchors(n, k, gen)
        for dtype in (torch.float32, torch.bfloat16):
            mask, packed = make_packed(n, k, density, bits, "cpu", dtype, gen)
            packs = [packed] + [packed._replace(codes=packed.codes.clone())
                                for _ in range(copies_for(packed.nbytes(), "cpu") - 1)]
            anchors["dcx " + ("fp32" if dtype == torch.float32 else "bf16")] = (
                packs, lambda p, x, xb, dt=dtype: p.spqmm(x if dt == torch.float32 else xb,
                                                          check=False), packed.nbytes())
            if dtype == torch.float32 and packed.dense:  # int8 compute serves dense mode
                anchors["dcx int8"] = (packs, lambda p, x, xb: p.spqmm_int8(x, check=False),
                                       packed.nbytes())
        for m in ANCHOR_BATCHES:
            x = torch.randn(m, k, generator=gen)
            xb = x.bfloat16()
            fns = {meth: rotating(lambda t, fn=anchors[meth][1]: fn(t, x, xb), anchors[meth][0])
                   for meth in methods if meth in anchors}
            times = common.bench_side_by_side(fns, "cpu", repeat=10 if m >= 128 else 20)
            best = min((meth for meth in times if meth.startswith("dcx")), key=times.get)
            cells = [f"{times[meth] * 1e6:,.0f} ({anchors[meth][2] / times[meth] / 1e9:.0f})"
                     if meth in times else "n/a" for meth in methods]
            ratios = [f"{times[a] / times[best]:.2f}x" for a in ("fp32", "bf16", "int8 dyn", "int4 wo")]
            rows.append([name, f"{n}x{k}", f"{density:.0%}", bits,
                         "dense" if packed.dense else "sparse", m, *cells, best, *ratios])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    header = ["layer", "N x K", "density", "bits", "mode", "batch",
              *[f"{meth} us (GB/s)" for meth in methods], "dcx best",
              "vs fp32", "vs bf16", "vs int8 dyn", "vs int4 wo"]
    notes = [common.stamp("cpu"), "",
             f"Each method's microseconds per call and, in parentheses, the GB/s of the weight bytes "
             f"it reads per call (fp32 4, bf16 2, int8 1, int4 0.5 + scales, dcx its packed bytes) "
             f"against a measured read bandwidth of {read_gbs:.1f} GB/s. Every weight rotated "
             f"through {ROTATE_BYTES >> 20} MB of copies, past the 32 MB L3. Activations fp32 for "
             "fp32 and int8 dynamic (quantize_dynamic, fbgemm), bf16 for bf16 and the weight-only "
             "int8 / int4 (group 32) ops; dcx fp32 / bf16: dcx.ops.spqmm on fp32 / bf16 "
             "activations (compute='float32' / 'bfloat16'); dcx int8: dcx.ops.spqmm_int8 on fp32 "
             "activations (dense mode only; a layer in compute='int8' takes the fp32 path from "
             f"{dcx.nn.INT8_ROWS} rows on). Ratios: the anchor's time over dcx's fastest mode. "
             "Median of interleaved rounds, wall clock. Command: "
             "`python benchmarks/bench_spqmm.py --anchors`."]
    common.write_table("spqmm-cpu-anchors", "spqmm vs torch's quantized CPU paths (4096 x 4096)",
                       header, rows, notes)


def grid_from(args):
    if args.preset:
        return PRESETS[args.preset]
    return [dict(shapes=args.shapes, densities=args.densities, bits=args.bits, batches=args.batches)]


def env_list(name, cast, default):
    value = os.environ.get(name)
    return [cast(v) for v in value.split(",")] if value else default


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=lambda s: s.split(","),
                        default=env_list("DCX_BENCH_SHAPES", str, list(SHAPES)))
    parser.add_argument("--densities", type=lambda s: [float(v) for v in s.split(",")],
                        default=env_list("DCX_BENCH_DENSITIES", float, DENSITIES))
    parser.add_argument("--bits", type=lambda s: [int(v) for v in s.split(",")],
                        default=env_list("DCX_BENCH_BITS", int, BITS))
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")],
                        default=env_list("DCX_BENCH_BATCHES", int, BATCHES))
    parser.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")],
                        default=env_list("DCX_BENCH_THREADS", int, [2]), help="CPU threads")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time CPU runs by process CPU time (for 1 thread on a shared machine)")
    parser.add_argument("--devices", type=lambda s: s.split(","), default=common.devices_to_run())
    parser.add_argument("--dtype", default="float16", help="GPU activation dtype (float16, bfloat16)")
    parser.add_argument("--crossover", type=int, default=-1,
                        help="batch from which dcx decodes + runs the BLAS (-1: its default; 0: "
                             "always decode; a large value: always the kernel)")
    parser.add_argument("--name", default=None, help="results file name (default spqmm-<device>)")
    parser.add_argument("--note", action="append", default=[], help="a line added to the table's notes")
    parser.add_argument("--anchors", action="store_true",
                        help="the table against torch's quantized CPU paths (spqmm-cpu-anchors.md)")
    args = parser.parse_args()
    if args.anchors:
        return run_anchors(args)
    gen = torch.Generator().manual_seed(0)
    for device in args.devices:
        act_dtype = torch.float32 if device == "cpu" else getattr(torch, args.dtype)
        rows, copy_notes = [], []
        for threads in (args.threads if device == "cpu" else [torch.get_num_threads()]):
            torch.set_num_threads(threads)
            copy_gbs = copy_bandwidth(device, args.cpu_clock)
            copy_notes.append(f"{copy_gbs:.1f} GB/s" + (f" ({threads} threads)" if device == "cpu" else ""))
            cache = {}
            for part in grid_from(args):
                for name in part["shapes"]:
                    n, k = SHAPES[name]
                    for density in part["densities"]:
                        for bits in part["bits"]:
                            run_case(rows, device, name, n, k, density, bits, part["batches"],
                                     act_dtype, copy_gbs, cache, gen, args.cpu_clock,
                                     args.crossover)
        header = ["layer", "N x K", "density", "bits", "mode", "batch", "threads", "dense fp32 ms"]
        if device == "cuda":
            header.append(f"dense {args.dtype} ms")
        header += ["CSR ms", "dcx ms", "dcx bytes/weight", "dcx GB/s", "of copy bw", "vs dense fp32"]
        if device == "cuda":
            header.append(f"vs dense {args.dtype}")
        header.append("vs CSR")
        act = "float32" if device == "cpu" else args.dtype
        notes = [common.stamp(device), "",
                 f"Activations {act} (dcx and CSR), dense baselines F.linear; CSR is torch.sparse "
                 f"CSR (int64 indices) of the same pruned weight. Measured copy bandwidth: "
                 f"{', '.join(copy_notes)} (read + write, same clock). dcx GB/s counts the packed bytes it reads "
                 f"(bytes/weight per original weight: dense fp32 is 4). Median of >= 20 runs, the "
                 f"methods timed in interleaved rounds "
                 f"({'process CPU time' if args.cpu_clock and device == 'cpu' else 'wall clock'}); "
                 + ("dcx's own choice of kernel or decode + BLAS (auto crossover)." if args.crossover < 0
                    else f"dcx crossover forced to batch {args.crossover}.")]
        notes += ["", *args.note] if args.note else []
        common.write_table(args.name or f"spqmm-{device}",
                           "spqmm vs dense F.linear and torch.sparse CSR", header, rows, notes)


if __name__ == "__main__":
    main()
