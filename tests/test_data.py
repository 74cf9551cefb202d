import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dcx import data

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
requires_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST not found at {MNIST}")


def idx_bytes(array, type_code=0x08):
    dims = b"".join(struct.pack(">I", d) for d in array.shape)
    header = bytes([0, 0, type_code, array.ndim]) + dims
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_split(root, n=7, rows=28, cols=28, compress=True, split="train"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    files = ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels))
    for stem, array in files:
        raw = idx_bytes(array)
        if compress:
            (root / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (root / stem).write_bytes(raw)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_synthetic_idx_round_trip(tmp_path, compress):
    images, labels = write_split(tmp_path, compress=compress)
    x, y = data.load_mnist(tmp_path, "train")
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(images).float().unsqueeze(1) / 255)
    assert torch.equal(y, torch.from_numpy(labels).long())


@pytest.mark.parametrize("code, dtype", [(0x08, np.uint8), (0x0B, np.int16), (0x0C, np.int32),
                                         (0x0D, np.float32), (0x0E, np.float64)])
def test_read_idx_types(tmp_path, code, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if code != 0x08 else \
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array, code))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), array)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX element type 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "declares 3 dimensions"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x05\x06", r"declares shape \(3,\)"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06", "file has 10 bytes"),
        (b"\x1f\x8b\x08garbage", "corrupt gzip"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        data.read_idx(path)


def test_mnist_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(data.MNIST_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="set DCX_MNIST"):
        data.load_mnist()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_mnist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        data.load_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split must be"):
        data.load_mnist(tmp_path, "val")
    images, labels = write_split(tmp_path, n=5)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels[:4])))
    with pytest.raises(ValueError, match="holds 5 images but .* holds 4 labels"):
        data.load_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels + 10)))
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        data.load_mnist(tmp_path)
    monkeypatch.setenv(data.MNIST_ENV, str(tmp_path))
    write_split(tmp_path, n=5, split="test", compress=False)
    assert data.load_mnist(split="test")[0].shape == (5, 1, 28, 28)


@requires_mnist
def test_real_mnist():
    x, y = data.load_mnist(MNIST, "train")
    xt, yt = data.load_mnist(MNIST, "test")
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4] and yt[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(y).tolist()[:3] == [5923, 6742, 5958]
    assert 0.0 <= x.min() and x.max() == 1.0
    raw = gzip.decompress((MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == "27ae3e4e09519cfbb04c329615203637"


def test_bundled_digits_are_scikit_learns():
    sklearn = pytest.importorskip("sklearn.datasets", reason="scikit-learn is not installed")
    bunch = sklearn.load_digits()
    x, y = data.load_digits("train")
    xt, yt = data.load_digits("test")
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    images = torch.from_numpy(bunch.images).float().div(16).unsqueeze(1)
    assert torch.equal(torch.cat([xt, x]), images[order])
    assert torch.equal(torch.cat([yt, y]), torch.from_numpy(bunch.target)[order])


def test_digits_and_loader():
    x, y = data.load_digits("train")
    xt, yt = data.load_digits("test")
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797 and len(xt) == 359
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(y.tolist()) == set(range(10))
    again, _ = data.load_digits("train")
    assert torch.equal(again, x)
    seen = torch.cat([yb for _, yb in data.loader(x, y, 100, shuffle=True, seed=1)])
    assert len(seen) == len(y) and torch.equal(seen.sort().values, y.sort().values)
    batches = [xb.shape[0] for xb, _ in data.loader(x, y, 500)]
    assert batches == [500, 500, 438]
    first = next(iter(data.loader(x, y, 10, shuffle=True, seed=1)))[1]
    assert torch.equal(first, next(iter(data.loader(x, y, 10, shuffle=True, seed=1)))[1])
    with pytest.raises(ValueError, match="batch_size must be"):
        data.loader(x, y, 0)


def test_text_batches_pad_a_decoder_tokenizer_with_its_end_token(tmp_path):
    """A decoder LM's tokenizer has no padding token: the batches pad with its end token,
    masked out."""
    transformers = pytest.importorskip("transformers")
    words = ["the", "cat", "sat", "on", "a", "mat", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(["[UNK]", "[SEP]"] + words) + "\n")
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), pad_token=None,
                                           cls_token=None, mask_token=None, eos_token="[SEP]")
    assert tokenizer.pad_token is None
    batches = data.text_batches(tokenizer, ["the cat sat on a mat .", "a cat ."], batch_size=2)
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    assert ids.shape[0] == 2 and mask[1].sum() < mask[0].sum()
    assert (ids[1][mask[1] == 0] == tokenizer.convert_tokens_to_ids("[SEP]")).all()


def write_images(folder, count, size=(12, 8), seed=0):
    """`count` random RGB PNGs (and one JPEG) of `size` (width, height) under folder/sub."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = folder / ("sub" if i % 2 else "") / f"img{i}.{'JPG' if i == 0 else 'png'}"
        Image.fromarray(pixels).save(path, format="JPEG" if i == 0 else "PNG")
        paths.append(path)
    return paths


def test_read_image_resizes_crops_and_normalises(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 20), (255, 0, 128)).save(tmp_path / "solid.png")
    x = data.read_image(tmp_path / "solid.png", size=10)
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(data.IMAGENET_MEAN)) / \
        torch.tensor(data.IMAGENET_STD)
    torch.testing.assert_close(x.mean((1, 2)), expected)
    raw = data.read_image(tmp_path / "solid.png", size=10, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(raw[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))
    # the centre is kept: a left half black, right half white, cropped to the middle square
    half = Image.new("L", (40, 20), 0)
    half.paste(255, (20, 0, 40, 20))
    half.save(tmp_path / "half.png")
    y = data.read_image(tmp_path / "half.png", size=10, mean=(0, 0, 0), std=(1, 1, 1))
    assert float(y[0, 5, 0]) < 0.1 and float(y[0, 5, 9]) > 0.9


def test_image_batches(tmp_path):
    write_images(tmp_path / "photos", 7)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    batches = data.image_batches(tmp_path / "photos", size=6, batch_size=3)
    assert [b.shape for b in batches] == [(3, 3, 6, 6), (3, 3, 6, 6), (1, 3, 6, 6)]
    drawn = data.image_files(tmp_path / "photos", count=4, seed=1)
    assert len(drawn) == 4 and drawn == data.image_files(tmp_path / "photos", count=4, seed=1)
    assert len(data.image_files(tmp_path / "photos", count=100)) == 7


def test_image_errors(tmp_path):
    with pytest.raises(ValueError, match="image folder .* does not exist"):
        data.image_batches(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image"):
        data.image_batches(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        data.image_batches(tmp_path / "bad")
    write_images(tmp_path / "ok", 2)
    with pytest.raises(ValueError, match="image size must be >= 1"):
        data.image_batches(tmp_path / "ok", size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.image_batches(tmp_path / "ok", batch_size=0)
