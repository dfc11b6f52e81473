"""Dataset parsers, an image dataset, transforms and an identity-balanced sampler.

Parsers follow FastReID's conventions (``fastreid/data/datasets/*.py``): cameras are
0-based, junk images (pid -1) are dropped, Market-1501 distractors (pid 0) stay in
the gallery, and training pids are relabelled to ``0..N-1``.  Unlike FastReID, they
never skip a badly named file silently: they raise an error naming it.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

__all__ = [
    "Sample",
    "ReIDSplits",
    "RetrievalSplits",
    "default_market1501_root",
    "parse_market1501",
    "parse_veri776",
    "parse_msmt17",
    "parse_sop",
    "ImageDataset",
    "build_transforms",
    "PKSampler",
    "subset_by_identities",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


@dataclass(frozen=True)
class Sample:
    """One image: its path, identity / class label and 0-based camera (-1 when unknown)."""

    path: str
    pid: int
    camid: int


def _num_ids(samples: Sequence[Sample]) -> int:
    return len({s.pid for s in samples})


def _num_cams(samples: Sequence[Sample]) -> int:
    return len({s.camid for s in samples})


@dataclass(frozen=True)
class ReIDSplits:
    """Train / query / gallery samples of a re-ID dataset (train pids are ``0..num_train_pids-1``)."""

    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    name: str = field(default="", compare=False)

    @property
    def num_train_pids(self) -> int:
        return _num_ids(self.train)

    @property
    def num_train_cams(self) -> int:
        return _num_cams(self.train)

    def summary(self) -> str:
        """A small table: ids, images and cameras per split."""
        rows = [("train", self.train), ("query", self.query), ("gallery", self.gallery)]
        lines = [f"{self.name or 'dataset'}: subset | # ids | # images | # cameras"]
        lines += [f"  {n:7s} | {_num_ids(s):5d} | {len(s):8d} | {_num_cams(s):3d}" for n, s in rows]
        return "\n".join(lines)


@dataclass(frozen=True)
class RetrievalSplits:
    """Train / test samples of an image-retrieval dataset (camid is -1)."""

    train: list[Sample]
    test: list[Sample]

    @property
    def num_train_classes(self) -> int:
        return _num_ids(self.train)


# --------------------------------------------------------------------------- helpers


def default_market1501_root() -> Path:
    """``$CDD_MARKET1501`` or ``<project root>/../shared/data/Market-1501-v15.09.15``."""
    project_root = Path(__file__).resolve().parents[1]
    default = project_root.parent / "shared" / "data" / "Market-1501-v15.09.15"
    return Path(os.environ.get("CDD_MARKET1501", str(default)))


def _require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: '{path}'. Expected layout:\n{layout}")
    return path


def _find_root(root: str | os.PathLike, required: Sequence[str], aliases: Sequence[str], layout: str, name: str) -> Path:
    """Return ``root`` or ``root/<alias>`` -- the first one that contains all ``required`` entries."""
    root = Path(root).expanduser()
    _require_dir(root, f"{name} root", layout)
    for cand in [root, *(root / a for a in aliases)]:
        if all((cand / r).exists() for r in required):
            return cand
    missing = [r for r in required if not (root / r).exists()]
    raise FileNotFoundError(
        f"{name}: '{root}' lacks {', '.join(missing)} (also looked in sub-folders {', '.join(aliases)}). "
        f"Expected layout:\n{layout}"
    )


def _image_files(folder: Path) -> list[Path]:
    """Image files of ``folder`` sorted by name; other files (e.g. ``Thumbs.db``) are ignored."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _relabel(samples: list[Sample]) -> list[Sample]:
    """Map pids to ``0..N-1`` in increasing order of the original pid."""
    mapping = {pid: i for i, pid in enumerate(sorted({s.pid for s in samples}))}
    return [Sample(s.path, mapping[s.pid], s.camid) for s in samples]


def _nonempty(samples: list[Sample], split: str, where: Path | str) -> list[Sample]:
    if not samples:
        raise ValueError(f"the {split} split is empty (no usable images found in '{where}')")
    return samples


# --------------------------------------------------------------------------- Market-1501

