"""The compression table (dcx.report) of a SYNTHETIC LeNet-300-100: the paper's layer shapes and
per-layer densities (fc1 8%, fc2 9%, fc3 26%, Han et al. Table 2), weights drawn like trained ones
(Laplace, std 1/sqrt(fan_in)), magnitude-pruned, then 5-bit weight sharing (linear-init 1-D
k-means on the kept weights) and 4-bit relative indices. Not a trained model: its pruned positions
are uniformly random, where a trained LeNet's are not (whole input pixels at the image border die),
so its index bits are a pessimistic stand-in; rerun on the trained, pruned, quantized model.

    python benchmarks/report_lenet300_synthetic.py
        ->  benchmarks/results/lenet300-synthetic-report.md
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import dcx  # noqa: E402
from dcx.format import CompressedTensor  # noqa: E402
from dcx.report import report  # noqa: E402

DENSITY = {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}
BITS, INDEX_BITS = 5, 4


class LeNet300(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 300)
        self.fc2 = torch.nn.Linear(300, 100)
        self.fc3 = torch.nn.Linear(100, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def kmeans_1d(values, k, iters=20):
    """Linear initialisation over [min, max] (the paper's choice), Lloyd steps; with sorted
    centroids the assignment is a bucketize on the midpoints."""
    centroids = torch.linspace(float(values.min()), float(values.max()), k, dtype=torch.float64)
    v = values.double()
    for _ in range(iters):
        labels = torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, v)
        counts = torch.bincount(labels, minlength=k)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        centroids = torch.sort(centroids)[0]
    labels = torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2)
    return centroids.float(), labels


def synthetic_compressed(model):
    """Prune and share each layer of `model` (as the stages' state, dcx.state); returns the
    records the file should hold."""
    records = {}
    for name, density in DENSITY.items():
        layer = getattr(model, name)
        fan_in = layer.weight.shape[1]
        w = torch.distributions.Laplace(0.0, (0.5 / fan_in) ** 0.5).sample(layer.weight.shape)
        threshold = w.abs().flatten().kthvalue(int(round((1 - density) * w.numel())))[0]
        mask = w.abs() > threshold
        codebook, kept_labels = kmeans_1d(w[mask], 1 << BITS)
        labels = torch.zeros(w.shape, dtype=torch.long)
        labels[mask] = kept_labels
        records[f"{name}.weight"] = CompressedTensor(mask, labels, codebook, BITS,
                                                     index_bits=INDEX_BITS)
        with torch.no_grad():
            layer.weight.copy_(records[f"{name}.weight"].to_dense())
            layer.bias.normal_(0, 0.05)
        dcx.state.set_mask_(layer, "weight", mask)
        dcx.state.set_shared_(layer, "weight", codebook, labels, BITS, live=False)
    dcx.encode_(model, dcx.EncodeConfig(linear_index_bits=INDEX_BITS))
    return records


def main():
    torch.manual_seed(0)
    model = LeNet300()
    records = synthetic_compressed(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lenet300-synthetic.dcx"
        dcx.save(
            model,
            path,
            config={"bits": BITS, "index_bits": INDEX_BITS, "density": DENSITY, "synthetic": True},
        )
        fresh = dcx.load(path, LeNet300(), packed=False)
        assert all(torch.equal(fresh.get_parameter(n), ct.to_dense()) for n, ct in records.items())
        result = report(path, model=LeNet300())  # fp32 model: torch.save baseline
    result.path = "lenet300-synthetic.dcx"
    text = "\n".join(
        [
            "# Compression table: LeNet-300-100, SYNTHETIC weights",
            "",
            common.stamp("cpu"),
            "",
            "Synthetic: paper densities (8%, 9%, 26%), Laplace weights, magnitude pruning, 5-bit "
            "linear-init k-means codebooks, 4-bit relative indices. "
            "Random pruned positions make the "
            "index bits pessimistic; rerun on the trained model. "
            "Command: `python benchmarks/report_lenet300_synthetic.py`.",
            "",
            result.to_markdown(),
        ]
    )
    out = common.RESULTS / "lenet300-synthetic-report.md"
    out.write_text(text)
    print(result)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
