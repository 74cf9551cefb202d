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
    python benchmarks/bench_spqmm.py --anchors --busy      # the same with one core loaded
    python benchmarks/bench_spqmm.py --anchors --busy 2    # ... with both cores loaded
    python benchmarks/bench_spqmm.py --shapes fc7 --densities 0.1 --bits 5 --batches 1 --threads 2
    python benchmarks/bench_spqmm.py --preset groups --group-size 128 --name spqmm-cpu-groups
                                                           # group scales' cost
Environment: DCX_BENCH_SHAPES, DCX_BENCH_DENSITIES, DCX_BENCH_BITS, DCX_BENCH_BATCHES and
DCX_BENCH_THREADS give the same lists (comma-separated). Writes
benchmarks/results/spqmm-<device>.md (or --name).
"""

import argparse
import itertools
import os
import statistics
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
ROTATE_BYTES = common.rotation_bytes(256 << 20, caches=1.5)

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
    # Group scales' cost (--group-size): fc7 sparse 10% / 5 bits and dense 4 and 6 bits over the
    # batch sizes.
    "groups": [
        dict(shapes=["fc7"], densities=[0.1], bits=[5], batches=[1, 4, 16, 64]),
        dict(shapes=["fc7"], densities=[1.0], bits=[4, 6], batches=[1, 4, 16, 64]),
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
    return mask, packed, labels, codebook


def copies_for(nbytes, device):
    return max(1, -(-ROTATE_BYTES // max(nbytes, 1)))


def rotating(make_fn, items):
    """A callable that runs make_fn(item) on the next of several copies each call."""
    cycle = itertools.cycle(items)
    return lambda: make_fn(next(cycle))


def run_case(rows, device, name, n, k, density, bits, batches, act_dtype, copy_gbs, cache, gen,
             cpu_clock=False, crossover=-1, group_size=0):
    mask, packed, labels, codebook = make_packed(n, k, density, bits, device, act_dtype, gen)
    packs = [packed] + [packed._replace(codes=packed.codes.clone())
                        for _ in range(copies_for(packed.nbytes(), device) - 1)]
    grouped = []
    if group_size:  # the same weight with group scales (packed by their rule) beside it
        packed_g = dcx.pack(mask, labels, codebook, bits, group_size=group_size).to(device)
        scale = (torch.rand(n, -(-k // group_size), generator=gen) + 0.5).half().float().to(device)
        grouped = [(packed_g._replace(codes=packed_g.codes.clone()), scale.clone())
                   for _ in range(copies_for(packed_g.nbytes() + scale.numel() * 4, device))]
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
        if grouped:
            fns["dcx g"] = rotating(lambda ps: ps[0].spqmm(x, check=False, crossover=crossover,
                                                           scale=ps[1]), grouped)
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
        if grouped:
            t_g = times["dcx g"]
            row += [fmt(t_g), f"{t_g / t_dcx:.2f}x",
                    f"{(grouped[0][0].nbytes() + grouped[0][1].numel() * 2) / (n * k):.3f}"]
        rows.append(row)
        print(" | ".join(str(c) for c in row), flush=True)


# Against the fastest CPU paths torch itself has (--anchors): bf16 F.linear (oneDNN), dynamic
# int8 (quantize_dynamic: fbgemm), int8 and int4 (group 32) weight-only with bf16 activations, and
# torchao's quantize_ configs where they run on the CPU build; the 4096 x 4096 layer of the
# targets, dense 4 and 6 bits and 10% at 5 bits, batch 1 to 128.
ANCHOR_CASES = [("fc7", 1.0, 4), ("fc7", 1.0, 6), ("fc7", 0.1, 5)]
ANCHOR_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128]
# torchao's codebook weight-only config dequantizes the whole weight on every call (about 0.3 s
# here): timed up to this batch only.
CODEBOOK_BATCHES = 16
# --busy: the batches measured quiet and with cores loaded.
BUSY_BATCHES = [1, 16, 128]


def read_bandwidth(nbytes=1 << 28):
    """GB/s of a read-only pass over `nbytes` (a sum of float32), the ceiling of a layer that
    streams its weight once."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    seconds = common.bench_side_by_side({"read": lambda: src.sum()}, "cpu")["read"]
    return nbytes / seconds / 1e9


