"""Datasets, all read from local files (nothing is downloaded).

- ``cifar100``: torchvision's CIFAR-100 from ``data_dir/cifar-100-python`` (the "python
  version" archive, extracted).
- ``fashion_mnist``: the idx files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``) or of any ``data_dir`` holding the same files.
- ``digits``: scikit-learn's bundled 8×8 digits (1,797 images; a fixed 80/20 split).
- ``imagefolder``: ``data_dir/train`` and ``data_dir/val`` (or ``test``) in torchvision's
  ImageFolder layout.

Every dataset yields ``(image [3, S, S] float32, label)``: grayscale images are repeated to 3
channels and all images resized to the model's input size S and normalised with the model's
mean/std, so a pretrained ViT sees inputs shaped like its own. ``classes`` keeps a subset of
the classes and relabels them 0..k-1 (a downstream task of held-out classes).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DATASETS = ("cifar100", "fashion_mnist", "digits", "imagefolder")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    num_classes: int
    name: str


class TensorImageDataset(Dataset):
    """Images kept compact (uint8 or float, [N, H, W] or [N, H, W, C]) and turned into
    normalised ``[3, S, S]`` float tensors on access, with an optional horizontal flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, scale: float = 255.0, flip: bool = False):
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        self.images, self.labels = images, labels.long()
        self.image_size, self.scale, self.flip = image_size, scale, flip
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index].float() / self.scale
        image = image.unsqueeze(0).expand(3, -1, -1) if image.dim() == 2 else image.permute(2, 0, 1)
        if image.shape[-1] != self.image_size or image.shape[-2] != self.image_size:
            image = F.interpolate(image[None], size=(self.image_size, self.image_size),
                                  mode="bilinear", align_corners=False)[0]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (image - self.mean) / self.std, self.labels[index]


def _subset(images, labels, classes: Optional[Sequence[int]], num_classes: int):
    """The examples of ``classes`` (of the dataset's ``num_classes``), relabelled 0.. in the
    order given."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels: the files do not belong together")
    if classes is None:
        return images, labels
    classes = list(classes)
    if not classes:
        raise ValueError("classes must name at least one class, or be None for all")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise ValueError(f"classes {repeated} are listed more than once in {classes}")
    remap = torch.full((num_classes,), -1, dtype=torch.long)  # labels: checked to lie below it
    missing = [c for c in classes if not 0 <= c < num_classes]
    if missing:
        raise ValueError(f"classes {missing} are not labels of this dataset (0..{num_classes - 1})")
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    keep = remap[labels] >= 0
    return images[keep], remap[labels[keep]]


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """An idx file of ``ndim`` dims (gzipped or not, whatever its name says): big-endian dims
    after a 4-byte magic."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip's magic
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError) as error:  # cut short, or damaged
            raise ValueError(f"{path}: not a complete gzip file ({error})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes: its first bytes must be 00 00 08 "
                         f"(then the number of dims); got {data[:4].hex(' ') or 'none'}")
    if data[3] != ndim:
        raise ValueError(f"{path} holds a {data[3]}-dim array; expected {ndim} dims "
                         f"({'images [N, H, W]' if ndim == 3 else 'labels [N]'})")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, less than its header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise ValueError(f"{path} has {body.size} bytes after its header; its shape {dims} needs "
                         f"{math.prod(dims)} ({'truncated' if body.size < math.prod(dims) else 'extra bytes'})")
    return body.reshape(dims)


def _check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Every label in 0..num_classes-1: a label past the class count would only fail inside
    the loss, mid-training."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{where}: labels run {int(labels.min())}..{int(labels.max())}; this dataset "
                         f"has {num_classes} classes (0..{num_classes - 1})")


def _idx_file(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. On Debian/Ubuntu: "
        f"`apt-get install dataset-fashion-mnist` (installs to {FASHION_MNIST_DIR}), or pass "
        f"--data-dir with the four idx files."
    )


def fashion_mnist(data_dir: Optional[str], image_size: int, classes=None, **norm) -> DataBundle:
    directory = data_dir or FASHION_MNIST_DIR
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = torch.from_numpy(_read_idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"), 3).copy())
        label_file = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
        labels = torch.from_numpy(_read_idx(label_file, 1).astype(np.int64))
        _check_labels(labels, 10, label_file)
        images, labels = _subset(images, labels, classes, 10)
        parts[split] = TensorImageDataset(images, labels, image_size, flip=False, **norm)
    return DataBundle(parts["train"], parts["test"], len(classes) if classes else 10, "fashion_mnist")


def digits(image_size: int, classes=None, **norm) -> DataBundle:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32))  # [1797, 8, 8], values 0..16
    labels = torch.from_numpy(data.target.astype(np.int64))
    images, labels = _subset(images, labels, classes, 10)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(order))
    split = {"train": order[:cut], "test": order[cut:]}
    parts = {k: TensorImageDataset(images[i], labels[i], image_size, scale=16.0, **norm) for k, i in split.items()}
    return DataBundle(parts["train"], parts["test"], len(classes) if classes else 10, "digits")