_MARKET_LAYOUT = """  <root>/bounding_box_train/0002_c1s1_000451_03.jpg ...
  <root>/query/0001_c1s1_001051_00.jpg ...
  <root>/bounding_box_test/0000_c1s1_000151_01.jpg, -1_c1s1_000401_03.jpg ...
(root may also be the folder that contains Market-1501-v15.09.15/)"""
# PPPP_cCsS_FFFFFF_BB.jpg; the official release contains a few "*.jpg.jpg" names, accepted like FastReID does.
_MARKET_RE = re.compile(r"^(-1|\d+)_c(\d)s(\d+)_(\d+)_(\d+)(?:\.jpg)?\.jpg$")
_MARKET_PATTERN = "PPPP_cCsS_FFFFFF_BB.jpg (pid, camera 1-6, sequence, frame, box), pid -1 = junk, 0 = distractor"


def _parse_market_dir(folder: Path, is_train: bool) -> list[Sample]:
    samples = []
    for path in _image_files(folder):
        m = _MARKET_RE.match(path.name)
        if m is None:
            raise ValueError(f"unexpected Market-1501 file name '{path}': expected {_MARKET_PATTERN}")
        pid, cam = int(m.group(1)), int(m.group(2))
        if not (-1 <= pid <= 1501 and 1 <= cam <= 6):
            raise ValueError(f"Market-1501 file '{path}' has pid {pid} / camera {cam} outside -1..1501 / 1..6")
        if pid == -1 or (is_train and pid == 0):
            continue  # junk everywhere; distractors are only meaningful in the gallery
        samples.append(Sample(str(path), pid, cam - 1))
    return _nonempty(samples, f"Market-1501 {folder.name}", folder)


def parse_market1501(root: str | os.PathLike | None = None) -> ReIDSplits:
    """Parse Market-1501 (``bounding_box_train``, ``query``, ``bounding_box_test``).

    Junk images (pid -1) are dropped everywhere; distractors (pid 0) are kept in the
    gallery (FastReID keeps them too).  Train pids are relabelled to ``0..750``;
    query/gallery keep the original pids.  Cameras are 0-based.  ``root=None`` uses
    :func:`default_market1501_root`.
    """
    root = default_market1501_root() if root is None else root
    base = _find_root(
        root, ["bounding_box_train", "query", "bounding_box_test"], ["Market-1501-v15.09.15"], _MARKET_LAYOUT, "Market-1501"
    )
    return ReIDSplits(
        train=_relabel(_parse_market_dir(base / "bounding_box_train", True)),
        query=_parse_market_dir(base / "query", False),
        gallery=_parse_market_dir(base / "bounding_box_test", False),
        name="Market-1501",
    )


# --------------------------------------------------------------------------- VeRi-776

_VERI_LAYOUT = """  <root>/image_train/0001_c001_00016450_0.jpg ...
  <root>/image_query/0002_c002_00030600_0.jpg ...
  <root>/image_test/0002_c002_00030605_1.jpg ...
(root may also be the folder that contains VeRi/ or veri/)"""
_VERI_RE = re.compile(r"^(\d+)_c(\d{3})_(\d+)_(\d+)\.jpg$")
_VERI_PATTERN = "VVVV_cCCC_FFFFFFFF_N.jpg (vehicle id, camera c001-c020, frame, index)"


def _parse_veri_dir(folder: Path) -> list[Sample]:
    samples = []
    for path in _image_files(folder):
        m = _VERI_RE.match(path.name)
        if m is None:
            raise ValueError(f"unexpected VeRi-776 file name '{path}': expected {_VERI_PATTERN}")
        pid, cam = int(m.group(1)), int(m.group(2))
        if not 1 <= cam <= 20:
            raise ValueError(f"VeRi-776 file '{path}' has camera c{cam:03d}; expected c001..c020")
        samples.append(Sample(str(path), pid, cam - 1))
    return _nonempty(samples, f"VeRi-776 {folder.name}", folder)


