"""kmeans1d against what the public Deep Compression implementations use:
sklearn.cluster.KMeans(n_clusters=k, init=<linear centroids>, n_init=1) on the weights as an
n x 1 matrix (CPU), and on GPU a plain-torch Lloyd loop (distances to every centroid, argmin,
index_add_), chunked so the n x k matrix never exists whole.

Every contender starts from the same linear initial centroids (evenly spaced from min to max, the
paper's choice) and stops by sklearn's rule (squared centroid shift <= 1e-4 x variance, or
max_iter = 300, or no label changed). Inertia (sum of squared distances to the assigned centroid)
is computed the same way for all, in float64. Data: Laplace-distributed weights (scale 0.02),
the heavy-ish tails of trained layers.

    python benchmarks/bench_kmeans.py   ->  benchmarks/results/kmeans-<device>.md
    DCX_BENCH_SIZES=1000000 DCX_BENCH_K=16,32 DCX_BENCH_OPTIMAL_MAX=1000000 to choose
    (DCX_BENCH_OPTIMAL_MAX_CUDA on the GPU; DCX_BENCH_DEVICES=cuda skips the CPU table)
"""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import dcx  # noqa: E402


def weights(n, device):
    g = torch.Generator().manual_seed(n)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    x = -0.02 * torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 0.02)
    return x.float().to(device)


def inertia(x, centroids, labels):
    total = 0.0
    for lo in range(0, x.numel(), 1 << 24):  # float64 in chunks
        xs = x[lo:lo + (1 << 24)].double()
        total += float(((xs - centroids.double()[labels[lo:lo + (1 << 24)].long()]) ** 2).sum())
    return total


def linear_init(x, k):
    return torch.linspace(0, 1, k, dtype=torch.float64, device=x.device) * (x.max() - x.min()).double() + x.min()


def torch_kmeans(x, k, max_iter=300, tol=1e-4, chunk=1 << 22):
    """Plain-torch Lloyd: |x - c| for every centroid (in chunks), argmin, index_add_ means."""
    c = linear_init(x, k).float()
    tol_abs = tol * x.double().var(unbiased=False).item()
    labels = torch.empty(x.numel(), dtype=torch.long, device=x.device)
    previous = None
    for _ in range(max_iter):
        for lo in range(0, x.numel(), chunk):
            xs = x[lo:lo + chunk]
            labels[lo:lo + chunk] = torch.cdist(xs[:, None], c[:, None]).argmin(dim=1)
        if previous is not None and torch.equal(labels, previous):
            break
        previous = labels.clone()
        sums = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, labels, x.double())
        counts = torch.bincount(labels, minlength=k)
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c.double()).float()
        moved = float(((new.double() - c.double()) ** 2).sum())
        c = new
        if moved <= tol_abs:
            break
    for lo in range(0, x.numel(), chunk):
        labels[lo:lo + chunk] = torch.cdist(x[lo:lo + chunk][:, None], c[:, None]).argmin(dim=1)
    return c, labels


