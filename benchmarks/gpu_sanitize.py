"""Every CUDA kernel of dcx on small random inputs, each result checked against the CPU kernel or
dcx.reference on the same inputs. benchmarks/gpu_check.sh runs it plainly and under
compute-sanitizer (memcheck, racecheck, synccheck), so it launches few, small kernels. The
Huffman ops are CPU only (dcx._native.CPU_ONLY) and are left out.

    python benchmarks/gpu_sanitize.py            # CUDA; without a GPU, the CPU kernels instead
    python benchmarks/gpu_sanitize.py --quick    # fewer dtypes and configurations

Prints one line per case: the max relative error (max |out - expected| / max |expected|) and the
largest ratio of an element's error to its bound (the bounds of tests/test_ops_*.py). Exits 0
when every case agrees, 3 on a mismatch or an error in a case, 2 when the kernels are not built.
"""

import argparse
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dcx from this source tree
import dcx  # noqa: E402
from dcx import _native, reference  # noqa: E402

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
RESULTS = []  # (op, case, max relative error, error / bound, ok)


def u(dtype):
    """Unit roundoff: the relative error of one rounding in dtype."""
    return torch.finfo(dtype).eps / 2


def record(op, case, got, expected, bound):
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64).cpu()
    if got.shape != expected.shape:
        RESULTS.append((op, case, float("nan"), float("nan"), False))
        print(f"{op:18s} {case:48s} shape {tuple(got.shape)} != {tuple(expected.shape)}  FAIL",
              flush=True)
        return
    err = (got - expected).abs()
    if err.numel():
        rel = float(err.max() / expected.abs().max().clamp_min(1e-300))
        ratio = float((err / (bound * 1.01 + 1e-30)).max())
    else:
        rel = ratio = 0.0
    ok = bool((err <= bound * 1.01 + 1e-30).all())  # NaN fails
    RESULTS.append((op, case, rel, ratio, ok))
    print(f"{op:18s} {case:48s} rel {rel:9.2e}  err/bound {ratio:7.3f}  {'ok' if ok else 'FAIL'}",
          flush=True)


def failed(op, case):
    RESULTS.append((op, case, float("nan"), float("nan"), False))
    print(f"{op:18s} {case:48s} ERROR", flush=True)
    traceback.print_exc()
    sys.stdout.flush()


def masked_sgd(dev, quick):
    """Vector kernel plus scalar tail (n = 4099, aligned) and scalar only (a misaligned view);
    every update kind (plain, momentum, first step, Nesterov, dampening + maximize)."""
    configs = [dict(momentum=0.0), dict(momentum=0.9, init_buffer=True),
               dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
               dict(momentum=0.5, dampening=0.3, weight_decay=5e-4, maximize=True)]
    for dtype in FLOATS[:2] if quick else FLOATS:
        for n, offset in ((4099, 0), (97, 1)):
            for i, cfg in enumerate(configs if not quick or n == 4099 else configs[2:3]):
                case = f"{str(dtype)[6:]} n={n}{' misaligned' if offset else ''} cfg{i}"
                try:
                    base = [torch.randn(n + offset).to(dtype) for _ in range(3)]
                    mask_base = torch.rand(n + offset) < 0.6
                    param, grad, buf = (t[offset:] for t in base)
                    mask = mask_base[offset:]
                    momentum = cfg.get("momentum", 0.0)
                    kw = {k: v for k, v in cfg.items() if k != "momentum"}
                    ref_param, ref_buf = param.clone(), buf.clone()
                    reference.masked_sgd_step_(ref_param, grad, mask, ref_buf if momentum else None,
                                               0.1, momentum, **kw)
                    # Views into larger device buffers, so misalignment carries over.
                    dbase = [t.to(dev) for t in base]
                    p, g, b = (t[offset:] for t in dbase)
                    m = mask_base.to(dev)[offset:]
                    dcx.ops.masked_sgd_step_(p, g, m, b if momentum else None, 0.1, momentum, **kw)
                    # Both sides round once to dtype from float32 (tests/test_ops_masked_sgd.py).
                    tol = 2 * u(dtype) + 8 * u(torch.float32)
                    op = "masked_sgd_step_"
                    record(op, case, p, ref_param, tol * ref_param.double().abs())
                    if momentum:
                        record(op, case + " buf", b, ref_buf, tol * ref_buf.double().abs())
                    pruned = ~mask.to(dev)
                    zero = bool((p[pruned] == 0).all())
                    zero = zero and (not momentum or bool((b[pruned] == 0).all()))
                    if not zero:
                        RESULTS.append((op, case + " pruned", 1.0, float("inf"), False))
                        print(f"{op:18s} {case} pruned values not zero  FAIL", flush=True)
                except Exception:  # noqa: BLE001 (report and go on with the next case)
                    failed("masked_sgd_step_", case)


