import itertools

import numpy as np
import pytest
import torch

import dcx
from dcx import reference
from tests.testing import devices, noncontiguous, requires_kernels

pytestmark = requires_kernels

INITS = ["linear", "density", "random", "kmeans++"]


def inertia(values, centroids, labels):
    """Sum of squared distances to the assigned centroid, in float64."""
    v = values.reshape(-1).double()
    return float(((v - centroids.double()[labels.reshape(-1).long()]) ** 2).sum())


def data(kind, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n, generator=g) * 2 - 1
    if kind == "gaussian":
        return torch.randn(n, generator=g)
    if kind == "bimodal":
        side = torch.rand(n, generator=g) < 0.3
        return torch.where(side, torch.randn(n, generator=g) * 0.3 + 4, torch.randn(n, generator=g))
    if kind == "heavy":  # Student t with 2 degrees of freedom: rare huge weights
        z = torch.randn(n, generator=g)
        chi2 = torch.randn(n, generator=g) ** 2 + torch.randn(n, generator=g) ** 2
        return z / (chi2 / 2).sqrt()
    raise ValueError(kind)


def check_nearest(values, centroids, labels):
    """Every value is labelled with a nearest centroid (a tie may go either way by rounding)."""
    v = values.reshape(-1).double().cpu()
    c = centroids.double().cpu()
    dist = (v[:, None] - c[None, :]).abs()
    chosen = dist.gather(1, labels.reshape(-1).long().cpu()[:, None])[:, 0]
    assert (chosen <= dist.min(dim=1).values * (1 + 1e-12) + 1e-300).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 2, 97, 4097])
@pytest.mark.parametrize("k", [1, 3, 16])
@pytest.mark.parametrize("init", INITS)
def test_shapes_and_nearest(device, dtype, n, k, init):
    values = torch.randn(n, dtype=dtype, device=device)
    centroids, labels = dcx.ops.kmeans1d(values, k, init=init)
    assert centroids.shape == (k,) and centroids.dtype == dtype and centroids.device == values.device
    assert labels.shape == values.shape and labels.dtype == torch.int32
    assert (centroids[1:] >= centroids[:-1]).all()
    if n:
        assert labels.min() >= 0 and labels.max() < k
        check_nearest(values, centroids, labels)
    else:
        assert (centroids == 0).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method", ["lloyd", "optimal"])
@pytest.mark.parametrize("init", ["linear", "density"])
@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
def test_matches_reference(device, method, init, kind):
    values = data(kind, 1500).to(device)
    c, l = dcx.ops.kmeans1d(values, 8, init=init, method=method, tol=0.0)
    rc, rl = reference.kmeans1d(values.cpu(), 8, init=init, method=method, tol=0.0)
    # The same steps in float64 from the same start: equal up to a few roundings of the means.
    torch.testing.assert_close(c.cpu(), rc, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7)
    assert torch.equal(l.cpu(), rl)


def test_two_dimensional_and_noncontiguous():
    values = torch.randn(64, 33)
    c, l = dcx.ops.kmeans1d(noncontiguous(values), 4)
    c2, l2 = dcx.ops.kmeans1d(values.clone(), 4)
    assert torch.equal(c, c2) and torch.equal(l, l2) and l.shape == (64, 33)


@pytest.mark.parametrize("device", devices())
def test_edge_cases(device):
    def run(v, k, **kw):
        return dcx.ops.kmeans1d(torch.tensor(v, dtype=torch.float32, device=device), k, **kw)

    c, l = run([2.5], 3)  # n = 1
    assert c.tolist() == [2.5, 2.5, 2.5] and l.tolist() == [0]
    c, l = run([-1.0] * 10, 4, init="random")  # all equal
    assert c.tolist() == [-1.0] * 4 and l.tolist() == [0] * 10
    c, l = run([5, 0, 1, 1, 0, 1], 4)  # fewer distinct values than clusters
    assert c.tolist() == [0, 1, 5, 5] and l.tolist() == [2, 0, 1, 1, 0, 1]
    c, l = run([1, 2, 3, 10], 1)  # one cluster: the mean
    assert c.tolist() == [4.0] and l.tolist() == [0] * 4
    c, l = run([], 2)
    assert c.tolist() == [0.0, 0.0] and l.numel() == 0
    # An outlier: linear init leaves centroids between the bulk and it; they are re-seeded.
    v = torch.cat([torch.linspace(0, 1, 999), torch.tensor([1000.0])]).to(device)
    c, l = dcx.ops.kmeans1d(v, 8)
    assert torch.bincount(l.long().cpu(), minlength=8).min() > 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -float("nan")])
