"""Compression of all-MiniLM-L6-v2 with retraining by distillation from the original model, on
unlabeled text: file size against embedding fidelity, and where a retraining step's time goes.

    python benchmarks/minilm_distill.py [--steps 300] [--settings 50:5:32 0:4:32 ...]
    python benchmarks/minilm_distill.py --breakdown     # the step's time: AdamW + hooks vs MaskedAdamW
    python benchmarks/minilm_distill.py --grid --steps 200 --shared-steps 100   # the Pareto grid
    # writes benchmarks/results/minilm-distill.md (+ minilm-distill-curve.png),
    # minilm-distill-step.md, or minilm-distill-pareto.md (+ its curve and size-vs-cosine plot);
    # the table is rewritten after each setting, so a long run leaves what it finished

A setting SPARSITY:BITS:SCALE[:EMBEDDING_BITS] (scale: a group size, "row" or "none"; the
word, position and type embeddings at EMBEDDING_BITS, default 4, unpruned) runs the paper's order on a
model nobody has labels for:
what `dcx convert --distill` runs (dcx.distill.convert_distilled_):
  1. sparsity > 0: magnitude pruning of the Linear layers (the encoder's and the pooler's, which
     the mean-pooled embedding does not use), then `--steps` steps of
     distillation (dcx.distill_: hidden-state MSE + pooled-embedding cosine against the fp32
     model, MaskedAdamW, pruned weights held at zero);
  2. weight sharing with calibration (dcx.convert_, method gptq: 256 sentences of four novels;
     the pruned layers keep their masks), then `--steps` steps of distillation moving the
     codebooks, biases and LayerNorms (the labels stay);
  3. finalize, pack, save; the model rebuilt from the file alone (dcx.hf.model_from_file).
Distillation text: sentences of the
same four novels, 16 per step, at most 64 tokens; fidelity: cosine of each sentence embedding
to the fp32 model's on the 64 fixed sentences of benchmarks/minilm.py and on 256 held-out
sentences of persuasion.txt.
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import minilm  # noqa: E402

import dcx  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "text"
HELD_OUT = "persuasion.txt"
SETTINGS = ["50:4:32:3", "0:4:128:3"]
# --grid: sparsity 0-90% x 3-6 bits, embeddings at the layers' bits (unpruned), groups of 64.
GRID = [f"{sparsity}:{bits}:64:{bits}" for sparsity in (0, 50, 75, 90) for bits in (3, 4, 5, 6)]


def parse_setting(text):
    """(sparsity, bits, scale, embedding bits) of SPARSITY:BITS:SCALE[:EMBEDDING_BITS]."""
    try:
        sparsity, bits, scale, *rest = text.split(":")
        scale = None if scale == "none" else scale if scale == "row" else int(scale)
        embedding_bits = int(rest[0]) if rest else 4
        if len(rest) > 1:
            raise ValueError
        return int(sparsity) / 100, int(bits), scale, embedding_bits
    except ValueError:
        raise SystemExit("a setting is SPARSITY:BITS:SCALE[:EMBEDDING_BITS] (e.g. 50:4:32:3), "
                         f"got {text!r}")


def encoder_linears(model):
    return [f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]


def breakdown(model, batches, steps):
    """Median seconds per phase of a distillation step on the 50%-pruned model: torch's AdamW
    with dcx.mask_optimizer_'s hooks against dcx.MaskedAdamW, and torch's fused AdamW with no
    masks at all (what the step costs unmasked), interleaved, same batches."""
    rows = []
    pruned = dcx.prune_(copy.deepcopy(model), dcx.PruneConfig(sparsity=0.5,
                                                               targets=encoder_linears(model)))
    makers = {
        "torch AdamW + mask_optimizer_": lambda ps: dcx.mask_optimizer_(
            torch.optim.AdamW(ps, lr=1e-5, weight_decay=0.0)),
        "dcx.MaskedAdamW": lambda ps: dcx.MaskedAdamW(ps, lr=1e-5, weight_decay=0.0),
        "torch AdamW(fused=True), unmasked": lambda ps: torch.optim.AdamW(
            ps, lr=1e-5, weight_decay=0.0, fused=True),
    }
    runs = {name: [] for name in makers}
    students = {name: copy.deepcopy(pruned) for name in makers}
    optimizers = {name: make(students[name].parameters()) for name, make in makers.items()}
    for round_ in range(steps):
        for name in runs:
            batch = batches[round_ % len(batches)]
            runs[name] += dcx.distill_(students[name], model, [batch], steps=1,
                                       optimizer=optimizers[name], progress=False)
    for name, history in runs.items():
        history = history[1:]  # the first step allocates the optimizer state
        phases = {k: statistics.median(getattr(h, k) for h in history)
                  for k in ("teacher_s", "forward_s", "backward_s", "optimizer_s")}
        total = sum(phases.values())
        rows.append([name] + [f"{1000 * v:,.0f}" for v in phases.values()]
                    + [f"{1000 * total:,.0f}", f"{100 * phases['optimizer_s'] / total:.1f}%"])
    return rows


def main():
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--steps", type=int, default=300,
                      help="distillation steps after pruning (and after sharing, unless "
                           "--shared-steps)")
    args.add_argument("--shared-steps", type=int, help="distillation steps after sharing")
    args.add_argument("--prune-rounds", type=int, default=1,
                      help="prune gradually in this many rounds over the first half of the "
                           "pruned stage (default 1: all at once)")
    args.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (pruned weights)")
    args.add_argument("--codebook-lr", type=float, default=1e-3,
                      help="peak learning rate of each codebook, relative to its entries' spread "
                           "(standard deviation); biases and LayerNorms take --lr")
    args.add_argument("--settings", nargs="*", default=SETTINGS,
                      help="SPARSITY:BITS:SCALE[:EMBEDDING_BITS], e.g. 50:4:32:3 (scale: group "
                           "size, row or none)")
    args.add_argument("--sentences", type=int, default=4096, help="distillation sentences")
    args.add_argument("--grid", action="store_true",
                      help="the Pareto grid (sparsity 0/50/75/90%% x 3-6 bits, embeddings at "
                           "the same bits, groups of 64) instead of --settings")
    args.add_argument("--name", default="minilm-distill",
                      help="the results' file name (without .md) for --settings")
    args.add_argument("--breakdown", action="store_true",
                      help="only time a step's phases, AdamW + hooks against MaskedAdamW")
    args = args.parse_args()
    why = minilm.available() or (None if TEXT.is_dir() else f"{TEXT} is absent")
    if why:
        print(f"skipped: {why}")
        return
    torch.manual_seed(0)
    model, tokenizer = minilm.load_fp32()
    books = sorted(p for p in TEXT.glob("*.txt") if p.name != HELD_OUT)
    corpus = dcx.data.text_batches(tokenizer, dcx.data.read_sentences(books, args.sentences,
                                                                       seed=2),
                                   batch_size=16, max_length=64)
    if args.breakdown:
        rows = breakdown(model, corpus, 8)
        common.write_table(
            "minilm-distill-step", "all-MiniLM-L6-v2: where a distillation step's time goes",
            ["optimizer", "teacher forward ms", "student forward + loss ms", "backward ms",
             "optimizer step ms", "step ms", "optimizer share"], rows,
            [common.stamp("cpu"), "",
             "Encoder Linear layers pruned to 50% (magnitude); 16 sentences of at most 64 "
             "tokens per step; median of 7 steps after the first, the two optimizers "
             "interleaved on the same batches; dcx.distill_ with each optimizer (model in eval "
             "mode, so the pruning hook only relinks). The unmasked row lets pruned weights "
             "move (wrong for a pruned model): it is the floor a mask can add to. Command: "
             "`python benchmarks/minilm_distill.py --breakdown`."])
        return
    fixed = minilm.tokens(tokenizer)
    held_out = minilm.tokens(tokenizer, dcx.data.read_sentences(TEXT / HELD_OUT, 256, seed=1))
    reference = {"fixed": minilm.embed(model, fixed), "held": minilm.embed(model, held_out)}
    calibration = dcx.data.text_batches(
        tokenizer, dcx.data.read_sentences(books, 256, seed=0), batch_size=16)
    source_bytes = (minilm.model_path() / "model.safetensors").stat().st_size
    settings = GRID if args.grid else args.settings
    name = "minilm-distill-pareto" if args.grid else args.name
    rows, curves, points = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for text in settings:
            sparsity, bits, scale, embedding_bits = parse_setting(text)
            started = time.perf_counter()
            embeddings = {"re:embeddings\\..*": {"bits": embedding_bits, "sparsity": 0.0,
                                                   "scale": None}}
            config = dcx.ConvertConfig(bits=bits, sparsity=sparsity, scale=scale, method="gptq",
                                       overrides=embeddings)
            student, _, stages = dcx.distill.convert_distilled_(
                copy.deepcopy(model), config, corpus, calibration=calibration, steps=args.steps,
                shared_steps=args.shared_steps, lr=args.lr, codebook_lr=args.codebook_lr,
                prune_rounds=args.prune_rounds, objective=dcx.Distillation(model))
            shared_before = stages.history["shared"][0].metric
            pruned = stages.history.get("pruned")
            pruned_after = (f"{statistics.fmean(h.metric for h in pruned[-10:]):.4f}"
                            if pruned else "-")
            shared_steps = args.shared_steps or args.steps
            path = Path(tmp) / "minilm.dcx"
            dcx.save(student, path, config=config, extra=dcx.hf.manifest_extra(student))
            seconds = time.perf_counter() - started
            loaded = dcx.hf.model_from_file(path)
            f = minilm.fidelity(reference["fixed"], minilm.embed(loaded, fixed))
            h = minilm.fidelity(reference["held"], minilm.embed(loaded, held_out))
            size = path.stat().st_size
            curves[text] = stages.history
            rows.append([f"{sparsity:.0%}", str(bits), str(scale or "-"), str(embedding_bits),
                         f"{args.steps if pruned else 0} + {shared_steps}",
                         f"{size:,}", f"{source_bytes / size:.2f}x", pruned_after,
                         f"{shared_before:.4f}", f"{f['mean_cos']:.4f}",
                         f"{f['min_cos']:.4f}", f"{h['mean_cos']:.4f}", f"{h['min_cos']:.4f}",
                         f"{seconds / 60:.1f}"])
            points[text] = (size, f["mean_cos"], h["mean_cos"])
            write_results(name, args, settings, source_bytes, rows, curves, points)


def write_results(name, args, settings, source_bytes, rows, curves, points):
    """The table (and plots) of the settings done so far."""
    header = ["sparsity", "bits", "scale", "embedding bits", "steps (pruned + shared)",
              ".dcx bytes", "vs model.safetensors", "cos end of pruned retraining",
              "cos after sharing", "mean cos (64 fixed)",
              "min cos", "mean cos (held-out)", "min cos", "minutes"]
    from dcx.plots import distillation_curves

    plot = distillation_curves(common.RESULTS / f"{name}-curve.png", curves,
                               "embedding cosine to fp32",
                               title="MiniLM, training batches")
    plots = f"Curve: {plot.name}."
    if len(points) > 1:
        plots += f" Size against cosine: {plot_pareto(points, source_bytes, name).name}."
    chosen = "--grid" if args.grid else f"--settings {' '.join(settings)}"
    if not args.grid and args.name != "minilm-distill":
        chosen += f" --name {args.name}"
    common.write_table(name, "all-MiniLM-L6-v2: compression with distillation",
                       header, rows,
                       [common.stamp("cpu"), "",
                        f"model.safetensors {source_bytes:,} bytes (fp32). The stages of the "
                        "module docstring; peak learning rates "
                        f"{args.lr:g} (weights, biases, LayerNorms) and {args.codebook_lr:g} times "
                        "each codebook's standard deviation (codebooks), 10 warm-up steps, "
                        "cosine to zero; "
                        f"{args.sentences} distillation sentences. 'end of pruned retraining': "
                        "the mean embedding cosine of the last 10 training batches before "
                        "sharing; 'after sharing': of the first training batch right after "
                        "calibrated sharing. "
                        f"{plots} Command: `python benchmarks/minilm_distill.py "
                        f"--steps {args.steps}"
                        f"{f' --shared-steps {args.shared_steps}' if args.shared_steps else ''}"
                        f"{f' --prune-rounds {args.prune_rounds}' if args.prune_rounds > 1 else ''}"
                        f" --lr {args.lr:g} --codebook-lr "
                        f"{args.codebook_lr:g} {chosen}`"
                        f"{'' if len(rows) == len(settings) else f' ({len(rows)} of {len(settings)} settings done)'}."])


def plot_pareto(points, source_bytes, name):
    """Mean cosine (64 fixed sentences and held-out) against the file's compression ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ratios = [source_bytes / size for size, _, _ in points.values()]
    for column, marker, label in ((1, "o", "64 fixed sentences"), (2, "x", "held-out")):
        ax.scatter(ratios, [p[column] for p in points.values()], marker=marker, label=label)
    for text, ratio, (_, fixed, _) in zip(points, ratios, points.values()):
        ax.annotate(text, (ratio, fixed), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("compression ratio (model.safetensors / .dcx file)")
    ax.set_ylabel("mean embedding cosine to fp32")
    ax.axhline(0.99, color="grey", linewidth=0.6, linestyle=":")
    ax.axhline(0.98, color="grey", linewidth=0.6, linestyle=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("all-MiniLM-L6-v2 with distillation: SPARSITY:BITS:SCALE:EMBEDDING_BITS",
                 fontsize=9)
    path = common.RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
