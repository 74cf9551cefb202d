"""Shared benchmark plumbing: timing (CPU wall clock; on CUDA, CUDA-graph replays timed with
events), the stamp on every table, device copy bandwidth, and markdown output to
benchmarks/results/."""

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        # Tables and figures being rewritten by this very run are not the code that made them.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/results"],
                               capture_output=True, text=True, cwd=Path(__file__).parent).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        # A copy of the tree without git (as on a GPU machine): the caller may name the commit.
        return os.environ.get("DCX_COMMIT", "unknown")


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    # The model name alone ("AMD EPYC") does not tell one generation from the next, whose vector
    # units differ (Zen 4 runs 512-bit instructions in two halves, Zen 5 in one): name the family
    # and model and the instruction sets the kernels choose by.
    flags = set(fields.get("flags", "").split())
    isa = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"),
                                   ("avx512_bf16", "BF16"), ("amx_tile", "AMX"))
           if flag in flags] or (["AVX2"] if "avx2" in flags else [])
    if "cpu family" in fields:
        cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')}"
        cpu += f"; {', '.join(isa)})" if isa else ")"
    return f"{cpu}, {torch.get_num_threads()} threads"


# CUDA timing: each callable is captured as a CUDA graph of GRAPH_CALLS consecutive calls (so a
# rotation of weight copies is captured as it runs) and the graph's replays are timed with
# events, per call: the kernels' time without the per-call host overhead of launching them
# (which at batch 1 is about as long as the kernels). Callables that cannot be captured (they
# read results back) are timed eagerly, and the table's stamp names them.
GRAPH_CALLS = 10
EAGER = set()


def l3_bytes(default=32 << 20):
    """The CPU's last-level cache in bytes as Linux reports it (default where it does not)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        if text.rstrip("KMG").isdigit():
            sizes.append((level, int(text.rstrip("KMG")) * unit))
    return max(sizes)[1] if sizes else default


def rotation_bytes(at_least, caches=2):
    """Bytes of weight copies to cycle through so that none is read from the CPU's cache:
    `caches` times its last-level cache, and at least `at_least`."""
    return max(at_least, int(caches * l3_bytes()))


def stamp(device):
    text = (f"device: {device_name(device)}; torch {torch.__version__}; commit {commit()}; "
            f"{time.strftime('%Y-%m-%d')}")
    if device == "cuda":
        text += (f"; GPU times: CUDA-graph replays of {GRAPH_CALLS} calls, per call"
                 + (f" (eager, not capturable: {', '.join(sorted(EAGER))})" if EAGER else ""))
    return text


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, clock=time.perf_counter):
    """Seconds of one fn() call: CUDA events on the GPU, else `clock` around the call."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = clock()
    fn()
    return clock() - t0


def bench(fn, device, warmup=3, repeat=20, min_time=0.2):
    """Median seconds of fn() over `repeat` runs (more while under min_time), after warm-up."""
    return bench_side_by_side({"fn": fn}, device, warmup, repeat, min_time)["fn"]


def as_graph(fn, name):
    """fn as a callable that replays a CUDA graph of GRAPH_CALLS fn() calls, and the number of
    calls one replay makes; (fn, 1) when fn cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch asks
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
    except Exception:  # a host read-back or another uncapturable call: time it eagerly
        torch.cuda.synchronize()
        EAGER.add(name)
        return fn, 1
    return graph.replay, GRAPH_CALLS


def bench_side_by_side(fns, device, warmup=3, repeat=20, min_time=0.2, clock=time.perf_counter,
                       block=5, summary=statistics.median):
    """Median seconds per call (or `summary` of the calls' seconds) of each callable in `fns`
    (name -> fn), timed in interleaved rounds: each round runs every fn once untimed, then
    `block` timed calls. A drift of the machine (memory bandwidth shared with other tenants,
    clocks) then moves them alike, so their ratios stay fair, while each timed call still finds
    its own code and threads warm. On CUDA each fn is a graph replay of GRAPH_CALLS calls (see
    as_graph), its time divided by them."""
    calls = dict.fromkeys(fns, 1)
    if device == "cuda":
        graphs = {name: as_graph(fn, name) for name, fn in fns.items()}
        fns = {name: g for name, (g, _) in graphs.items()}
        calls = {name: c for name, (_, c) in graphs.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    timed = 0  # calls of each fn so far
    while timed < repeat or (time.perf_counter() - start < min_time * len(fns) and timed < 1000):
        for name, fn in fns.items():
            fn()
            sync(device)
            times[name] += [time_call(fn, device, clock) for _ in range(block)]
        timed += block
    return {name: summary([s / calls[name] for s in t]) for name, t in times.items()}


def copy_bandwidth(device, nbytes=1 << 28):
    """Measured device-to-device (or RAM-to-RAM) copy bandwidth in GB/s, read + write bytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src), device, repeat=10)
    return 2 * nbytes / seconds / 1e9


def write_table(name, title, header, rows, notes=()):
    """Write benchmarks/results/<name>.md and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""] + [f"{n}" for n in notes] + ([""] if notes else [])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    path = RESULTS / f"{name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(text)
    return path


def sizes_from_env(default):
    """Sizes to run, overridable as DCX_BENCH_SIZES=1000000,10000000."""
    env = os.environ.get("DCX_BENCH_SIZES")
    return [int(s) for s in env.split(",")] if env else default


def devices_to_run():
    """'cpu', and 'cuda' when a GPU is present; DCX_BENCH_DEVICES=cuda (comma-separated) keeps
    only those listed, so a GPU run need not repeat the CPU tables."""
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wanted = os.environ.get("DCX_BENCH_DEVICES")
    return [d for d in present if d in wanted.split(",")] if wanted else present