def _torchvision_transforms(image_size: int, train: bool, mean, std):
    from torchvision import transforms as T

    steps = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    if train:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def cifar100(data_dir: Optional[str], image_size: int, classes=None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> DataBundle:
    from torchvision.datasets import CIFAR100

    class LocalCIFAR100(CIFAR100):
        # The files are the user's own copy: check they exist, not their checksums, and
        # never download.
        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(folder, name)) for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:  # torchvision's, without the checksum
            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                meta = pickle.load(f, encoding="latin1")
            self.classes = meta[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    if data_dir is None or not os.path.isdir(os.path.join(data_dir, "cifar-100-python")):
        hint = ""
        if data_dir is not None and os.path.isfile(os.path.join(data_dir, "meta")):
            hint = f" {data_dir} itself holds the files: pass its parent folder."
        elif data_dir is not None and os.path.isfile(os.path.join(data_dir, "cifar-100-python.tar.gz")):
            hint = f" {data_dir} holds cifar-100-python.tar.gz: extract it there first."
        raise FileNotFoundError(
            f"CIFAR-100 not found: expected {os.path.join(data_dir or '<--data-dir>', 'cifar-100-python')} "
            f"holding train, test and meta (the 'CIFAR-100 python version' archive, extracted). "
            f"Nothing is downloaded.{hint}"
        )
    folder = os.path.join(data_dir, "cifar-100-python")
    missing = [name for name in ("train", "test", "meta") if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(f"CIFAR-100 in {folder} lacks {', '.join(missing)} (the 'CIFAR-100 python "
                                f"version' archive, extracted, holds train, test and meta). Nothing is downloaded.")
    parts = {}
    for split in ("train", "test"):
        try:
            ds = LocalCIFAR100(data_dir, train=split == "train", download=False,
                               transform=_torchvision_transforms(image_size, split == "train", mean, std))
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError,
                IndexError, ImportError) as error:  # (a pickle of something else than the dicts)
            raise ValueError(f"CIFAR-100 in {folder}: cannot read the {split} or meta file "
                             f"({type(error).__name__}: {error}); truncated or not the python version?") from None
        where = os.path.join(folder, split)
        if len(ds.data) != len(ds.targets):
            raise ValueError(f"{where} holds {len(ds.data)} images but {len(ds.targets)} labels")
        if not (isinstance(ds.data, np.ndarray) and ds.data.dtype == np.uint8):
            raise ValueError(f"{where}: images must be uint8 (0..255, the python version's); got "
                             f"{getattr(ds.data, 'dtype', type(ds.data).__name__)}")
        labels = torch.tensor(ds.targets, dtype=torch.long)
        _check_labels(labels, 100, where)
        if classes is not None:
            keep, new_labels = _subset(torch.arange(len(labels)), labels, classes, 100)
            ds.data, ds.targets = ds.data[keep.numpy()], new_labels.tolist()
        parts[split] = ds
    return DataBundle(parts["train"], parts["test"], len(classes) if classes else 100, "cifar100")


def imagefolder(data_dir: Optional[str], image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> DataBundle:
    from torchvision.datasets import ImageFolder as TorchvisionImageFolder

    class ImageFolder(TorchvisionImageFolder):
        @staticmethod
        def find_classes(directory):  # hidden folders (.ipynb_checkpoints, ...) are no classes
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise FileNotFoundError(f"{directory} holds no class folders")
            return classes, {name: i for i, name in enumerate(classes)}

    if data_dir is None or not os.path.isdir(os.path.join(data_dir, "train")):
        raise FileNotFoundError(f"imagefolder needs --data-dir with train/ and val/ (or test/) subfolders; got {data_dir!r}")
    test_dir = next((os.path.join(data_dir, d) for d in ("val", "test") if os.path.isdir(os.path.join(data_dir, d))), None)
    if test_dir is None:
        raise FileNotFoundError(f"{data_dir} has train/ but neither val/ nor test/")
    train = ImageFolder(os.path.join(data_dir, "train"), transform=_torchvision_transforms(image_size, True, mean, std))
    test = ImageFolder(test_dir, transform=_torchvision_transforms(image_size, False, mean, std))
    if train.classes != test.classes:
        name = os.path.basename(test_dir)
        raise ValueError(f"{data_dir}: train/ and {name}/ have different class folders; only in train/: "
                         f"{sorted(set(train.classes) - set(test.classes))}, only in {name}/: "
                         f"{sorted(set(test.classes) - set(train.classes))}")
    return DataBundle(train, test, len(train.classes), "imagefolder")


def calibration_batches(dataset: Dataset, batch_size: int, count: int, seed: int = 0) -> list:
    """``count`` input batches (labels dropped) of images drawn from ``dataset`` at random
    without replacement (``seed``), for the activation statistics of the initialisation;
    only those images are loaded. Drawn, not the first ones: a dataset listed by class (an
    ImageFolder) would calibrate on its first classes alone."""
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:batch_size * count]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, chosen.tolist()), batch_size=batch_size,
                                         shuffle=False)
    return [images for images, _ in loader]


def load_dataset(name: str, data_dir: Optional[str] = None, image_size: int = 224,
                 classes: Optional[Sequence[int]] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> DataBundle:
    """The named dataset (one of ``DATASETS``) for a model with input size ``image_size``.
    A split with no examples (of ``classes``, where given) is an error: it would train on
    nothing, or report an accuracy of 0 measured on nothing."""
    norm = {"mean": tuple(mean), "std": tuple(std)}
    if name == "cifar100":
        bundle = cifar100(data_dir, image_size, classes, **norm)
    elif name == "fashion_mnist":
        bundle = fashion_mnist(data_dir, image_size, classes, **norm)
    elif name == "digits":
        bundle = digits(image_size, classes, **norm)
    elif name == "imagefolder":
        if classes is not None:
            raise ValueError("classes is not supported for imagefolder: arrange the folders instead")
        bundle = imagefolder(data_dir, image_size, **norm)
    else:
        raise ValueError(f"dataset must be one of {DATASETS}; got {name!r}")
    for split, part in (("train", bundle.train), ("test", bundle.test)):
        if len(part) == 0:
            raise ValueError(f"{name}: the {split} split has no examples"
                             + (f" of classes {list(classes)}" if classes is not None else ""))
    return bundle
