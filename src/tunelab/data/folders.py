"""Class folders on disk: the one scan every folder source (image folders, audio folders, the
spoken digits) goes through, so they all read a folder the same way.

A folder's examples are the files it really holds, each counted once with the label of the class
folder it lives in. Links are where that breaks: a link to an ancestor is a loop (torchvision's
``os.walk(followlinks=True)`` turned 16 images into 656, relabelled and leaking across splits),
a link to a sibling class puts one image under two labels, and a link out of the root reads
data nobody pointed tunelab at. So links to folders are never followed (inside the root, their
files are counted where they really are), links to files inside the root count only when their
file is not counted already, links out of the root are refused, and the scan stops after
``max_entries`` directory entries with a line saying how to raise it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tunelab.data.table import first_few, is_inside
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
# ImageNet (1.3 M files) fits; a root set to / by mistake stops within seconds, not minutes.
MAX_ENTRIES = 5_000_000


@dataclass
class ClassFiles:
    root: Path  # the folder as given (not resolved), so paths read as the user wrote them
    classes: list[str]
    paths: list[str]
    labels: np.ndarray


@dataclass
class _Found:
    folder: str
    name: str
    label: int
    link: bool  # reached through a link: a duplicate when the file is also counted where it is

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.name)


def scan_class_folders(root: str, extensions: Sequence[str], max_entries: int = MAX_ENTRIES) -> ClassFiles:
    """One sub-folder per class (sorted names) of files with ``extensions``, in torchvision's
    ``ImageFolder`` order, each real file once; see the module docstring for links."""
    base = Path(root).expanduser().absolute()
    if not base.is_dir():
        raise TunelabError(f"data.source.root: folder {base} does not exist. Point it at a folder with one "
                           "sub-folder per class.")
    real_base = os.path.realpath(base)
    suffixes = tuple(e.lower() for e in extensions)
    classes = sorted(entry.name for entry in _entries(str(base), base) if entry.is_dir())
    if not classes:
        raise TunelabError(f"data.source.root={base}: Couldn't find any class folder in {base}. (expected: one "
                           "sub-folder per class, holding that class's files).")
    for name in classes:
        _check_class_folder(base / name, real_base)
    walk = _Walk(real_base, suffixes, max_entries, base)
    for label, name in enumerate(classes):
        walk.scan(base / name, label)
    found = walk.deduplicated()
    empty = [name for label, name in enumerate(classes) if not any(f.label == label for f in found)]
    if empty:
        raise TunelabError(f"data.source.root={base}: Found no valid file for the classes {first_few(empty, 5)}. "
                           f"(expected: one sub-folder per class, holding that class's files: no {'/'.join(suffixes)} "
                           "files in class sub-folders).")
    return ClassFiles(base, classes, [f.path for f in found], np.array([f.label for f in found], dtype=np.int64))


def _entries(folder: str, base: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as err:  # os.walk skipped these silently: a class would lose its files unseen
        raise TunelabError(f"data.source.root={base}: cannot list {folder}: {err.strerror}.") from None


def _check_class_folder(folder: Path, real_base: str) -> None:
    """A class folder that is a link holds either data outside the root or another class's files."""
    if not folder.is_symlink():
        return
    target = os.path.realpath(folder)
    inside = is_inside(target, real_base)
    where = "inside the root, so its files would count twice" if inside else "outside the root"
    raise TunelabError(f"data.source.root: class folder {folder} is a link to {target}, {where}. Replace the link "
                       "with a real folder, or list the files in a table (data=image_csv / data=audio_csv).")


class _Walk:
    """Every file below the class folders, without following folder links, bounded."""

    def __init__(self, real_base: str, suffixes: tuple[str, ...], max_entries: int, base: Path):
        self.real_base, self.suffixes, self.max_entries, self.base = real_base, suffixes, max_entries, base
        self.visited = 0
        self.found: list[_Found] = []
        self.skipped: list[str] = []  # links not followed: "link -> target"

    def scan(self, folder: Path, label: int) -> None:
        stack = [str(folder)]
        while stack:
            current = stack.pop()
            for entry in _entries(current, self.base):
                self._count()
                if entry.is_symlink():
                    self._link(entry, current, label)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.name.lower().endswith(self.suffixes) and entry.is_file(follow_symlinks=False):
                    self.found.append(_Found(current, entry.name, label, link=False))

    def _count(self) -> None:
        self.visited += 1
        if self.visited > self.max_entries:
            raise TunelabError(f"data.source.root={self.base}: stopped scanning after data.source.max_entries="
                               f"{self.max_entries} files and folders. Point data.source.root at the data set's "
                               "own folder, or raise the bound for a larger data set (+data.source.max_entries=N).")

    def _link(self, entry: os.DirEntry, current: str, label: int) -> None:
        is_dir = entry.is_dir()  # follows the link: a link to a folder, or a file (or a broken link)
        if not is_dir and not entry.name.lower().endswith(self.suffixes):
            return  # not data (notes.txt -> ...): never read, whatever it points at
        target = os.path.realpath(entry.path)
        if not is_inside(target, self.real_base):
            raise TunelabError(f"data.source.root={self.base}: {entry.path} is a link to {target}, outside the "
                               "root. Copy the data in, or list the files in a table (data=image_csv / "
                               "data=audio_csv).")
        if is_dir:
            self.skipped.append(f"{entry.path} -> {target}")
        else:
            self.found.append(_Found(current, entry.name, label, link=True))

    def deduplicated(self) -> list[_Found]:
        """Each real file once, in torchvision's order: where it is rather than through a link,
        else through its first link."""
        in_order = sorted(self.found, key=lambda f: (f.label, f.folder, f.name))
        kept: dict[str, _Found] = {}  # real path -> the entry that counts
        for found in sorted(in_order, key=lambda f: f.link):  # files where they are first, then links
            real = os.path.realpath(found.path) if found.link else self.real_base + found.path[len(str(self.base)):]
            if real in kept:
                self.skipped.append(f"{found.path} -> {real}")
            else:
                kept[real] = found
        if self.skipped:
            log.warning("data.source.root=%s: %d link(s) not followed: each file counts once, with the class folder "
                        "it really is in (%s)", self.base, len(self.skipped), first_few(self.skipped, 2))
        counted = {id(found) for found in kept.values()}
        return [found for found in in_order if id(found) in counted]