def parse_veri776(root: str | os.PathLike) -> ReIDSplits:
    """Parse VeRi-776 (``image_train``, ``image_query``, ``image_test``); train pids relabelled, cameras 0-based."""
    base = _find_root(root, ["image_train", "image_query", "image_test"], ["VeRi", "veri"], _VERI_LAYOUT, "VeRi-776")
    return ReIDSplits(
        train=_relabel(_parse_veri_dir(base / "image_train")),
        query=_parse_veri_dir(base / "image_query"),
        gallery=_parse_veri_dir(base / "image_test"),
        name="VeRi-776",
    )


# --------------------------------------------------------------------------- MSMT17

_MSMT_LAYOUT = """  <root>/train/0000/0000_000_01_0303morning_0015_0.jpg ...   (V2: mask_train_v2/)
  <root>/test/0000/0000_000_01_0303morning_0035_0.jpg ...     (V2: mask_test_v2/)
  <root>/list_train.txt, list_val.txt, list_query.txt, list_gallery.txt  (lines 'relative/path.jpg pid')
(root may also be the folder that contains MSMT17_V1/ or MSMT17_V2/)"""
_MSMT_DIRS = (("train", "test"), ("mask_train_v2", "mask_test_v2"))


def _parse_msmt_list(list_path: Path, image_dir: Path, check_files: bool) -> list[Sample]:
    if not list_path.is_file():
        raise FileNotFoundError(f"MSMT17 list file not found: '{list_path}'. Expected layout:\n{_MSMT_LAYOUT}")
    samples = []
    with open(list_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            fields = Path(parts[0]).name.split("_") if parts else []
            if len(parts) != 2 or len(fields) < 3 or not parts[1].lstrip("-").isdigit() or not fields[2].isdigit():
                raise ValueError(
                    f"{list_path}:{lineno}: malformed line {line.rstrip()!r}; expected 'PPPP/PPPP_NNN_CC_....jpg <pid>' "
                    "where CC (third '_' field of the file name) is the 1-based camera"
                )
            cam = int(fields[2])
            if cam < 1:
                raise ValueError(f"{list_path}:{lineno}: camera {cam} in {parts[0]!r} is not 1-based")
            path = image_dir / parts[0]
            if check_files and not path.is_file():
                raise FileNotFoundError(
                    f"{list_path}:{lineno}: listed image '{path}' does not exist; re-extract the dataset"
                )
            samples.append(Sample(str(path), int(parts[1]), cam - 1))
    return _nonempty(samples, f"MSMT17 {list_path.stem}", list_path)


def parse_msmt17(root: str | os.PathLike, *, include_val: bool = False, check_files: bool = True) -> ReIDSplits:
    """Parse MSMT17 V1 (``train/``, ``test/``) or V2 (``mask_train_v2/``, ``mask_test_v2/``) with its list files.

    Pids come from the list files, cameras from the third ``_`` field of the file
    name (1-based there, 0-based here).  As in FastReID, query/gallery pids are
    shifted by the number of train pids, and ``list_val.txt`` is only added to train
    when ``include_val=True``.  Every listed image must exist (``check_files``).
    """
    root = Path(root).expanduser()
    _require_dir(root, "MSMT17 root", _MSMT_LAYOUT)
    for cand in (root, root / "MSMT17_V1", root / "MSMT17_V2"):
        for train_dir, test_dir in _MSMT_DIRS:
            if (cand / train_dir).is_dir() and (cand / test_dir).is_dir():
                base, tr, te = cand, cand / train_dir, cand / test_dir
                break
        else:
            continue
        break
    else:
        raise FileNotFoundError(
            f"MSMT17: no train/test (or mask_train_v2/mask_test_v2) image folders under '{root}'. "
            f"Expected layout:\n{_MSMT_LAYOUT}"
        )
    train = _parse_msmt_list(base / "list_train.txt", tr, check_files)
    if include_val:
        train = train + _parse_msmt_list(base / "list_val.txt", tr, check_files)
    train = _relabel(train)
    offset = _num_ids(train)
    query = _parse_msmt_list(base / "list_query.txt", te, check_files)
    gallery = _parse_msmt_list(base / "list_gallery.txt", te, check_files)
    shift = lambda ss: [Sample(s.path, s.pid + offset, s.camid) for s in ss]  # noqa: E731
    return ReIDSplits(train=train, query=shift(query), gallery=shift(gallery), name="MSMT17")


# --------------------------------------------------------------------------- Stanford Online Products

_SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def _parse_sop_file(list_path: Path, root: Path) -> list[Sample]:
    if not list_path.is_file():
        raise FileNotFoundError(
            f"Stanford Online Products list file not found: '{list_path}'. Expected <root>/Ebay_train.txt and "
            "<root>/Ebay_test.txt (header 'image_id class_id super_class_id path') next to the class folders"
        )
    samples = []
    with open(list_path, encoding="utf-8") as fh:
        header = fh.readline().split()
        if header != _SOP_HEADER:
            raise ValueError(f"{list_path}:1: header is {header}, expected '{' '.join(_SOP_HEADER)}'")
        for lineno, line in enumerate(fh, 2):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]) or int(parts[1]) < 1:
                raise ValueError(
                    f"{list_path}:{lineno}: malformed line {line.rstrip()!r}; expected "
                    "'<image_id> <class_id >= 1> <super_class_id> <relative/path.JPG>'"
                )
            path = root / parts[3]
            if not path.is_file():
                raise FileNotFoundError(f"{list_path}:{lineno}: listed image '{path}' does not exist; re-extract the dataset")
            samples.append(Sample(str(path), int(parts[1]), -1))
    return _nonempty(samples, list_path.stem, list_path)


