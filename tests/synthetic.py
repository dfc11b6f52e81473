"""Small, redistributable image sets that the frameworks' own loaders read, drawn by the tests.

``write_market1501`` lays out a re-ID set exactly like Market-1501 (``bounding_box_train``,
``query``, ``bounding_box_test``, files ``PPPP_cCsS_FFFFFF_BB.jpg``, distractors ``0000_*`` and
junk ``-1_*`` in the gallery); ``write_sop`` lays out Stanford Online Products (``Ebay_train.txt``,
``Ebay_test.txt``, one folder per class). Every image is a real JPEG of a procedurally drawn
"person": an identity is a fixed combination of shirt / trouser colours, a shirt pattern, skin
and hair tones and an optional bag; a camera adds its own background, light level and colour
cast; every shot moves, scales and poses the figure a little and adds noise. Identities are
therefore learnable (a few training iterations already separate them) and cameras matter, which
is what the re-ID protocol exercises. Everything is a function of the seed.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

MARKET_DIRNAME = "Market-1501-v15.09.15"
HEIGHT, WIDTH = 128, 64


@dataclass(frozen=True)
class Identity:
    shirt: Tuple[int, int, int]
    trousers: Tuple[int, int, int]
    pattern: str            # "plain" | "hstripes" | "vstripes" | "check"
    pattern_color: Tuple[int, int, int]
    skin: Tuple[int, int, int]
    hair: Tuple[int, int, int]
    bag: int                # 0 none, 1 left, 2 right


def _color(rng: random.Random) -> Tuple[int, int, int]:
    return tuple(rng.randint(20, 235) for _ in range(3))


def identity(pid: int, seed: int = 0) -> Identity:
    rng = random.Random(f"identity:{seed}:{pid}")
    return Identity(shirt=_color(rng), trousers=_color(rng),
                    pattern=rng.choice(["plain", "hstripes", "vstripes", "check"]), pattern_color=_color(rng),
                    skin=tuple(rng.randint(120, 230) for _ in range(3)), hair=tuple(rng.randint(10, 120) for _ in range(3)),
                    bag=rng.randint(0, 2))


def _camera(cam: int, seed: int) -> Dict[str, object]:
    rng = random.Random(f"camera:{seed}:{cam}")
    return {"background": _color(rng), "texture": rng.randint(0, 2), "light": rng.uniform(0.7, 1.2),
            "cast": np.array([rng.uniform(0.85, 1.15) for _ in range(3)])}


def draw(ident: Identity, cam: int, shot: int, seed: int = 0, size: Tuple[int, int] = (HEIGHT, WIDTH)) -> Image.Image:
    """One shot of ``ident`` by camera ``cam`` (an RGB image of ``size`` = (H, W))."""
    rng = random.Random(f"shot:{seed}:{cam}:{shot}:{ident}")
    cam_p = _camera(cam, seed)
    h, w = HEIGHT, WIDTH
    img = Image.new("RGB", (w, h), cam_p["background"])
    d = ImageDraw.Draw(img)
    bg = np.array(cam_p["background"])
    if cam_p["texture"] == 1:  # floor line
        d.rectangle([0, int(h * 0.8), w, h], fill=tuple(int(v) for v in np.clip(bg * 0.6, 0, 255)))
    elif cam_p["texture"] == 2:  # wall tiles
        for x in range(0, w, 12):
            d.line([x, 0, x, h], fill=tuple(int(v) for v in np.clip(bg * 0.8, 0, 255)))
    cx = w // 2 + rng.randint(-5, 5)
    top = rng.randint(2, 10)
    s = rng.uniform(0.85, 1.05)
    head_r = int(9 * s)
    torso_h, legs_h = int(44 * s), int(50 * s)
    torso_w = int(26 * s)
    d.ellipse([cx - head_r, top, cx + head_r, top + 2 * head_r], fill=ident.skin)
    d.chord([cx - head_r, top - 2, cx + head_r, top + head_r], 180, 360, fill=ident.hair)
    t0 = top + 2 * head_r + 1
    box = [cx - torso_w // 2, t0, cx + torso_w // 2, t0 + torso_h]
    d.rectangle(box, fill=ident.shirt)
    if ident.pattern == "hstripes":
        for y in range(t0 + 3, t0 + torso_h, 8):
            d.rectangle([box[0], y, box[2], y + 3], fill=ident.pattern_color)
    elif ident.pattern == "vstripes":
        for x in range(box[0] + 2, box[2], 7):
            d.rectangle([x, t0, x + 2, t0 + torso_h], fill=ident.pattern_color)
    elif ident.pattern == "check":
        for y in range(t0, t0 + torso_h, 10):
            for x in range(box[0], box[2], 10):
                if ((x - box[0]) // 10 + (y - t0) // 10) % 2 == 0:
                    d.rectangle([x, y, x + 5, y + 5], fill=ident.pattern_color)
    gap = rng.randint(1, 7)
    l0 = t0 + torso_h
    d.rectangle([cx - torso_w // 2 + 1, l0, cx - gap // 2, l0 + legs_h], fill=ident.trousers)
    d.rectangle([cx + gap // 2, l0, cx + torso_w // 2 - 1, l0 + legs_h], fill=ident.trousers)
    if ident.bag:
        bx = box[0] - 8 if ident.bag == 1 else box[2] + 1
        d.rectangle([bx, t0 + 12, bx + 7, t0 + 30], fill=ident.pattern_color)
    a = np.asarray(img, dtype=np.float32) * cam_p["light"] * cam_p["cast"]
    a += np.random.default_rng(zlib.crc32(repr((seed, cam, shot, ident)).encode())).normal(0, 6, a.shape)
    out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return out if (size[0], size[1]) == (h, w) else out.resize((size[1], size[0]), Image.BILINEAR)


def write_market1501(root: Path, *, train_ids: int = 8, test_ids: int = 8, train_images: int = 20,
                     gallery_images: int = 6, cameras: int = 6, distractors: int = 4, junk: int = 2,
                     seed: int = 0) -> Path:
    """A Market-1501 folder at ``root`` (named ``Market-1501-v15.09.15`` by the callers that need it).

    Training identities are numbered 2, 4, ... and test identities continue after them (Market-1501
    never shares identities between the splits). Every test identity has two query images from two
    cameras and ``gallery_images`` gallery images from all cameras, so each query has a match from
    another camera. Returns ``root``."""
    root = Path(root)
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"market:{seed}")
    frame = 0

    def save(folder: str, pid: int, cam: int, shot: int, image_pid: int) -> None:
        nonlocal frame
        frame += 1
        name = f"{'-1' if pid < 0 else f'{pid:04d}'}_c{cam + 1}s1_{frame:06d}_{rng.randint(0, 9):02d}.jpg"
        draw(identity(image_pid, seed), cam, shot, seed).save(root / folder / name, quality=90)

    for i in range(train_ids):
        pid = 2 * (i + 1)
        for shot in range(train_images):
            save("bounding_box_train", pid, shot % cameras, shot, pid)
    for i in range(test_ids):
        pid = 2 * (train_ids + i + 1)
        q_cams = rng.sample(range(cameras), 2)
        for j, cam in enumerate(q_cams):
            save("query", pid, cam, 1000 + j, pid)
        for shot in range(gallery_images):
            save("bounding_box_test", pid, shot % cameras, 2000 + shot, pid)
    for k in range(distractors):
        save("bounding_box_test", 0, k % cameras, 3000 + k, 100000 + k)
    for k in range(junk):
        save("bounding_box_test", -1, k % cameras, 4000 + k, 200000 + k)
    return root


def write_sop(root: Path, *, train_classes: int = 6, test_classes: int = 6, per_class: int = 4,
              seed: int = 0) -> Path:
    """A Stanford Online Products folder at ``root``: ``Ebay_train.txt`` / ``Ebay_test.txt`` (``image_id
    class_id super_class_id path``) and one folder per class with ``per_class`` JPEGs."""
    root = Path(root)
    lines: Dict[str, List[str]] = {"train": [], "test": []}
    n = 0
    for c in range(train_classes + test_classes):
        folder = root / f"item{c:04d}_final"
        folder.mkdir(parents=True, exist_ok=True)
        split = "train" if c < train_classes else "test"
        for shot in range(per_class):
            n += 1
            path = folder / f"{c:04d}_{shot}.JPG"
            draw(identity(5000 + c, seed), shot % 3, shot, seed).save(path, format="JPEG", quality=90)
            lines[split].append(f"{n} {c + 1} {c % 2 + 1} {path.relative_to(root)}")
    for split in ("train", "test"):
        (root / f"Ebay_{split}.txt").write_text("image_id class_id super_class_id path\n" + "\n".join(lines[split])
                                                + "\n")
    return root