def test_non_finite_values_raise(device, bad):
    values = torch.randn(100, device=device)
    values[37] = bad
    with pytest.raises(RuntimeError, match="values must be finite"):
        dcx.ops.kmeans1d(values, 4)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.zeros(8, dtype=torch.int32), 4), {}, "values must be float32 or float64"),
        ((torch.zeros(8, dtype=torch.float16), 4), {}, "values must be float32 or float64"),
        ((torch.randn(8), 0), {}, r"num_clusters must be in \[1, 2\^31\)"),
        ((torch.randn(8), -2), {}, r"num_clusters must be in \[1, 2\^31\)"),
        ((torch.randn(8), 4), {"init": "kmeans"}, "init must be 'linear', 'density'"),
        ((torch.randn(8), 4), {"method": "exact"}, "method must be 'lloyd' or 'optimal'"),
        ((torch.randn(8), 4), {"max_iter": -1}, "max_iter must be >= 0"),
        ((torch.randn(8), 4), {"tol": -1.0}, "tol must be a finite number >= 0"),
        ((torch.randn(8), 4), {"tol": float("nan")}, "tol must be a finite number >= 0"),
    ],
)
def test_bad_input(device, args, kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        dcx.ops.kmeans1d(args[0].to(device), *args[1:], **kwargs)


@pytest.mark.parametrize("init", INITS)
def test_seed_determinism(init):
    values = data("heavy", 20000)
    first = dcx.ops.kmeans1d(values, 32, init=init, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = dcx.ops.kmeans1d(values, 32, init=init, seed=5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], single[0]) and torch.equal(first[1], single[1])
    if init in ("random", "kmeans++"):
        other = dcx.ops.kmeans1d(values, 32, init=init, seed=6, max_iter=0)
        assert not torch.equal(dcx.ops.kmeans1d(values, 32, init=init, seed=5, max_iter=0)[0], other[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("method", ["lloyd", "optimal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_cuda_agree(init, method, dtype):
    """Same seed, same result on both devices, bit for bit: the O(k) decisions are the same host
    code and the prefix sums are added in one fixed order on both (kmeans1d::prefix_sums), so
    labels and centroids are equal; signed zeros sort alike (-0.0 as +0.0)."""
    values = data("heavy", 50001).to(dtype)
    values[::97] = -0.0
    values[1::97] = 0.0
    c_cpu, l_cpu = dcx.ops.kmeans1d(values, 16, init=init, seed=3, method=method)
    c_gpu, l_gpu = dcx.ops.kmeans1d(values.cuda(), 16, init=init, seed=3, method=method)
    assert torch.equal(l_cpu, l_gpu.cpu())
    assert c_gpu.cpu().view(torch.uint8).tolist() == c_cpu.view(torch.uint8).tolist()


@pytest.mark.parametrize("device", devices())
def test_signed_zeros_are_one_value(device):
    """-0.0 and +0.0 are one value: one centroid, and it is +0.0 whatever the input order."""
    for values in ([-0.0, 0.0, 1.0, 2.0], [0.0, -0.0, 1.0, 2.0], [-0.0, -0.0, 1.0, 2.0]):
        c, labels = dcx.ops.kmeans1d(torch.tensor(values, device=device), 3)
        assert c.tolist() == [0.0, 1.0, 2.0] and not torch.signbit(c).any()
        assert labels.tolist() == [0, 0, 1, 2]
    # A single value, or only zeros: +0.0 too (the CPU once returned -0.0 for one value).
    for values, k in (([-0.0], 1), ([-0.0], 3), ([-0.0, -0.0], 1), ([-0.0, -0.0], 2)):
        c, labels = dcx.ops.kmeans1d(torch.tensor(values, device=device), k)
        assert c.tolist() == [0.0] * k and not torch.signbit(c).any(), (values, k, c)
        assert labels.tolist() == [0] * len(values)


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "bimodal", "heavy"])
@pytest.mark.parametrize("k", [2, 5, 16])
def test_optimal_not_worse_than_lloyd(kind, k):
    values = data(kind, 3000, seed=k)
    opt = inertia(values, *dcx.ops.kmeans1d(values, k, method="optimal"))
    for init in INITS:
        lloyd = inertia(values, *dcx.ops.kmeans1d(values, k, init=init, tol=0.0))
        assert opt <= lloyd * (1 + 1e-9)


def brute_force_inertia(x, k):
    """Minimum inertia over every split of the sorted values into k contiguous non-empty ranges."""
    x = np.sort(x.astype(np.float64))
    n, best = len(x), np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0,) + cuts + (n,)
        best = min(best, sum(((x[a:b] - x[a:b].mean()) ** 2).sum() for a, b in zip(bounds, bounds[1:], strict=False)))
    return best


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed", range(12))
def test_optimal_brute_force(device, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 11))
    x = np.round(rng.standard_normal(n) * 4) / 2  # ties on purpose
    for k in range(1, min(n, 5) + 1):
        values = torch.tensor(x, dtype=torch.float64, device=device)
        got = inertia(values.cpu(), *(t.cpu() for t in dcx.ops.kmeans1d(values, k, method="optimal")))
        assert got <= brute_force_inertia(x, k) * (1 + 1e-12) + 1e-12


@pytest.mark.parametrize("kind", ["gaussian", "bimodal", "heavy"])
@pytest.mark.parametrize("k", [4, 16, 64])
def test_against_sklearn_same_init(kind, k):
    """sklearn's Lloyd from the same initial centroids (dcx's own init, read with max_iter=0):
    dcx's inertia is no worse, to 1e-6 relative."""
    sklearn = pytest.importorskip("sklearn.cluster")
    values = data(kind, 20000, seed=k)
    init_c, _ = dcx.ops.kmeans1d(values.double(), k, max_iter=0)
    assert init_c.unique().numel() == k
    ours = inertia(values, *dcx.ops.kmeans1d(values.double(), k))
    km = sklearn.KMeans(k, init=init_c.numpy()[:, None], n_init=1, max_iter=300, tol=1e-4,
                        algorithm="lloyd").fit(values.double().numpy()[:, None])
    assert ours <= km.inertia_ * (1 + 1e-6)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    values = torch.randn(1000, device=device)
    for kwargs in ({}, {"init": "kmeans++", "seed": 3}, {"method": "optimal"}):
        torch.library.opcheck(torch.ops.dcx.kmeans1d.default, (values, 8), kwargs)


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph(device):
    values = torch.randn(1000, device=device)

    def quantize(v):
        c, l = dcx.ops.kmeans1d(v, 8)
        return c[l.long()]

    compiled = torch.compile(quantize, fullgraph=True)
    torch.testing.assert_close(compiled(values), quantize(values))


@pytest.mark.slow
def test_optimal_one_million():
    """The exact program on a 1M-weight layer (k = 16): at least as good as Lloyd."""
    values = data("heavy", 1_000_000)
    opt = inertia(values, *dcx.ops.kmeans1d(values, 16, method="optimal"))
    assert opt <= inertia(values, *dcx.ops.kmeans1d(values, 16, tol=0.0)) * (1 + 1e-9)


# ---- weighted k-means ----


def weighted_inertia(values, weights, centroids, labels):
    v, w = values.reshape(-1).double().cpu(), weights.reshape(-1).double().cpu()
    c = centroids.double().cpu()[labels.reshape(-1).long().cpu()]
    return float((w * (v - c) ** 2).sum())


def positive_weights(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) ** 4 * 10 + 1e-3  # skewed: a few values matter most


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method", ["lloyd", "optimal"])
@pytest.mark.parametrize("init", ["linear", "density"])
@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
def test_weighted_matches_reference(device, method, init, kind):
    values, weights = data(kind, 1500), positive_weights(1500)
    c, l = dcx.ops.kmeans1d(values.to(device), 8, init=init, method=method, tol=0.0,
                            weights=weights.to(device))
    rc, rl = reference.kmeans1d(values, 8, init=init, method=method, tol=0.0, weights=weights)
    torch.testing.assert_close(c.cpu(), rc, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7)
    assert torch.equal(l.cpu(), rl)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method, init", [("lloyd", "linear"), ("lloyd", "random"),
                                          ("optimal", "linear")])