def parse_sop(root: str | os.PathLike) -> RetrievalSplits:
    """Parse Stanford Online Products (``Ebay_train.txt`` / ``Ebay_test.txt``, paths relative to ``root``).

    Train labels are the 1-based ``class_id`` relabelled to ``0..C-1`` (i.e. ``class_id - 1``
    on the official files); test labels are the file's ``class_id`` unchanged (only
    equality matters for Recall@K).  camid is -1.
    """
    root = Path(root).expanduser()
    _require_dir(root, "Stanford Online Products root", "  <root>/Ebay_train.txt, <root>/Ebay_test.txt, <root>/bicycle_final/...")
    return RetrievalSplits(
        train=_relabel(_parse_sop_file(root / "Ebay_train.txt", root)),
        test=_parse_sop_file(root / "Ebay_test.txt", root),
    )


# --------------------------------------------------------------------------- images


class ImageDataset(Dataset):
    """``(image, pid, camid)`` items from a list of :class:`Sample`.

    Images are loaded with PIL as RGB and passed to ``transform`` (e.g. from
    :func:`build_transforms`); with ``transform=None`` they are returned as float
    tensors ``[3, H, W]`` in [0, 1].
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        s = self.samples[index]
        try:
            with Image.open(s.path) as im:
                img = im.convert("RGB")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"image '{s.path}' does not exist; re-parse the dataset folder") from exc
        except (OSError, UnidentifiedImageError) as exc:
            raise OSError(
                f"cannot read image '{s.path}' ({exc}); the file is unreadable or truncated: "
                "re-extract the dataset or remove that file"
            ) from exc
        if self.transform is not None:
            out = self.transform(img)
        else:
            out = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return out, s.pid, s.camid


def build_transforms(size: tuple[int, int] = (256, 128), train: bool = True) -> Callable:
    """CDD/FastReID default transforms: resize to ``size`` (H, W); on train also
    horizontal flip, pad 10 + random crop and random erasing (p=0.5); ImageNet normalisation."""
    import torchvision.transforms as T

    ops: list = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        ops += [T.RandomHorizontalFlip(p=0.5), T.Pad(10), T.RandomCrop(size)]
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        ops.append(T.RandomErasing(p=0.5, value=0))
    return T.Compose(ops)


# --------------------------------------------------------------------------- sampler


class PKSampler(Sampler[list[int]]):
    """Identity-balanced batch sampler: each batch holds ``p`` distinct identities x ``k`` images.

    Use as ``DataLoader(dataset, batch_sampler=PKSampler(pids, p, k))``.  Identities
    are visited in a shuffled cycle; an identity's images are drawn without
    replacement from a shuffled queue (refilled when used up), and identities with
    fewer than ``k`` images contribute all of them plus random repeats.  An epoch has
    ``max(1, len(pids) // (p * k))`` batches and depends only on ``seed`` and the
    epoch set with :meth:`set_epoch`.
    """

    def __init__(self, pids: Sequence[int] | np.ndarray | torch.Tensor, p: int, k: int, seed: int = 0) -> None:
        if isinstance(pids, torch.Tensor):
            pids = pids.tolist()
        pids = list(np.asarray(pids).reshape(-1).tolist())
        if int(p) < 1 or int(k) < 1:
            raise ValueError(f"PKSampler needs p >= 1 and k >= 1, got p={p}, k={k}")
        self.p, self.k, self.seed, self.epoch = int(p), int(k), int(seed), 0
        index: dict = {}
        for i, pid in enumerate(pids):
            index.setdefault(pid, []).append(i)
        self._ids = sorted(index)
        self._index = [index[pid] for pid in self._ids]
        if len(self._ids) < self.p:
            raise ValueError(
                f"PKSampler: only {len(self._ids)} identities for p={self.p} identities per batch; "
                "lower p (e.g. in the config's IMS_PER_BATCH / NUM_INSTANCE) or use more training identities"
            )
        self._num_samples = len(pids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; batches are a function of ``(seed, epoch)``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return max(1, self._num_samples // (self.p * self.k))

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"PKSampler:{self.seed}:{self.epoch}")
        n_ids = len(self._ids)
        queues: list[list[int]] = [[] for _ in range(n_ids)]
        order: list[int] = []

        def take(ident: int) -> list[int]:
            items = self._index[ident]
            if len(items) < self.k:
                return rng.sample(items, len(items)) + [rng.choice(items) for _ in range(self.k - len(items))]
            q = queues[ident]
            if len(q) < self.k:
                fresh = rng.sample(items, len(items))
                # avoid repeating an image inside one batch when the queue wraps around
                fresh = [i for i in fresh if i not in q] + [i for i in fresh if i in q]
                q.extend(fresh)
            out, queues[ident] = q[: self.k], q[self.k:]
            return out

        for _ in range(len(self)):
            chosen: list[int] = []
            while len(chosen) < self.p:
                if not order:
                    order = rng.sample(range(n_ids), n_ids)
                ident = order.pop()
                if ident in chosen:  # only at a cycle boundary: defer it to later
                    order.insert(0, ident)
                    continue
                chosen.append(ident)
            batch: list[int] = []
            for ident in chosen:
                batch.extend(take(ident))
            yield batch


# --------------------------------------------------------------------------- subsets


def subset_by_identities(splits: ReIDSplits, num_ids: int, seed: int | None = 0) -> ReIDSplits:
    """A small real subset: ``num_ids`` train identities (relabelled ``0..num_ids-1``) and
    ``num_ids`` test identities (their query and gallery images; no distractors or other ids).

    Test identities are chosen among query pids that have a gallery image from another
    camera, so the subset is always evaluable.  ``seed=None`` takes the smallest pids
    instead of a random choice.
    """
    if int(num_ids) < 1:
        raise ValueError(f"num_ids must be >= 1, got {num_ids}")
    num_ids = int(num_ids)
    train_ids = sorted({s.pid for s in splits.train})
    gallery_cams: dict[int, set[int]] = {}
    for s in splits.gallery:
        gallery_cams.setdefault(s.pid, set()).add(s.camid)
    test_ids = sorted(
        {s.pid for s in splits.query if gallery_cams.get(s.pid, set()) - {s.camid}}
    )
    for what, ids in (("train", train_ids), ("evaluable test", test_ids)):
        if len(ids) < num_ids:
            raise ValueError(f"asked for {num_ids} identities but the dataset has only {len(ids)} {what} identities")
    if seed is None:
        keep_train, keep_test = set(train_ids[:num_ids]), set(test_ids[:num_ids])
    else:
        rng = random.Random(seed)
        keep_train, keep_test = set(rng.sample(train_ids, num_ids)), set(rng.sample(test_ids, num_ids))
    return ReIDSplits(
        train=_relabel([s for s in splits.train if s.pid in keep_train]),
        query=[s for s in splits.query if s.pid in keep_test],
        gallery=[s for s in splits.gallery if s.pid in keep_test],
        name=f"{splits.name} subset ({num_ids} ids)" if splits.name else f"subset ({num_ids} ids)",
    )