def centroid_grad(dev, quick):
    """The shared-memory kernel (k <= 256) and the global one (k > 256), int32 and int64 labels,
    with and without a mask."""
    dtypes = FLOATS[:2] if quick else FLOATS + [torch.float64]
    for dtype in dtypes:
        for k, label_dtype, masked in ((16, torch.int64, True), (256, torch.int32, False),
                                       (3000, torch.int64, True)):
            case = f"{str(dtype)[6:]} k={k} {str(label_dtype)[6:]} {'' if masked else 'no '}mask"
            try:
                n = 5003
                grad = torch.randn(n).to(dtype)
                labels = torch.randint(0, k, (n,), dtype=label_dtype)
                mask = torch.rand(n) < 0.7 if masked else None
                out = dcx.ops.centroid_grad(grad.to(dev), labels.to(dev), k,
                                            None if mask is None else mask.to(dev))
                expected = reference.centroid_grad(grad.double(), labels, k, mask)
                abs_sum = reference.centroid_grad(grad.double().abs(), labels, k, mask)
                keep = torch.ones(n, dtype=torch.bool) if mask is None else mask
                counts = torch.bincount(labels[keep].long(), minlength=k).double()
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                bound = counts * u(acc) * abs_sum + u(dtype) * expected.abs()
                record("centroid_grad", case, out, expected, bound)
            except Exception:  # noqa: BLE001
                failed("centroid_grad", case)


def kmeans1d(dev, quick):
    """Lloyd from every init and the optimal dynamic program. On CUDA against the CPU kernel,
    bit for bit (the same decisions from prefix sums added in the same fixed order); on the CPU
    against dcx.reference (its deterministic inits)."""
    inits = ["linear", "density"] if dev == "cpu" else (
        ["linear", "random"] if quick else ["linear", "density", "random", "kmeans++"])
    dtypes = [torch.float32] if quick else [torch.float32, torch.float64]
    g = torch.Generator().manual_seed(1)
    for dtype in dtypes:
        z = torch.randn(1500, generator=g, dtype=torch.float64)
        chi2 = torch.randn(1500, generator=g, dtype=torch.float64) ** 2 + 1e-3
        values = (z / chi2.sqrt()).to(dtype)  # heavy tails: empty clusters get re-seeded
        cases = [(init, "lloyd", 8) for init in inits] + [("linear", "optimal", 8)]
        cases.append(("linear", "lloyd", 2000))  # fewer distinct values than clusters
        for init, method, k in cases:
            case = f"{str(dtype)[6:]} {init} {method} k={k}"
            try:
                if dev == "cpu":  # as tests/test_ops_kmeans1d.py: to the fixed point
                    c, labels = dcx.ops.kmeans1d(values, k, init=init, method=method, tol=0.0)
                    rc, rl = reference.kmeans1d(values, k, init=init, method=method, tol=0.0)
                else:
                    kw = dict(init=init, method=method, seed=3)
                    c, labels = dcx.ops.kmeans1d(values.to(dev), k, **kw)
                    rc, rl = dcx.ops.kmeans1d(values, k, **kw)
                record("kmeans1d", case + " labels", labels, rl, torch.zeros(rl.shape))
                if dev == "cpu":  # the reference sums in its own order: within a rounding
                    eps = torch.finfo(dtype).eps
                    bound = 4 * eps * rc.double().abs() + eps * values.double().abs().max()
                else:  # CPU and CUDA: the same sums, so the same centroids
                    bound = torch.zeros(rc.shape)
                record("kmeans1d", case + " centroids", c, rc, bound)
            except Exception:  # noqa: BLE001
                failed("kmeans1d", case)