def test_unit_weights_are_unweighted(device, method, init):
    """Weights of exactly 1 do the unweighted arithmetic (w d = d, the weight sums are counts):
    the same result bit for bit."""
    values = data("heavy", 5001).double().to(device)
    plain = dcx.ops.kmeans1d(values, 16, init=init, method=method, seed=2)
    ones = dcx.ops.kmeans1d(values, 16, init=init, method=method, seed=2,
                            weights=torch.ones_like(values))
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1], ones[1])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method, init", [("lloyd", "linear"), ("lloyd", "density"),
                                          ("optimal", "linear")])
def test_integer_weights_are_repetitions(device, method, init):
    values = data("bimodal", 3000, seed=4).double()
    weights = torch.randint(1, 4, (3000,), generator=torch.Generator().manual_seed(5)).double()
    c, _ = dcx.ops.kmeans1d(values.to(device), 8, init=init, method=method, tol=0.0,
                            weights=weights.to(device))
    rc, _ = dcx.ops.kmeans1d(values.repeat_interleave(weights.long()).to(device), 8, init=init,
                             method=method, tol=0.0)
    torch.testing.assert_close(c, rc, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed", range(8))
def test_weighted_optimal_brute_force(device, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 10))
    x = np.sort(np.round(rng.standard_normal(n) * 4) / 2)
    w = rng.random(n) * 5 + 0.1
    for k in range(1, min(n, 4) + 1):
        values = torch.tensor(x, dtype=torch.float64, device=device)
        weights = torch.tensor(w, dtype=torch.float64, device=device)
        got = weighted_inertia(values, weights, *dcx.ops.kmeans1d(values, k, method="optimal",
                                                                  weights=weights))
        best = np.inf
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0,) + cuts + (n,)
            total = 0.0
            for a, b in zip(bounds, bounds[1:], strict=False):
                m = (w[a:b] * x[a:b]).sum() / w[a:b].sum()
                total += (w[a:b] * (x[a:b] - m) ** 2).sum()
            best = min(best, total)
        assert got <= best * (1 + 1e-12) + 1e-12