def torchao_anchors(w):
    """torchao's quantize_ on an nn.Linear holding w ({method: (module, bytes read)}), for each
    config that runs on this build: int8 dynamic activations with int8 weights, int8 weight-only
    (bf16 activations), and the prototype codebook weight-only config (4-bit ids, one codebook
    for the layer; it needs coremltools). Missing ones are left out with a line on stderr."""
    try:
        import torchao.quantization as tq
    except ImportError as e:
        print(f"torchao anchors left out: {e} (pip install -e '.[bench]')", file=sys.stderr)
        return {}
    n, k = w.shape
    configs = {"ao int8 dyn": (tq.Int8DynamicActivationInt8WeightConfig, torch.float32, n * k),
               "ao int8 wo": (tq.Int8WeightOnlyConfig, torch.bfloat16, n * k)}
    try:
        from torchao.prototype.quantization.codebook_coreml import CodebookWeightOnlyConfig
        configs["ao codebook"] = (
            lambda: CodebookWeightOnlyConfig(dtype=torch.uint4, block_size=[-1, -1]),
            torch.float32, n * k // 2)
    except ImportError as e:
        print(f"torchao codebook anchor left out: {e}", file=sys.stderr)
    out = {}
    for name, (config, dtype, nbytes) in configs.items():
        linear = torch.nn.Linear(k, n, bias=False).to(dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tq.quantize_(linear, config())
                linear(torch.zeros(1, k, dtype=dtype))
        except Exception as e:  # a config without a CPU path on this build
            print(f"{name} left out: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            continue
        out[name] = (linear, dtype, nbytes)
    return out


def torch_anchors(n, k, gen):
    """{method: (list of rotated weight objects, fn(weight, x32, xb) -> y, bytes read per call)}."""
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    anchors = {}
    anchors["fp32"] = ([w], lambda t, x, xb: F.linear(x, t), 4 * n * k)
    anchors["bf16"] = ([w.bfloat16()], lambda t, x, xb: F.linear(xb, t), 2 * n * k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of torchao's quantize_ (below)
        dyn = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)), {torch.nn.Linear},
            dtype=torch.qint8)
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
    for name, (module, dtype, nbytes) in torchao_anchors(w).items():
        anchors[name] = ([module], (lambda t, x, xb: t(x)) if dtype == torch.float32 else
                         (lambda t, x, xb: t(xb)), nbytes)
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


ANCHOR_METHODS = ["fp32", "bf16", "int8 dyn", "int8 wo", "int4 wo", "ao int8 dyn", "ao int8 wo",
                  "ao codebook", "dcx fp32", "dcx bf16", "dcx int8"]


def anchor_cases(gen):
    """For each case: (name, n, k, density, bits, packed, {method: (items, fn, bytes)})."""
    for name, density, bits in ANCHOR_CASES:
        n, k = SHAPES[name]
        anchors = torch_anchors(n, k, gen)
        mask, packed, _, _ = make_packed(n, k, density, bits, "cpu", torch.float32, gen)
        packs = [packed] + [packed._replace(codes=packed.codes.clone())
                            for _ in range(copies_for(packed.nbytes(), "cpu") - 1)]
        for i, mode in enumerate(("float32", "bfloat16", "int8")):
            # Each mode starts a third further along the copies: in step, every mode after the
            # first read the copy the one before had just brought into L3.
            start = i * len(packs) // 3
            anchors["dcx " + {"float32": "fp32", "bfloat16": "bf16"}.get(mode, mode)] = (
                packs[start:] + packs[:start],
                lambda p, x, xb, mode=mode: p.spqmm(x, check=False, compute=mode), packed.nbytes())
        yield name, n, k, density, bits, packed, anchors
        # Each case's copies take several GB: freed before the next case's are made (the caller
        # drops its reference too; with both cases alive, --busy ran out of 24 GB).
        del anchors, packs


def time_anchors(anchors, k, batches, gen, label="", summary=statistics.median):
    """{batch: {method: seconds}} for every method at each batch, interleaved per batch (the
    median call, or `summary` of the calls' seconds)."""
    out = {}
    for m in batches:
        x = torch.randn(m, k, generator=gen)
        xb = x.bfloat16()
        fns = {meth: rotating(lambda t, fn=anchors[meth][1]: fn(t, x, xb), anchors[meth][0])
               for meth in ANCHOR_METHODS if meth in anchors
               and (meth != "ao codebook" or m <= CODEBOOK_BATCHES)}
        with torch.inference_mode():
            out[m] = common.bench_side_by_side(fns, "cpu", repeat=10 if m >= 32 else 20,
                                               summary=summary)
        print(label, m, " ".join(
            f"{meth}=" + " / ".join(f"{v * 1e6:,.0f}" for v in (t if isinstance(t, tuple) else (t,)))
            for meth, t in out[m].items()), flush=True)
    return out


class BusyCores:
    """`cores` processes spinning at normal priority (a user's browser or build), for `with`."""

    def __init__(self, cores=1):
        self.cores = cores

    def __enter__(self):
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        self.procs = [spawn.Process(target=_spin, daemon=True) for _ in range(self.cores)]
        for proc in self.procs:
            proc.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.terminate()
            proc.join()


def _spin():
    while True:
        pass


def run_anchors(args):
    """The --anchors table: every method's us and GB/s (bytes it reads per call over the measured
    read bandwidth), and dcx's best mode against each of torch's. With --busy, the same methods
    at BUSY_BATCHES quiet and with args.busy cores loaded, and each one's slowdown, of the median
    call and of the mean (which counts the calls that waited for a core)."""
    gen = torch.Generator().manual_seed(0)
    torch.set_num_threads(args.threads[0])
    read_gbs = read_bandwidth()
    rows, busy_rows = [], []
    for name, n, k, density, bits, packed, anchors in anchor_cases(gen):
        case = [name, f"{n}x{k}", f"{density:.0%}", bits, "dense" if packed.dense else "sparse"]
        if args.busy:
            both = lambda t: (statistics.median(t), statistics.fmean(t))  # noqa: E731
            quiet = time_anchors(anchors, k, BUSY_BATCHES, gen, "quiet", both)
            with BusyCores(args.busy):
                busy = time_anchors(anchors, k, BUSY_BATCHES, gen, "busy", both)
            for m in BUSY_BATCHES:
                for i, stat in enumerate(("median", "mean")):
                    cells = [f"{quiet[m][meth][i] * 1e6:,.0f} / {busy[m][meth][i] * 1e6:,.0f} "
                             f"({busy[m][meth][i] / quiet[m][meth][i]:.2f}x)"
                             if meth in quiet[m] else "n/a" for meth in ANCHOR_METHODS]
                    busy_rows.append([*case, m, stat, *cells])
                    print(" | ".join(str(c) for c in busy_rows[-1]), flush=True)
            del anchors
            continue
        times = time_anchors(anchors, k, ANCHOR_BATCHES, gen)
        nbytes = {meth: anchors[meth][2] for meth in anchors}
        del anchors
        for m in ANCHOR_BATCHES:
            t = times[m]
            best = min((meth for meth in t if meth.startswith("dcx")), key=t.get)
            cells = [f"{t[meth] * 1e6:,.0f} ({nbytes[meth] / t[meth] / 1e9:.0f})"
                     if meth in t else "n/a" for meth in ANCHOR_METHODS]
            ratios = [f"{t[a] / t[best]:.2f}x" if a in t else "n/a"
                      for a in ("fp32", "bf16", "int8 dyn", "int4 wo", "ao int8 dyn")]
            rows.append([*case, m, *cells, best, *ratios])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    paths = ("Paths: fp32 / bf16 F.linear (MKL / oneDNN); int8 dyn: "
             "torch.ao.quantization.quantize_dynamic (fbgemm, u8 x s8 with VNNI where the CPU has "
             "it; deprecated in torch 2.13 in favour of torchao); int8 wo / int4 wo: "
             "aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu (group 32) on bf16 "
             "activations; ao int8 dyn: torchao 0.18 Int8DynamicActivationInt8WeightConfig "
             "(torchao.kernel.int_scaled_matmul, torch._int_mm on CPU, eager); ao int8 wo: "
             "Int8WeightOnlyConfig on bf16 activations; ao codebook: the prototype "
             "CodebookWeightOnlyConfig (4-bit ids, one codebook; it dequantizes the weight on "
             f"every call, timed up to batch {CODEBOOK_BATCHES}). torchao's int4 configs have no "
             "CPU path in this build (int4_packing_format plain needs mslk, plain_int32 and the "
             "groupwise LUT config no CPU kernel). dcx fp32 / bf16 / int8: dcx.ops.spqmm with "
             "compute='float32' / 'bfloat16' / 'int8' (int8: a sparse layer from 2 rows with AVX-512 VNNI; the kernel table, "
             "csrc/core/spqmm_plan.h, picks the kernel per batch).")
    if args.busy:
        loaded = "one core" if args.busy == 1 else f"{args.busy} cores"
        notes = [common.stamp("cpu"), "",
                 f"Each method's microseconds per call quiet / with {loaded} loaded by processes "
                 "spinning at normal priority, and the slowdown: of the median call, and of the "
                 "mean, which counts the calls that waited a scheduler slice for a core. " + paths +
                 f" Every weight rotated through {ROTATE_BYTES >> 20} MB of copies, past the "
                 f"{common.l3_bytes() >> 20} MB L3. Interleaved rounds, wall clock. Command: "
                 f"`python benchmarks/bench_spqmm.py --anchors --busy"
                 f"{'' if args.busy == 1 else f' {args.busy}'}`."]
        header = ["layer", "N x K", "density", "bits", "mode", "batch", "call",
                  *[f"{meth} us quiet / busy" for meth in ANCHOR_METHODS]]
        common.write_table("spqmm-cpu-busy" + ("" if args.busy == 1 else f"-{args.busy}"),
                           f"spqmm vs torch's CPU paths with {loaded} loaded (4096 x 4096)",
                           header, busy_rows, notes)
        return
    header = ["layer", "N x K", "density", "bits", "mode", "batch",
              *[f"{meth} us (GB/s)" for meth in ANCHOR_METHODS], "dcx best",
              "vs fp32", "vs bf16", "vs int8 dyn", "vs int4 wo", "vs ao int8 dyn"]
    notes = [common.stamp("cpu"), "",
             f"Each method's microseconds per call and, in parentheses, the GB/s of the weight bytes "
             f"it reads per call (fp32 4, bf16 2, int8 1, int4 0.5 + scales, dcx its packed bytes) "
             f"against a measured read bandwidth of {read_gbs:.1f} GB/s. Every weight rotated "
             f"through {ROTATE_BYTES >> 20} MB of copies, past the {common.l3_bytes() >> 20} MB L3. "
             + paths +
             " Ratios: the anchor's time over dcx's fastest mode. Median of interleaved rounds, "
             "wall clock. Command: `python benchmarks/bench_spqmm.py --anchors`."]
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
    parser.add_argument("--group-size", type=int, default=0,
                        help="also time the layer with group scales of this many columns "
                             "(columns: its ms, its time over dcx's, its bytes per weight with "
                             "the scales as float16, as in the file)")
    parser.add_argument("--busy", type=int, nargs="?", const=1, default=0, metavar="CORES",
                        choices=range(1, (os.cpu_count() or 1) + 1),
                        help="with --anchors: each method quiet and with CORES cores (default 1) "
                             "loaded by spinning processes (spqmm-cpu-busy.md, "
                             "spqmm-cpu-busy-CORES.md past one)")
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
                                     args.crossover, args.group_size)
        header = ["layer", "N x K", "density", "bits", "mode", "batch", "threads", "dense fp32 ms"]
        if device == "cuda":
            header.append(f"dense {args.dtype} ms")
        header += ["CSR ms", "dcx ms", "dcx bytes/weight", "dcx GB/s", "of copy bw", "vs dense fp32"]
        if device == "cuda":
            header.append(f"vs dense {args.dtype}")
        header.append("vs CSR")
        if args.group_size:
            header += [f"dcx g{args.group_size} ms", "g / dcx", "g bytes/weight"]
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
