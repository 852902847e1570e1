"""Datasets: IDX parsing, where Fashion-MNIST is looked for, the downloader (against a local HTTP server),
CIFAR and ImageFolder readers, and the batched augmentations."""

import functools
import gzip
import hashlib
import http.server
import pickle
import threading

import numpy as np
import pytest
import torch

from ermoe.data import (CorruptDatasetError, DatasetNotFoundError, DownloadError, ImageSet, download_file,
                        load_cifar, load_dataset, load_fashion_mnist, load_imagefolder, random_crop, random_hflip,
                        read_idx)
from ermoe.data import images as images_mod


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fashion_mnist(root, n_train=12, n_test=6, compress=True):
    rng = np.random.default_rng(0)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files[f"{prefix}-images-idx3-ubyte"] = idx_bytes(rng.integers(0, 256, (n, 28, 28)))
        files[f"{prefix}-labels-idx1-ubyte"] = idx_bytes(np.arange(n) % 10)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, data in files.items():
        blob = gzip.compress(data) if compress else data
        fname = name + (".gz" if compress else "")
        (root / fname).write_bytes(blob)
        out[name + ".gz"] = blob
    return out


def test_read_idx_roundtrip_and_errors(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(a))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), a)
    (tmp_path / "trunc.idx").write_bytes(idx_bytes(a)[:-3])
    with pytest.raises(CorruptDatasetError, match="truncated"):
        read_idx(tmp_path / "trunc.idx")
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04" + bytes(8))
    with pytest.raises(CorruptDatasetError, match="magic"):
        read_idx(tmp_path / "bad.idx")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(CorruptDatasetError):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_data_dir(tmp_path, compress):
    write_fake_fashion_mnist(tmp_path, compress=compress)
    data = load_fashion_mnist(tmp_path)
    assert data.train.images.shape == (12, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.test.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert data.num_classes == 10 and data.in_chans == 1 and data.img_size == 28


def test_missing_fashion_mnist_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(images_mod, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(images_mod.Path, "home", lambda: tmp_path / "home")
    with pytest.raises(DatasetNotFoundError) as err:
        load_fashion_mnist()
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and str(tmp_path / "home" / ".cache" / "ermoe" / "fashion-mnist") in msg
    assert "data_dir" in msg and "apt-get install dataset-fashion-mnist" in msg and "download" in msg


def test_a_given_data_dir_is_used_or_an_error_never_another_copy(tmp_path, monkeypatch):
    write_fake_fashion_mnist(tmp_path / "system")  # a complete copy the old code fell back to
    monkeypatch.setattr(images_mod, "DEBIAN_FASHION_MNIST", tmp_path / "system")
    with pytest.raises(DatasetNotFoundError, match="data.data_dir .*nonexistent is not a directory"):
        load_fashion_mnist(tmp_path / "nonexistent")
    partial = tmp_path / "partial"
    write_fake_fashion_mnist(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="lacks Fashion-MNIST files: t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(partial)
    assert len(load_fashion_mnist().train) == 12  # no data_dir: the system copy


def test_fashion_mnist_labels_out_of_range_are_corrupt(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.arange(12) + 3)))
    with pytest.raises(CorruptDatasetError, match="train labels go up to 14"):
        load_fashion_mnist(tmp_path)


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_fashion_mnist_from_a_mirror(tmp_path, http_server, monkeypatch):
    served, url = http_server
    blobs = write_fake_fashion_mnist(served)
    monkeypatch.setattr(images_mod, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(images_mod, "FASHION_MNIST_FILES", {k: hashlib.md5(v).hexdigest() for k, v in blobs.items()})
    data = load_dataset("fashion_mnist", tmp_path / "dl", download=True, mirror=url)
    assert len(data.train) == 12 and len(data.test) == 6
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(blobs)


def test_download_checksum_mismatch_keeps_nothing(tmp_path, http_server):
    served, url = http_server
    (served / "f.bin").write_bytes(b"tampered")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_file(url + "f.bin", tmp_path / "out" / "f.bin", md5="0" * 32)
    assert list((tmp_path / "out").iterdir()) == []
    good = download_file(url + "f.bin", tmp_path / "out" / "f.bin", md5=hashlib.md5(b"tampered").hexdigest())
    assert good.read_bytes() == b"tampered"


def test_download_missing_file_is_a_clear_error(tmp_path, http_server):
    _, url = http_server
    with pytest.raises(DownloadError, match="could not download"):
        download_file(url + "absent.gz", tmp_path / "absent.gz", md5=None)
    assert not (tmp_path / "absent.gz").exists()


def test_cifar10_python_format(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    data = load_cifar(tmp_path, 10)
    assert data.train.images.shape == (20, 3, 32, 32) and len(data.test) == 4
    assert data.classes[9] == "c9"
    first = pickle.loads((root / "data_batch_1").read_bytes())[b"data"][0]
    assert torch.equal(data.train.images[0].reshape(-1), torch.from_numpy(first))  # CHW order as stored
    (root / "test_batch").write_bytes(b"garbage")
    with pytest.raises(CorruptDatasetError):
        load_cifar(tmp_path, 10)


def test_imagefolder(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((10, 14, 3), 40 * i, dtype=np.uint8)).save(d / f"{i}.png")
    data = load_imagefolder(tmp_path, img_size=8)
    assert data.classes == ["cat", "dog"] and data.train.images.shape == (4, 3, 8, 8)
    with pytest.raises(DatasetNotFoundError):
        load_imagefolder(tmp_path / "nope", img_size=8)
    (tmp_path / "test" / "dog" / "notes.png").write_text("not an image")  # an image's name, not an image
    with pytest.raises(CorruptDatasetError, match="cannot decode image .*notes.png"):
        load_imagefolder(tmp_path, img_size=8)


def test_digits():
    pytest.importorskip("sklearn")
    data = load_dataset("digits")
    assert data.train.images.shape[1:] == (1, 8, 8) and len(data.train) + len(data.test) == 1797
    assert int(data.train.images.max()) == 255


def test_imageset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


def test_random_crop_matches_per_image_reference():
    x = torch.randn(6, 2, 5, 7)
    pad = 2
    out = random_crop(x, pad, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    dy = torch.randint(0, 2 * pad + 1, (6,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (6,), generator=g)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for b in range(6):
        ref = padded[b, :, dy[b]:dy[b] + 5, dx[b]:dx[b] + 7]
        assert torch.equal(out[b], ref)


def test_hflip_flips_about_half():
    x = torch.arange(1000 * 3.0).view(1000, 1, 1, 3)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] != x[:, 0, 0, 0])
    assert torch.equal(out[flipped], x[flipped].flip(-1))
    assert 400 < int(flipped.sum()) < 600