def timed(fn, device, repeat):
    """(median seconds over `repeat` runs, last result)."""
    times, out = [], None
    for _ in range(repeat):
        common.sync(device)
        t0 = time.perf_counter()
        out = fn()
        common.sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def run_cpu(sizes, ks, optimal_max):
    from sklearn.cluster import KMeans

    rows = []
    for n in sizes:
        x = weights(n, "cpu")
        for k in ks:
            t_lloyd, (c, l) = timed(lambda: dcx.ops.kmeans1d(x, k), "cpu", 3)
            i_lloyd = inertia(x, c, l)
            t_fixed, (c, l) = timed(lambda: dcx.ops.kmeans1d(x, k, tol=0.0), "cpu", 3)
            i_fixed = inertia(x, c, l)
            if n <= optimal_max:
                t_opt, (c, l) = timed(lambda: dcx.ops.kmeans1d(x, k, method="optimal"), "cpu", 1)
                i_opt = inertia(x, c, l)
            else:
                t_opt = i_opt = None
            init = linear_init(x, k).numpy()[:, None]
            km = KMeans(k, init=init, n_init=1, max_iter=300, tol=1e-4, algorithm="lloyd")
            t_sk, fitted = timed(lambda: km.fit(x.numpy()[:, None]), "cpu", 1)  # noqa: B023
            i_sk = float(fitted.inertia_)
            rows.append([
                f"{n:,}", k, f"{t_sk:.2f}", f"{fitted.n_iter_}", f"{t_lloyd * 1e3:.1f}",
                f"{t_sk / t_lloyd:.0f}x", f"{i_lloyd / i_sk:.6f}", f"{t_fixed * 1e3:.1f}",
                f"{t_sk / t_fixed:.0f}x", f"{i_fixed / i_sk:.6f}",
                "-" if t_opt is None else f"{t_opt:.2f}",
                "-" if i_opt is None else f"{i_opt / i_sk:.6f}",
                f"{i_sk:.6g}",
            ])
            print(rows[-1], flush=True)
    header = ["n", "k", "sklearn s", "sklearn iters", "dcx lloyd ms", "speedup",
              "inertia / sklearn", "dcx lloyd tol=0 ms", "speedup", "inertia / sklearn",
              "dcx optimal s", "optimal inertia / sklearn",
              "sklearn inertia"]
    notes = [common.stamp("cpu"), "",
             "sklearn.cluster.KMeans(k, init=linear centroids, n_init=1, tol=1e-4, max_iter=300, "
             "algorithm='lloyd') on the n x 1 float32 matrix, timed once; dcx.ops.kmeans1d "
             "(init='linear', the same tol rule; and tol=0: to the fixed point, as each iteration "
             "costs only O(k log n)) median of 3 runs; dcx optimal (exact dynamic "
             f"program) timed once, only for n <= {optimal_max:,} (O(k n log n) time: larger "
             "layers take minutes on 2 threads). Inertia ratios < 1 mean dcx is better.", "",
             "Lloyd stops in a local optimum: from the same start, sklearn (float32 arithmetic "
             "on float32 input, its own relocation of empty clusters) and dcx (float64 means, "
             "one relocation at a time) can reach different ones, a fraction of a percent "
             "apart either way at k = 16 and 32; with Laplace tails the linear start leaves "
             "many clusters empty at k = 256, where relocation decides most of the result. "
             "The optimal column is the global optimum."]
    common.write_table("kmeans-cpu", "kmeans1d vs sklearn KMeans (CPU)", header, rows, notes)


def run_cuda(sizes, ks, optimal_max):
    rows = []
    for n in sizes:
        x = weights(n, "cuda")
        for k in ks:
            t_lloyd, (c, l) = timed(lambda: dcx.ops.kmeans1d(x, k), "cuda", 5)
            i_lloyd = inertia(x, c, l)
            t_torch, (c, l) = timed(lambda: torch_kmeans(x, k), "cuda", 1)
            i_torch = inertia(x, c, l)
            if n <= optimal_max:
                t_opt, (c, l) = timed(lambda: dcx.ops.kmeans1d(x, k, method="optimal"), "cuda", 1)
                opt = f"{t_opt:.3f}", f"{inertia(x, c, l) / i_torch:.6f}"
            else:
                opt = "-", "-"
            rows.append([f"{n:,}", k, f"{t_torch * 1e3:.1f}", f"{t_lloyd * 1e3:.2f}",
                         f"{t_torch / t_lloyd:.0f}x", f"{i_lloyd / i_torch:.6f}", *opt])
            print(rows[-1], flush=True)
    header = ["n", "k", "torch Lloyd ms", "dcx lloyd ms", "speedup", "lloyd inertia / torch",
              "dcx optimal s", "optimal inertia / torch"]
    notes = [common.stamp("cuda"), "",
             "torch Lloyd: cdist + argmin in chunks of 4M values, index_add_ means, same init and "
             "stopping rule, timed once; dcx.ops.kmeans1d median of 5 runs; optimal timed once, "
             f"n <= {optimal_max:,}."]
    common.write_table("kmeans-cuda", "kmeans1d vs plain-torch k-means (CUDA)", header, rows, notes)


def main():
    ks = [int(k) for k in os.environ.get("DCX_BENCH_K", "16,32,256").split(",")]
    optimal_max = int(os.environ.get("DCX_BENCH_OPTIMAL_MAX", 1_000_000))
    devices = common.devices_to_run()
    if "cpu" in devices:
        run_cpu(common.sizes_from_env([1_000_000, 10_000_000]), ks, optimal_max)
    if "cuda" in devices:
        run_cuda(common.sizes_from_env([10_000_000, 100_000_000]), ks,
                 int(os.environ.get("DCX_BENCH_OPTIMAL_MAX_CUDA", 10_000_000)))


if __name__ == "__main__":
    main()
