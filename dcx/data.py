"""Small data sets for the paper's experiments, without torchvision.

- MNIST from the standard IDX files (gzip or raw) in a folder the user names (argument, or the
  environment variable DCX_MNIST). Headers are validated: magic number, element type, number of
  dimensions, sizes, and the file length.
- the 8x8 digits scikit-learn bundles (UCI optdigits), bundled with dcx too: no download and
  no scikit-learn.

Images come back as float32 [N, 1, H, W] in [0, 1], labels as int64 [N]; `loader` batches them.

Unlabeled text for calibration: `read_sentences` (plain text files split into sentences) and
`text_batches` (tokenized batches a transformers model takes); unlabeled images: `image_batches`
(a folder of photos, resized, cropped and normalised, or through a model's own image processor).
"""

import gzip
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

__all__ = ["read_idx", "load_mnist", "load_digits", "loader", "MNIST_ENV", "read_sentences",
           "text_batches"]

MNIST_ENV = "DCX_MNIST"

# IDX element types: code -> numpy big-endian dtype.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The four files of each split, and the variants with a dot that some mirrors use.
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in one IDX file (gzip-compressed when it starts with gzip's magic bytes).

    Raises ValueError naming the file when the header or the length is wrong."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: corrupt gzip data ({error})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex()}, "
                         "expected 0000 then type and dimension bytes)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions but the file has "
                         f"{len(raw)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header declares shape {shape} ({expected} bytes with the "
                         f"header) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    dotted = stem[::-1].replace("-", ".", 1)[::-1]  # train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {root}")


def _mnist_root(root) -> Path:
    root = root if root is not None else os.environ.get(MNIST_ENV)
    if root is None:
        raise FileNotFoundError(f"no MNIST folder given: pass root= or set {MNIST_ENV} to a folder "
                                "holding the four IDX files (train-images-idx3-ubyte.gz, ...)")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST folder {root} does not exist")
    return root


def load_mnist(root: str | Path | None = None, split: str = "train"):
    """MNIST `split` ("train": 60,000, "test": 10,000) as (images float32 [N, 1, 28, 28] in [0, 1],
    labels int64 [N]) from the IDX files in `root` (default: $DCX_MNIST)."""
    if split not in _MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = _mnist_root(root)
    image_path, label_path = (_find(root, stem) for stem in _MNIST_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_path}: expected uint8 images [N, rows, cols], got "
                         f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{label_path}: expected uint8 labels [N], got {labels.dtype} "
                         f"{labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds "
                         f"{len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{label_path}: labels must be in 0..9, found {labels.max()}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


DIGITS = Path(__file__).resolve().parent / "digits.npz"


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0):
    """The 1,797 8x8 handwritten digits of the UCI optdigits set, as scikit-learn ships them
    (bundled with dcx, dcx/digits.npz: no download, no scikit-learn), as (images float32
    [N, 1, 8, 8] in [0, 1], labels int64), split into train and test by a seeded permutation
    (the same split every call)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    with np.load(DIGITS) as bundle:
        images, target = bundle["images"], bundle["target"]
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    index = order[:n_test] if split == "test" else order[n_test:]
    return x[index], y[index]


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
           seed: int | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader over (x, y) that slices whole batches at once (a batch sampler over a
    TensorDataset), which is far faster than collating single samples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = TensorDataset(x, y)
    if shuffle:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size, drop_last)
    return DataLoader(dataset, sampler=batches, batch_size=None)


# A sentence ends at . ! or ? (and closing quotes or brackets) followed by white space.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def read_sentences(paths, count: int | None = None, seed: int = 0, min_words: int = 4,
                   max_words: int = 64, skip: int = 0) -> list[str]:
    """Sentences of the plain-text files `paths` (a path or a list; UTF-8): the text split at
    sentence ends, line breaks joined, sentences of min_words..max_words words kept; then
    `count` of them drawn at random (seed; None: all, in order), after leaving out the first
    `skip` of the shuffled order (so two calls with different skips draw disjoint sets).
    Raises ValueError when a file is missing or yields no sentence."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("read_sentences: no text files given")
    sentences = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"text file {str(path)!r} does not exist")
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        for s in _SENTENCE_END.split(text):
            if min_words <= len(s.split()) <= max_words:
                sentences.append(s)
    if not sentences:
        raise ValueError(f"no sentence of {min_words} to {max_words} words in {[str(p) for p in paths]}")
    if count is None:
        return sentences[skip:]
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    return [sentences[i] for i in order[skip:skip + count]]


def text_batches(tokenizer, sentences, batch_size: int = 16, max_length: int = 128) -> list:
    """The sentences tokenized by a transformers tokenizer in batches of batch_size (padded to
    the longest of each batch, truncated at max_length): a list of dicts of tensors, each a
    model's keyword arguments. A tokenizer without a padding token (a decoder language
    model's) pads with its end-of-sequence token, which the attention mask leaves out."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    sentences = list(sentences)
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt"))
            for i in range(0, len(sentences), batch_size)]


# --- images: calibration inputs for vision models -----------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# torchvision's ImageNet normalisation, what most pretrained vision models were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_files(folder, count: int | None = None, seed: int = 0) -> list[Path]:
    """The image files (IMAGE_SUFFIXES, any case) under `folder`, subfolders included, sorted;
    then `count` of them drawn at random (seed; None: all). Raises ValueError when the folder is
    missing or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    if count is None or count >= len(files):
        return files
    return sorted(random.Random(seed).sample(files, count))


def _open_rgb(path):
    """The image file as an RGB PIL image (Pillow: a dependency of matplotlib); ValueError naming
    a file Pillow cannot read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:  # UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from None


def read_image(path, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """One image as a model input [3, size, size] float32: RGB, its shorter side resized to
    `size` (bilinear), centre-cropped, scaled to [0, 1] and normalised by mean / std per channel
    (ImageNet's by default; mean 0, std 1 leaves [0, 1]). Raises ValueError naming a file that
    cannot be read."""
    from PIL import Image

    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    image = _open_rgb(path)
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.Resampling.BILINEAR)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def image_batches(folder, count: int | None = None, size: int = 224, batch_size: int = 16,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int = 0,
                  processor=None) -> list:
    """Calibration batches from a folder of images (image_files: `count` drawn with `seed`):
    tensors [batch, 3, size, size] made by read_image, or, with a transformers image
    `processor` (a model folder's own preprocessing), dicts {"pixel_values": ...} the model
    takes as keyword arguments."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = image_files(folder, count, seed)
    batches = []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        if processor is None:
            batches.append(torch.stack([read_image(f, size, mean, std) for f in chunk]))
        else:
            pixels = processor(images=[_open_rgb(f) for f in chunk], return_tensors="pt")
            batches.append({"pixel_values": pixels["pixel_values"]})
    return batches