def spqmm(dev, quick):
    """Sparse mode with 5-bit ids (codebook in registers) and 8-bit ids (shared table), dense
    mode with K % 16 == 0 (vector loads) and odd K; batches 1, 3, 8 (one pass of 1, 4 and 8
    columns; in float32 at K = 4097 a batch of 8 no longer fits x in shared memory) and 20 (three
    passes); crossover 0 (decode + BLAS at any batch), the default (dense mode from batch 8 and
    sparse mode at 64 decode + BLAS) and one too large to reach (the kernel at batch 20)."""
    if dev == "cuda":
        # cuBLAS would otherwise reduce split-K partial sums in fp16 / bf16.
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    layers = [("sparse 5b", 97, 4097, 0.1, 5, False), ("sparse 8b", 97, 4097, 0.1, 8, False),
              ("dense 4b", 97, 4096, 1.0, 4, True), ("dense 6b odd", 97, 4097, 0.7, 6, True)]
    dtypes = FLOATS[:2] if quick else FLOATS
    g = torch.Generator().manual_seed(2)
    for name, n, k, density, bits, dense in layers:
        mask = torch.rand(n, k, generator=g) < density
        labels = torch.randint(0, 1 << bits, (n, k), generator=g)
        codebook = torch.randn(1 << bits, generator=g)
        packed = dcx.pack(mask, labels, codebook, bits, dense=dense)
        dpacked = packed.to(dev)
        for dtype in dtypes:
            w = codebook.to(dtype).double()[labels] * mask  # the weight, exact in dtype
            bias = torch.randn(n, generator=g).to(dtype)
            runs = [(1, -1), (3, -1), (8, -1), (20, 1 << 30), (3, 0)]
            if not quick:
                runs += [(64, -1)]
            for batch, crossover in runs:
                case = f"{name} {str(dtype)[6:]} batch={batch} crossover={crossover}"
                try:
                    x = torch.randn(batch, k, generator=g).to(dtype)
                    b = None if batch == 8 else bias  # and once without a bias
                    bd = None if b is None else b.to(dev)
                    b64 = torch.zeros(n, dtype=torch.float64) if b is None else b.double()
                    y = dpacked.spqmm(x.to(dev), bd, crossover=crossover)
                    expected = F.linear(x.double(), w, b64)
                    magnitude = F.linear(x.double().abs(), w.abs(), b64.abs())
                    # K float32 additions, then one rounding to dtype (tests/test_ops_spqmm.py);
                    # twice that, as past the crossover cuBLAS adds (tensor cores may truncate).
                    bound = 2 * ((mask.sum(1).double() + 2) * u(torch.float32) * magnitude
                                 + u(dtype) * expected.abs())
                    record("spqmm", case, y, expected, bound)
                    if dev == "cuda" and batch == 1 and dtype == torch.float32:
                        # and the CPU kernel on the same inputs
                        y_cpu = packed.spqmm(x, b, crossover=crossover)
                        record("spqmm", case + " vs cpu", y, y_cpu, 2 * bound)
                except Exception:  # noqa: BLE001
                    failed("spqmm", case)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer dtypes and configurations")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--ops", default="masked_sgd_step_,centroid_grad,kmeans1d,spqmm",
                        help="comma-separated subset of the ops")
    args = parser.parse_args()
    if not dcx.available():
        print(f"gpu_sanitize: the dcx kernels are not built ({_native.LOAD_ERROR})")
        return 2
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA GPU on this machine")
        return 2
    if dev == "cuda":
        missing = [op for op in args.ops.split(",") if "CUDA" not in dcx.kernels().get(op, [])]
        if missing:
            print(f"gpu_sanitize: no CUDA kernel for {missing}: build with DCX_USE_CUDA=1")
            return 2
        print(f"gpu_sanitize: CUDA on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        print("gpu_sanitize: no CUDA GPU on this machine; checking the CPU kernels against "
              "dcx.reference instead (a smoke test of this script)")
        args.quick = True
    torch.manual_seed(0)
    checks = {"masked_sgd_step_": masked_sgd, "centroid_grad": centroid_grad, "kmeans1d": kmeans1d,
              "spqmm": spqmm}
    for op in args.ops.split(","):
        checks[op](dev, args.quick)
    if dev == "cuda":
        torch.cuda.synchronize()
    bad = [r for r in RESULTS if not r[4]]
    print(f"\ngpu_sanitize ({dev}): {len(RESULTS)} checks, {len(bad)} failed")
    for op in dict.fromkeys(r[0] for r in RESULTS):
        rows = [r for r in RESULTS if r[0] == op]
        worst = max(rows, key=lambda r: (not r[4], r[3] if r[3] == r[3] else float("inf")))
        print(f"  {op:18s} {len(rows):3d} checks, worst err/bound {worst[3]:.3f} "
              f"(max rel {max(r[2] for r in rows):.2e}) at {worst[1]}")
    for r in bad[:20]:
        print(f"  FAILED {r[0]} {r[1]}")
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