@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
@pytest.mark.parametrize("k", [4, 16])
def test_weighted_against_sklearn_same_init(kind, k):
    """sklearn's Lloyd with sample_weight from dcx's initial centroids: no worse, to 1e-6."""
    sklearn = pytest.importorskip("sklearn.cluster")
    values, weights = data(kind, 20000, seed=k).double(), positive_weights(20000).double()
    init_c, _ = dcx.ops.kmeans1d(values, k, init="density", max_iter=0, weights=weights)
    assert init_c.unique().numel() == k
    ours = weighted_inertia(values, weights, *dcx.ops.kmeans1d(values, k, init="density",
                                                               weights=weights))
    km = sklearn.KMeans(k, init=init_c.numpy()[:, None], n_init=1, max_iter=300, tol=1e-4,
                        algorithm="lloyd").fit(values.numpy()[:, None], sample_weight=weights.numpy())
    assert ours <= km.inertia_ * (1 + 1e-6)


def test_weights_pull_centroids():
    """A heavy value draws a centroid onto itself; the plus-plus and density inits follow it."""
    values = torch.cat([torch.linspace(-1, 1, 1000), torch.tensor([0.4321])]).double()
    weights = torch.ones_like(values)
    weights[-1] = 1e6
    for init in INITS:
        c, labels = dcx.ops.kmeans1d(values, 4, init=init, weights=weights, seed=1)
        assert (c - 0.4321).abs().min() < 1e-3, (init, c)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "weights, match",
    [
        (torch.ones(8, dtype=torch.float64), "weights must have the dtype of values"),
        (torch.ones(9), r"weights must have the shape of values"),
        (torch.ones(2, 4), r"weights must have the shape of values"),
        (torch.tensor([1.0] * 7 + [0.0]), "weights must be finite and > 0"),
        (torch.tensor([1.0] * 7 + [-1.0]), "weights must be finite and > 0"),
        (torch.tensor([1.0] * 7 + [float("nan")]), "weights must be finite and > 0"),
        (torch.tensor([1.0] * 7 + [float("inf")]), "weights must be finite and > 0"),
    ],
)
def test_weights_bad_input(device, weights, match):
    with pytest.raises(RuntimeError, match=match):
        dcx.ops.kmeans1d(torch.randn(8, device=device), 4, weights=weights.to(device))


def test_weights_on_another_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    with pytest.raises(RuntimeError, match="weights must be on the device of values"):
        dcx.ops.kmeans1d(torch.randn(8), 4, weights=torch.ones(8, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("method", ["lloyd", "optimal"])
def test_weighted_cpu_cuda_agree(init, method):
    values = data("heavy", 50001)
    values[::97] = -0.0
    values[1::97] = 0.0
    weights = positive_weights(50001)
    c_cpu, l_cpu = dcx.ops.kmeans1d(values, 16, init=init, seed=3, method=method, weights=weights)
    c_gpu, l_gpu = dcx.ops.kmeans1d(values.cuda(), 16, init=init, seed=3, method=method,
                                    weights=weights.cuda())
    assert torch.equal(l_cpu, l_gpu.cpu())
    assert c_gpu.cpu().view(torch.uint8).tolist() == c_cpu.view(torch.uint8).tolist()


@pytest.mark.parametrize("device", devices())
def test_weighted_opcheck_and_compile(device):
    values, weights = torch.randn(1000, device=device), positive_weights(1000).to(device)
    for kwargs in ({"weights": weights}, {"init": "kmeans++", "weights": weights},
                   {"method": "optimal", "weights": weights}):
        torch.library.opcheck(torch.ops.dcx.kmeans1d.default, (values, 8), kwargs)

    def quantize(v, w):
        c, l = dcx.ops.kmeans1d(v, 8, weights=w)
        return c[l.long()]

    compiled = torch.compile(quantize, fullgraph=True)
    torch.testing.assert_close(compiled(values, weights), quantize(values, weights))
