"""Datasets for the command line: scikit-learn's bundled digits, a local .npz, or an image-folder directory.

Nothing is downloaded: a dataset that would need a download is refused at once with a message saying how to
pass a local copy.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from .output import first_line

# Names people type expecting a download; each gets a message instead of a network call.
DOWNLOAD_NAMES = frozenset({"mnist", "fashion-mnist", "fashionmnist", "kmnist", "emnist", "cifar10", "cifar-10",
                            "cifar100", "cifar-100", "svhn", "stl10", "imagenet", "tiny-imagenet"})
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


@dataclass
class Dataset:
    """Train and test tensors: `x` float32 of shape (N, C, H, W) or (N, F) scaled to about [0, 1], `y` int64."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def fingerprint(self) -> str:
        """A digest of the data (its tensors' shapes and values, and the class count), the same wherever the same
        data was read from: the ranks of a data-parallel run may read it at other paths, one machine's from another."""
        digest = hashlib.sha256(str(self.num_classes).encode())
        for tensor in (self.train_x, self.train_y, self.test_x, self.test_y):
            digest.update(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def check_dataset(spec: str) -> None:
    """Raises ValueError (one line) if `spec` is neither "digits" nor an existing .npz file or directory."""
    if spec == "digits":
        return
    if spec.lower() in DOWNLOAD_NAMES:
        raise ValueError(f"dataset {spec!r} would need a download, which sparsekern never does: save it locally "
                         f"as an .npz with arrays x and y, or as an image folder with one subfolder per class, "
                         f"and pass --dataset PATH")
    if not os.path.exists(spec):
        raise ValueError(f"dataset must be 'digits' or an existing .npz file or image-folder directory, "
                         f"got {spec!r} (no such path)")
    if os.path.isfile(spec) and not spec.endswith(".npz"):
        raise ValueError(f"dataset file must be an .npz with arrays x and y, got {spec!r}")


def load_dataset(spec: str, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Loads `spec` ("digits", an .npz path or an image-folder path) and splits it by a permutation seeded with
    `seed` (the same seed always gives the same split).

    Raises ValueError (one line, naming the dataset and, for an image, the file) for anything that cannot train:
    an unreadable file, features that are not finite numbers, labels that are not class indices 0..K-1 with
    2 <= K <= the number of samples, fewer than 2 samples.
    """
    check_dataset(spec)
    if spec == "digits":
        x, y = _digits()
    elif os.path.isdir(spec):
        x, y = _image_folder(spec)
    else:
        x, y = _npz(spec)
    _check_content(spec, x, y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test_count = min(len(y) - 1, max(1, round(test_fraction * len(y))))
    test, train = order[:test_count], order[test_count:]
    return Dataset(os.path.basename(os.path.normpath(spec)), x[train], y[train], x[test], y[test],
                   int(y.max()) + 1)


def _check_content(spec: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if len(y) < 2:
        raise ValueError(f"dataset {spec!r} needs at least 2 samples, got {len(y)}")
    if x.dim() < 2 or x[0].numel() == 0:
        raise ValueError(f"dataset {spec!r}: x must have shape (samples, features...) with at least one feature, "
                         f"got {tuple(x.shape)}")
    finite = torch.isfinite(x)
    if not finite.all():
        bad = (~finite).flatten(1).any(1).nonzero()
        raise ValueError(f"dataset {spec!r}: features must be finite float32 numbers, but {len(bad)} samples hold "
                         f"NaN or infinity or exceed float32's range (the first is sample {int(bad[0])})")
    classes = torch.unique(y)
    if len(classes) < 2:
        raise ValueError(f"dataset {spec!r}: every label is {int(classes[0])}; classification needs at least "
                         f"2 classes")


def _check_labels(spec: str, y: np.ndarray) -> None:
    """Labels are class indices: integers in [0, number of samples)."""
    if y.ndim != 1:
        raise ValueError(f"dataset {spec!r}: y must be one integer label per sample, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"dataset {spec!r}: y must hold integer class indices, got dtype {y.dtype}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(y)):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise ValueError(f"dataset {spec!r}: label {bad} is out of range: labels must be class indices 0..K-1 "
                         f"with K at most the number of samples ({len(y)})")


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    return x, torch.tensor(data.target, dtype=torch.int64)


def _npz(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with np.load(path) as arrays:
            x, y = (arrays[name] if name in arrays.files else None for name in ("x", "y"))
    except Exception as error:  # a damaged file raises one of many types; all mean the same here
        raise ValueError(f"dataset {path!r} cannot be read as an .npz of numeric arrays ({type(error).__name__}: "
                         f"{first_line(error)})") from None
    missing = [name for name, array in (("x", x), ("y", y)) if array is None]
    if missing:
        raise ValueError(f"dataset {path!r} must hold arrays x and y, missing {missing}")
    _check_labels(path, y)
    if x.ndim == 0 or len(x) != len(y):
        raise ValueError(f"dataset {path!r}: x has {len(x) if x.ndim else 0} samples but y has {len(y)}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_):
        raise ValueError(f"dataset {path!r}: x must hold real numbers, got dtype {x.dtype}")
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes infinity, refused below
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.numel() and torch.isfinite(x).all() and x.max() > 1.0:
        x = x / x.max()  # images stored as 0..255 train better scaled to [0, 1]
    if x.dim() == 3:  # (N, H, W) grayscale images
        x = x.unsqueeze(1)
    return x, torch.from_numpy(y.astype(np.int64))


def _image_folder(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One subfolder per class (sorted names give labels 0, 1, ...); every image resized to the first one's size;
    grayscale unless some image has colour."""
    from PIL import Image  # installed with matplotlib

    classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    files = [(os.path.join(path, name, file), label) for label, name in enumerate(classes)
             for file in sorted(os.listdir(os.path.join(path, name))) if file.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise ValueError(f"dataset {path!r} holds no images in class subfolders")
    images = []
    for file, _ in files:
        try:
            with Image.open(file) as image:
                image.load()  # decodes now, so a truncated or damaged file fails here, by name
                images.append(image.copy())
        except Exception as error:  # PIL raises many types for a damaged image
            raise ValueError(f"dataset {path!r}: cannot read image {file!r} ({type(error).__name__}: "
                             f"{first_line(error)})") from None
    mode = "L" if all(image.mode in ("1", "L", "I", "I;16", "F") for image in images) else "RGB"
    size = images[0].size
    arrays = [np.asarray(image.convert(mode).resize(size), dtype=np.float32) / 255.0 for image in images]
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if mode == "L" else x.permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([label for _, label in files], dtype=torch.int64)
