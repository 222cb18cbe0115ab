"""Image datasets of ``deltatune train --task image-cls``: an image folder, a CSV of paths and labels, or
scikit-learn's digits (the default), each read into uint8 RGB tensors of one square size.

- folder: ``root/<class name>/*.png|jpg|jpeg|bmp|gif|webp``; the classes are the subfolders that hold
  at least one image (sorted by name); other subfolders and loose files are ignored.
- CSV: a header with ``path`` and ``label`` columns; relative paths are read from the CSV's folder.
- digits: ``sklearn.datasets.load_digits`` (1,797 8x8 grey digits, 0..16), drawn as dark ink on white.

Every image is converted to RGB and resized to ``size x size`` (bilinear; the aspect ratio is not kept),
so folders of mixed sizes and modes work; a file that cannot be decoded is an error naming it.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .options import RunOptions, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class ImageSplit:
    """``images``: (N, size, size, 3) uint8; ``labels``: (N,) int64 class indices."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageData:
    train: ImageSplit
    test: ImageSplit
    labels: list
    source: str


def read_image(path: str, size: int) -> torch.Tensor:
    """One image file as a (size, size, 3) uint8 tensor (RGB, bilinear resize).

    Raises:
        UsageError: the file cannot be read or decoded as an image.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.BILINEAR)
            return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UsageError(f"could not read image {path!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def folder_items(root: str) -> list[tuple[str, str]]:
    """``(path, class name)`` of every image in ``root/<class name>/``, sorted by class then file name."""
    if not os.path.isdir(root):
        raise UsageError(f"image folder {root!r} does not exist")
    items = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if os.path.isdir(folder):
            items += [(os.path.join(folder, f), name) for f in sorted(os.listdir(folder))
                      if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, f))]
    if not items:
        raise UsageError(f"image folder {root!r} has no images: expected <class name>/*.png|jpg files in it")
    return items


def csv_items(path: str) -> list[tuple[str, str]]:
    """``(path, label)`` rows of a CSV with ``path`` and ``label`` columns (paths relative to the CSV)."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            if "path" not in columns or "label" not in columns:
                raise UsageError(f"{path}: an image CSV needs 'path' and 'label' columns, found {columns}")
            rows = [(os.path.join(base, row["path"] or ""), str(row["label"] or "").strip()) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"could not read {path!r}: {exc}") from None
    empty = [i + 2 for i, (p, label) in enumerate(rows) if not label or p.endswith(os.sep)]
    if empty:
        raise UsageError(f"{path}: line {empty[0]} has an empty path or label")
    if not rows:
        raise UsageError(f"{path} has no rows")
    return rows


def items_of(path: str) -> list[tuple[str, str]]:
    """The ``(image path, label)`` pairs of ``--data``/``--test-data``: a folder or a CSV file."""
    if os.path.isdir(path):
        return folder_items(path)
    if path.lower().endswith(".csv"):
        return csv_items(path)
    raise UsageError(f"{path!r}: image data is a folder of <class name>/ subfolders or a .csv of path,label")


def load_split(items: list[tuple[str, str]], labels: list[str], size: int) -> ImageSplit:
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({label for _, label in items if label not in index})
    if unknown:
        raise UsageError(f"test labels {unknown[:5]} do not occur in the training data (labels: {labels})")
    images = torch.stack([read_image(p, size) for p, _ in items])
    return ImageSplit(images, torch.tensor([index[label] for _, label in items], dtype=torch.long))


def stratified_split(labels: list[str], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a fixed stratified split: per class, ``round(n * test_fraction)`` (at least 1 when the
    class has 2 or more examples) held out, drawn with ``seed``; a class with one example stays in train."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in sorted(set(labels)):
        members = [i for i, l in enumerate(labels) if l == label]
        order = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        k = min(len(members) - 1, max(1, round(len(members) * test_fraction))) if len(members) > 1 else 0
        test += order[:k]
        train += order[k:]
    return sorted(train), sorted(test)


def digits_images() -> tuple[torch.Tensor, list[str]]:
    """scikit-learn's digits as (1797, 8, 8, 3) uint8 images, dark ink on white, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = torch.from_numpy(255 - (digits.images * 255 / 16).round()).to(torch.uint8)  # (0..16 ink -> paper)
    return grey[..., None].expand(-1, -1, -1, 3).contiguous(), [str(int(t)) for t in digits.target]


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, h, w, 3) uint8 -> (N, size, size, 3) uint8 with PIL's bilinear resize, as :func:`read_image`."""
    from PIL import Image

    out = [Image.fromarray(a.numpy()).resize((size, size), Image.BILINEAR).tobytes() for a in images]
    return torch.frombuffer(bytearray(b"".join(out)), dtype=torch.uint8).view(len(out), size, size, 3)


def load_image_data(o: RunOptions, size: int) -> ImageData:
    """The training and held-out images of a run, resized to ``size`` (see the module docstring).

    Raises:
        UsageError: no images, fewer than two classes, an unreadable image or a bad CSV.
    """
    if o.data is None:
        images, names = digits_images()
        train_idx, test_idx = stratified_split(names, o.test_fraction, o.seed)
        labels = sorted(set(names))
        index = torch.tensor([labels.index(n) for n in names])
        return ImageData(ImageSplit(resize_images(images[train_idx], size), index[train_idx]),
                         ImageSplit(resize_images(images[test_idx], size), index[test_idx]),
                         labels, "scikit-learn digits (8x8)")
    items = items_of(o.data)
    labels = sorted({label for _, label in items})
    if len(labels) < 2:
        raise UsageError(f"{o.data!r} has a single class ({labels[0]!r}): classification needs at least 2")
    if o.test_data is not None:
        train_items, test_items = items, items_of(o.test_data)
    else:
        train_idx, test_idx = stratified_split([label for _, label in items], o.test_fraction, o.seed)
        if not test_idx:
            raise UsageError(f"{o.data!r} is too small to hold out a test split: give --test-data")
        train_items, test_items = [items[i] for i in train_idx], [items[i] for i in test_idx]
    return ImageData(load_split(train_items, labels, size), load_split(test_items, labels, size), labels,
                     str(Path(o.data)))
