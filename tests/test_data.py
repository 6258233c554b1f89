"""Dataset loaders, on small files the tests write in each real format."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from tunecomp.data import load_dataset


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx(tmp_path):
    rng = np.random.default_rng()
    for prefix, n in (("train", 30), ("t10k", 12)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_dataset("fashion_mnist", str(tmp_path), image_size=32)
    assert (len(data.train), len(data.test), data.num_classes) == (30, 12, 10)
    image, label = data.train[13]
    assert image.shape == (3, 32, 32) and int(label) == 3
    subset = load_dataset("fashion_mnist", str(tmp_path), image_size=28, classes=[7, 2])
    assert subset.num_classes == 2 and len(subset.train) == 6
    assert sorted({int(subset.train[i][1]) for i in range(6)}) == [0, 1]


def test_fashion_mnist_missing_and_truncated(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", str(tmp_path), image_size=28)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28)))
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as f:
        data = f.read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("fashion_mnist", str(tmp_path), image_size=28)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:9])  # inside the header (4 + 4 * 3 bytes)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is truncated: 9 bytes, less than its header"):
        load_dataset("fashion_mnist", str(tmp_path), image_size=28)


def test_fashion_mnist_images_and_labels_that_do_not_belong_together(tmp_path):
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((30, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(28) % 10)
    for classes in (None, [1, 2]):
        with pytest.raises(ValueError, match="30 images but 28 labels"):
            load_dataset("fashion_mnist", str(tmp_path), image_size=28, classes=classes)


def test_digits_split_and_range():
    data = load_dataset("digits", image_size=8)
    assert len(data.train) + len(data.test) == 1797 and data.num_classes == 10
    x = torch.stack([data.test[i][0] for i in range(50)])
    assert x.shape == (50, 3, 8, 8) and torch.isfinite(x).all() and x.std() > 0.1


def test_cifar100_from_local_python_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng()
    for name, n in (("train", 20), ("test", 10)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": [i % 100 for i in range(n)]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    data = load_dataset("cifar100", str(tmp_path), image_size=48)
    assert (len(data.train), len(data.test), data.num_classes) == (20, 10, 100)
    image, label = data.test[3]
    assert image.shape == (3, 48, 48) and int(label) == 3
    subset = load_dataset("cifar100", str(tmp_path), image_size=32, classes=[5, 1])
    assert len(subset.train) == 2 and sorted(int(subset.train[i][1]) for i in range(2)) == [0, 1]


def test_cifar100_missing_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", str(tmp_path), image_size=32)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="lacks test, meta"):
        load_dataset("cifar100", str(tmp_path), image_size=32)
    for name in ("test", "meta"):
        (folder / name).write_bytes(pickle.dumps({"data": 1})[:5])  # truncated
    with pytest.raises(ValueError, match="cannot read the train or meta file .* truncated"):
        load_dataset("cifar100", str(tmp_path), image_size=32)


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(2):
                Image.fromarray(np.random.default_rng().integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    data = load_dataset("imagefolder", str(tmp_path), image_size=16)
    assert data.num_classes == 2 and len(data.train) == 4
    assert data.test[0][0].shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        load_dataset("imagefolder", str(tmp_path / "nowhere"), image_size=16)


def test_unknown_dataset_and_bad_classes():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match=r"classes \[12\] are not labels"):
        load_dataset("digits", image_size=8, classes=[1, 12])
    with pytest.raises(ValueError, match=r"classes \[5\] are listed more than once in \[5, 5, 6\]"):
        load_dataset("digits", image_size=8, classes=[5, 5, 6])  # would be an empty class
    with pytest.raises(ValueError, match="at least one class"):
        load_dataset("digits", image_size=8, classes=[])


def test_class_subsets_that_leave_a_split_empty(tmp_path):
    """Classes with no examples in a split: once a run reported accuracy 0 measured on an
    empty test set, and a class absent from a split's labels was called out of range
    (0..the split's largest label) though the dataset has it."""
    for prefix, labels in (("train", [0, 1, 2, 3, 4, 5]), ("t10k", [0, 1, 2, 4, 5])):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((len(labels), 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.array(labels))
    with pytest.raises(ValueError, match=r"fashion_mnist: the test split has no examples of classes \[3\]"):
        load_dataset("fashion_mnist", str(tmp_path), image_size=28, classes=[3])
    with pytest.raises(ValueError, match=r"fashion_mnist: the train split has no examples of classes \[9\]"):
        load_dataset("fashion_mnist", str(tmp_path), image_size=28, classes=[9])
    with pytest.raises(ValueError, match=r"classes \[10\] are not labels of this dataset \(0..9\)"):
        load_dataset("fashion_mnist", str(tmp_path), image_size=28, classes=[10])
    assert len(load_dataset("fashion_mnist", str(tmp_path), image_size=28, classes=[3, 4]).test) == 1
    for prefix in ("train", "t10k"):  # files of no examples at all
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((0, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(0))
    for classes in (None, [1]):
        with pytest.raises(ValueError, match="fashion_mnist: the train split has no examples"):
            load_dataset("fashion_mnist", str(tmp_path), image_size=28, classes=classes)


def test_cifar100_images_other_than_bytes_are_refused_at_load(tmp_path):
    # before: loaded, then PIL failed on the first image read, mid-run
    write_cifar(tmp_path, train={"data": np.zeros((4, 3072), dtype=np.int64), "fine_labels": [0, 1, 2, 3]})
    with pytest.raises(ValueError, match=r"cifar-100-python/train: images must be uint8 .*; got int64"):
        load_dataset("cifar100", str(tmp_path), image_size=32)


def write_cifar(tmp_path, n_images=20, n_labels=20, labels=None, train=None):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng()
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            if name == "train" and train is not None:
                pickle.dump(train, f)
                continue
            pickle.dump({"data": rng.integers(0, 256, (n_images, 3072), dtype=np.uint8),
                         "fine_labels": labels if labels is not None else [i % 100 for i in range(n_labels)]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    return folder


@pytest.mark.parametrize("n_images, n_labels", [(20, 18), (12, 20)])
@pytest.mark.parametrize("classes", [None, [1, 2], [15]])
def test_cifar100_images_and_labels_that_do_not_belong_together(tmp_path, n_images, n_labels, classes):
    # before: loaded, then misaligned or dropped samples, or an IndexError much later
    folder = write_cifar(tmp_path, n_images, n_labels)
    with pytest.raises(ValueError, match=f"{folder / 'train'} holds {n_images} images but {n_labels} labels"):
        load_dataset("cifar100", str(tmp_path), image_size=32, classes=classes)


def test_labels_past_the_class_count_are_refused_at_load(tmp_path):
    # before: num_classes 10 / 100 reported, and the loss failed mid-training
    write_cifar(tmp_path, labels=[i * 7 for i in range(20)])
    with pytest.raises(ValueError, match=r"train: labels run 0..133; this dataset has 100 classes \(0..99\)"):
        load_dataset("cifar100", str(tmp_path), image_size=32)
    fm = tmp_path / "fm"
    fm.mkdir()
    for prefix in ("train", "t10k"):
        write_idx(fm / f"{prefix}-images-idx3-ubyte.gz", np.zeros((13, 28, 28)))
        write_idx(fm / f"{prefix}-labels-idx1-ubyte.gz", np.arange(13))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: labels run 0..12; this dataset has 10 classes"):
        load_dataset("fashion_mnist", str(fm), image_size=28)


@pytest.mark.parametrize("content", [[1, 2, 3], "text", {"data": 1}])
def test_cifar100_pickles_of_something_else(tmp_path, content):
    write_cifar(tmp_path, train=content)  # a list: TypeError before, not the friendly error
    with pytest.raises(ValueError, match="cannot read the train or meta file"):
        load_dataset("cifar100", str(tmp_path), image_size=32)


def test_idx_files_damaged_or_misnamed(tmp_path):
    for prefix, n in (("train", 30), ("t10k", 12)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # an interrupted download
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: not a complete gzip file"):
        load_dataset("fashion_mnist", str(tmp_path), image_size=28)
    path.write_bytes(b"\x1f\x8b<html>not found</html>")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: not a complete gzip file"):
        load_dataset("fashion_mnist", str(tmp_path), image_size=28)
    # gzip data under the raw name (preferred over .gz) is read as gzip
    path.write_bytes(whole)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(whole)
    assert len(load_dataset("fashion_mnist", str(tmp_path), image_size=28).train) == 30
    raw = gzip.decompress(whole)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw + bytes(100))
    with pytest.raises(ValueError, match=r"has 23620 bytes after its header; its shape \(30, 28, 28\) needs 23520 \(extra bytes\)"):
        load_dataset("fashion_mnist", str(tmp_path), image_size=28)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((30, 28, 28)))  # labels of 3 dims
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz holds a 3-dim array; expected 1 dims \(labels \[N\]\)"):
        load_dataset("fashion_mnist", str(tmp_path), image_size=28)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + bytes(120)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz is not an idx file of unsigned bytes: its "
                                         r"first bytes must be 00 00 08 \(then the number of dims\); got 00 00 0d 01"):
        load_dataset("fashion_mnist", str(tmp_path), image_size=28)  # (0x0d: float32 values)


def test_imagefolder_class_folders(tmp_path):
    from PIL import Image

    for split, classes in (("train", ("cat", "dog", "fox", ".ipynb_checkpoints")), ("val", ("cat", "dog"))):
        for cls in classes:
            os.makedirs(tmp_path / split / cls)
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / split / cls / "0.png")
    with pytest.raises(ValueError, match=r"only in train/: \['fox'\], only in val/: \[\]"):
        load_dataset("imagefolder", str(tmp_path), image_size=8)
    os.rename(tmp_path / "train" / "fox", tmp_path / "fox")
    data = load_dataset("imagefolder", str(tmp_path), image_size=8)  # the hidden folder is no class
    assert data.num_classes == 2 and data.train.classes == ["cat", "dog"]


def test_cifar100_folder_hints(tmp_path):
    folder = write_cifar(tmp_path)
    with pytest.raises(FileNotFoundError, match="itself holds the files: pass its parent folder"):
        load_dataset("cifar100", str(folder), image_size=32)
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "cifar-100-python.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="holds cifar-100-python.tar.gz: extract it there first"):
        load_dataset("cifar100", str(tmp_path / "archive"), image_size=32)


def test_calibration_draws_its_images_from_the_whole_dataset():
    """A dataset listed by class (an ImageFolder) must not calibrate on its first classes:
    the batches are drawn at random, without replacement, the same for the same seed."""
    from torch.utils.data import TensorDataset

    from tunecomp.data import calibration_batches

    images = torch.arange(400, dtype=torch.float32).reshape(400, 1, 1, 1)
    labels = torch.arange(400) // 40  # 10 classes, in order
    dataset = TensorDataset(images, labels)
    batches = calibration_batches(dataset, 16, 4, seed=3)
    assert [b.shape for b in batches] == [(16, 1, 1, 1)] * 4
    drawn = torch.cat(batches).flatten().long()
    assert len(set(drawn.tolist())) == 64 and len(set((drawn // 40).tolist())) >= 8
    assert all(torch.equal(a, b) for a, b in zip(batches, calibration_batches(dataset, 16, 4, seed=3)))
    assert not torch.equal(drawn, torch.cat(calibration_batches(dataset, 16, 4, seed=4)).flatten().long())
    assert len(calibration_batches(dataset, 300, 4)) == 2  # no more than the dataset holds
