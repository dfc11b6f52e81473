"""Dataset parsers, ImageDataset, transforms, PKSampler and subsets.

Market-1501 is parsed from the real data; VeRi-776, MSMT17 and SOP from tiny
fixtures written in their real on-disk formats.  Where FastReID ships a parser,
its own output on the same folder is the reference (run in a subprocess because
``fastreid.data.__init__`` no longer imports on torch 2.x).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cdd_plugin.datasets import (
    ImageDataset,
    PKSampler,
    ReIDSplits,
    Sample,
    build_transforms,
    default_market1501_root,
    parse_market1501,
    parse_msmt17,
    parse_sop,
    parse_veri776,
    subset_by_identities,
)
from cdd_plugin.evaluation import evaluate_reid

# --------------------------------------------------------------------------- helpers

_JPEG_CACHE: dict[tuple[int, int, int], bytes] = {}


def _write_jpeg(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """Write a tiny real 8x16 JPEG (solid colour)."""
    if color not in _JPEG_CACHE:
        buf = io.BytesIO()
        Image.new("RGB", (8, 16), color).save(buf, format="JPEG")
        _JPEG_CACHE[color] = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_JPEG_CACHE[color])
    return path


_FASTREID_PARSER = r"""
import json, os, sys, types, warnings
warnings.simplefilter("ignore")
import fastreid
# fastreid/data/__init__.py imports torch._six (gone in torch 2.x); load the datasets
# sub-package directly from its real source folder instead.
pkg = types.ModuleType("fastreid.data")
pkg.__path__ = [os.path.join(os.path.dirname(fastreid.__file__), "data")]
sys.modules["fastreid.data"] = pkg
import fastreid.data.datasets as D
ds = getattr(D, sys.argv[1])(root=sys.argv[2])
print(json.dumps({k: [list(x) for x in getattr(ds, k)] for k in ("train", "query", "gallery")}))
"""


def _fastreid_parse(cls_name: str, root: Path) -> dict[str, list[tuple[str, object, object]]]:
    """Run FastReID's own dataset class on ``root``; returns its (path, pid, camid) lists."""
    pytest.importorskip("fastreid")
    out = subprocess.run(
        [sys.executable, "-c", _FASTREID_PARSER, cls_name, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"FastReID's {cls_name} parser failed:\n{out.stderr[-3000:]}"
    return {k: [tuple(x) for x in v] for k, v in json.loads(out.stdout).items()}


def _strip_prefix(value: object) -> int:
    """FastReID names train labels 'market1501_12'; keep the number."""
    return int(str(value).rsplit("_", 1)[-1])


def _triples(samples: list[Sample]) -> Counter:
    return Counter((os.path.realpath(s.path), s.pid, s.camid) for s in samples)


# --------------------------------------------------------------------------- real Market-1501


@pytest.fixture(scope="module")
def market_root() -> Path:
    root = default_market1501_root()
    if not (root / "bounding_box_train").is_dir():
        msg = (
            f"Market-1501 not found at '{root}' (an extra on the real benchmark; every behaviour is also tested on "
            "generated data). Put the extracted Market-1501-v15.09.15 folder there or set CDD_MARKET1501 to its "
            "path; CDD_REQUIRE_MARKET1501=1 turns this skip into a failure."
        )
        if os.environ.get("CDD_REQUIRE_MARKET1501", "") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="module")
def market(market_root: Path) -> ReIDSplits:
    return parse_market1501(market_root)


def test_market1501_real_counts(market: ReIDSplits) -> None:
    assert len(market.train) == 12936
    assert market.num_train_pids == 751
    assert sorted({s.pid for s in market.train}) == list(range(751))
    assert market.num_train_cams == 6
    assert sorted({s.camid for s in market.train}) == list(range(6))
    assert len(market.query) == 3368
    assert len({s.pid for s in market.query}) == 750
    assert all(s.pid > 0 for s in market.query)
    # gallery: 19,732 files minus 3,819 junk (-1); the 2,798 distractors (pid 0) stay
    assert all(s.pid != -1 for s in market.gallery)
    assert sum(s.pid == 0 for s in market.gallery) == 2798
    # the official release has a few "*.jpg.jpg" names; they are real images and must be kept
    assert any(s.path.endswith(".jpg.jpg") for s in market.gallery)


def test_market1501_matches_fastreid_parser(market: ReIDSplits, market_root: Path) -> None:
    ref = _fastreid_parse("Market1501", market_root.parent)
    assert len(market.gallery) == len(ref["gallery"]) == 15913
    assert _triples(market.query) == Counter((os.path.realpath(p), pid, cam) for p, pid, cam in ref["query"])
    assert _triples(market.gallery) == Counter((os.path.realpath(p), pid, cam) for p, pid, cam in ref["gallery"])
    # train: same images and cameras; our pids are FastReID's original pids relabelled in order
    ref_train = {os.path.realpath(p): (_strip_prefix(pid), _strip_prefix(cam)) for p, pid, cam in ref["train"]}
    assert len(ref_train) == len(market.train)
    orig = sorted({pid for pid, _ in ref_train.values()})
    relabel = {pid: i for i, pid in enumerate(orig)}
    for s in market.train:
        pid, cam = ref_train[os.path.realpath(s.path)]
        assert (s.pid, s.camid) == (relabel[pid], cam)


def test_market1501_accepts_parent_folder_like_fastreid(market_root: Path, market: ReIDSplits) -> None:
    again = parse_market1501(str(market_root.parent))
    assert len(again.query) == len(market.query) and len(again.gallery) == len(market.gallery)


def test_subset_by_identities_on_real_market(market: ReIDSplits) -> None:
    sub = subset_by_identities(market, 6, seed=3)
    assert sorted({s.pid for s in sub.train}) == list(range(6))
    q_ids = {s.pid for s in sub.query}
    assert len(q_ids) == 6 and {s.pid for s in sub.gallery} == q_ids  # no distractors, no other ids
    assert 0 not in q_ids
    assert subset_by_identities(market, 6, seed=3) == sub  # deterministic
    assert subset_by_identities(market, 6, seed=4).query != sub.query
    first = subset_by_identities(market, 4, seed=None)
    assert {s.pid for s in first.query} == set(sorted({s.pid for s in market.query})[:4])
    # the subset is evaluable with the real protocol: perfect distances give mAP 1
    q = np.array([s.pid for s in sub.query])
    g = np.array([s.pid for s in sub.gallery])
    dist = (q[:, None] != g[None, :]).astype(np.float32)
    res = evaluate_reid(dist, q, g, [s.camid for s in sub.query], [s.camid for s in sub.gallery])
    assert res["mAP"] == pytest.approx(1.0) and res["num_valid_queries"] == len(sub.query)
    with pytest.raises(ValueError, match="only 751 train identities"):
        subset_by_identities(market, 800)


def test_default_market_root_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CDD_MARKET1501", str(tmp_path))
    assert default_market1501_root() == tmp_path
    monkeypatch.delenv("CDD_MARKET1501")
    expected = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Market-1501-v15.09.15"
    assert default_market1501_root() == expected


# --------------------------------------------------------------------------- Market-like fixture


def _fake_market(root: Path) -> Path:
    train = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c6s2_000101_01.jpg",
             "0000_c3s1_000001_01.jpg", "-1_c3s1_000002_01.jpg"]  # distractor and junk: dropped from train
    for name in train:
        _write_jpeg(root / "bounding_box_train" / name)
    _write_jpeg(root / "query" / "0003_c1s1_001051_00.jpg")
    for name in ["0003_c2s1_000151_01.jpg", "0000_c1s1_000151_01.jpg", "-1_c1s1_000401_03.jpg", "0003_c3s1_1_01.jpg.jpg"]:
        _write_jpeg(root / "bounding_box_test" / name)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    return root


def test_market1501_fixture_junk_distractors_and_relabel(tmp_path: Path) -> None:
    sp = parse_market1501(_fake_market(tmp_path / "m"))
    assert [(Path(s.path).name, s.pid, s.camid) for s in sp.train] == [
        ("0002_c1s1_000451_03.jpg", 0, 0),
        ("0002_c2s1_000551_01.jpg", 0, 1),
        ("0007_c6s2_000101_01.jpg", 1, 5),
    ]
    assert [(s.pid, s.camid) for s in sp.query] == [(3, 0)]
    assert sorted((s.pid, s.camid) for s in sp.gallery) == [(0, 0), (3, 1), (3, 2)]  # junk dropped, Thumbs.db ignored


def test_market1501_missing_folder_names_it(tmp_path: Path) -> None:
    root = _fake_market(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        parse_market1501(tmp_path / "does_not_exist")
    (root / "query" / "0003_c1s1_001051_00.jpg").unlink()
    (root / "query").rmdir()
    with pytest.raises(FileNotFoundError, match=r"lacks query.*Expected layout"):
        parse_market1501(root)


def test_market1501_bad_file_name_is_an_error(tmp_path: Path) -> None:
    root = _fake_market(tmp_path / "m")
    _write_jpeg(root / "query" / "person3_cam1.jpg")
    with pytest.raises(ValueError, match=r"person3_cam1\.jpg.*PPPP_cCsS_FFFFFF_BB\.jpg"):
        parse_market1501(root)


def test_market1501_empty_split_is_an_error(tmp_path: Path) -> None:
    root = _fake_market(tmp_path / "m")
    for p in (root / "bounding_box_train").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match="bounding_box_train split is empty"):
        parse_market1501(root)


# --------------------------------------------------------------------------- VeRi-776


def _fake_veri(root: Path) -> Path:
    names = {
        "image_train": ["0001_c001_00016450_0.jpg", "0001_c002_00016460_1.jpg", "0005_c013_00000010_0.jpg"],
        "image_query": ["0002_c002_00030600_0.jpg", "0010_c020_00000100_0.jpg"],
        "image_test": ["0002_c003_00030605_1.jpg", "0002_c002_00030610_0.jpg", "0010_c019_00000111_0.jpg"],
    }
    for sub, files in names.items():
        for name in files:
            _write_jpeg(root / "veri" / sub / name, (20, 200, 20))
    return root


def test_veri776_fixture_matches_fastreid(tmp_path: Path) -> None:
    root = _fake_veri(tmp_path)
    sp = parse_veri776(root)  # finds the veri/ sub-folder like FastReID
    assert [(s.pid, s.camid) for s in sp.train] == [(0, 0), (0, 1), (1, 12)]
    assert [(s.pid, s.camid) for s in sp.query] == [(2, 1), (10, 19)]
    assert sp.num_train_pids == 2 and sp.num_train_cams == 3
    ref = _fastreid_parse("VeRi", root)
    for split in ("query", "gallery"):
        assert _triples(getattr(sp, split)) == Counter((os.path.realpath(p), pid, c) for p, pid, c in ref[split])
    assert sorted((Path(s.path).name, s.camid) for s in sp.train) == sorted(
        (Path(p).name, _strip_prefix(c)) for p, _, c in ref["train"]
    )
    assert parse_veri776(root / "veri") == sp


def test_veri776_bad_name_and_missing_folder(tmp_path: Path) -> None:
    root = _fake_veri(tmp_path)
    _write_jpeg(root / "veri" / "image_test" / "0002_c2_00030605_1.jpg")  # camera must be cNNN
    with pytest.raises(ValueError, match=r"0002_c2_00030605_1\.jpg.*VVVV_cCCC"):
        parse_veri776(root)
    with pytest.raises(FileNotFoundError, match="image_train"):
        parse_veri776(tmp_path / "veri" / "image_query")


# --------------------------------------------------------------------------- MSMT17

_MSMT_LISTS = {
    "list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0), ("0000/0000_001_05_0303morning_0016_0.jpg", 0),
                       ("0001/0001_000_15_0303noon_0100_1.jpg", 1)],
    "list_val.txt": [("0002/0002_000_02_0303noon_0001_0.jpg", 2)],
    "list_query.txt": [("0000/0000_000_03_0303morning_0035_0.jpg", 0), ("0004/0004_000_07_0304noon_0001_0.jpg", 4)],
    "list_gallery.txt": [("0000/0000_001_11_0303morning_0036_0.jpg", 0), ("0004/0004_002_07_0304noon_0010_0.jpg", 4),
                         ("0004/0004_003_02_0304noon_0020_0.jpg", 4)],
}


def _fake_msmt(root: Path, version: str = "MSMT17_V1") -> Path:
    train_dir, test_dir = ("train", "test") if version == "MSMT17_V1" else ("mask_train_v2", "mask_test_v2")
    base = root / version
    for list_name, rows in _MSMT_LISTS.items():
        image_dir = base / (test_dir if list_name in ("list_query.txt", "list_gallery.txt") else train_dir)
        for rel, _ in rows:
            _write_jpeg(image_dir / rel, (30, 30, 220))
        (base / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid in rows))
    return root


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt17_fixture_matches_fastreid(tmp_path: Path, version: str) -> None:
    root = _fake_msmt(tmp_path, version)
    sp = parse_msmt17(root)
    assert [(s.pid, s.camid) for s in sp.train] == [(0, 0), (0, 4), (1, 14)]
    # as in FastReID, test pids are shifted by the number of train pids (2)
    assert [(s.pid, s.camid) for s in sp.query] == [(2, 2), (6, 6)]
    assert [(s.pid, s.camid) for s in sp.gallery] == [(2, 10), (6, 6), (6, 1)]
    ref = _fastreid_parse("MSMT17", root)
    for split in ("query", "gallery"):
        assert [(os.path.realpath(s.path), s.pid, s.camid) for s in getattr(sp, split)] == [
            (os.path.realpath(p), pid, c) for p, pid, c in ref[split]
        ]
    assert [(s.path, s.camid) for s in sp.train] == [(p, _strip_prefix(c)) for p, _, c in ref["train"]]
    with_val = parse_msmt17(root / version, include_val=True)  # root may also be MSMT17_V1/ itself
    assert len(with_val.train) == 4 and with_val.num_train_pids == 3


def test_msmt17_bad_inputs(tmp_path: Path) -> None:
    root = _fake_msmt(tmp_path)
    base = root / "MSMT17_V1"
    (base / "list_query.txt").write_text("0000/0000_000_03_0303morning_0035_0.jpg 0\nbroken-line\n")
    with pytest.raises(ValueError, match=r"list_query\.txt:2: malformed line 'broken-line'"):
        parse_msmt17(root)
    (base / "list_query.txt").write_text("0009/0009_000_03_0303morning_0035_0.jpg 9\n")
    with pytest.raises(FileNotFoundError, match=r"list_query\.txt:1: listed image .*0009_000_03.*does not exist"):
        parse_msmt17(root)
    (base / "list_gallery.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_gallery.txt"):
        parse_msmt17(root, check_files=False)
    with pytest.raises(FileNotFoundError, match="no train/test"):
        parse_msmt17(tmp_path / "MSMT17_V1" / "train")


# --------------------------------------------------------------------------- Stanford Online Products

_SOP_HEADER = "image_id class_id super_class_id path\n"


def _fake_sop(root: Path) -> Path:
    train = [(1, 1, 1, "bicycle_final/111085122871_0.JPG"), (2, 1, 1, "bicycle_final/111085122871_1.JPG"),
             (3, 3, 2, "cabinet_final/111111111111_0.JPG")]
    test = [(4, 11319, 1, "bicycle_final/222_0.JPG"), (5, 11319, 1, "bicycle_final/222_1.JPG"),
            (6, 11320, 2, "cabinet_final/333_0.JPG")]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        for row in rows:
            _write_jpeg(root / row[3], (120, 120, 0))
        (root / name).write_text(_SOP_HEADER + "".join(" ".join(map(str, r)) + "\n" for r in rows))
    return root


def test_sop_fixture(tmp_path: Path) -> None:
    sp = parse_sop(_fake_sop(tmp_path))
    assert [(Path(s.path).relative_to(tmp_path).as_posix(), s.pid, s.camid) for s in sp.train] == [
        ("bicycle_final/111085122871_0.JPG", 0, -1),
        ("bicycle_final/111085122871_1.JPG", 0, -1),
        ("cabinet_final/111111111111_0.JPG", 1, -1),
    ]
    assert sp.num_train_classes == 2
    assert [s.pid for s in sp.test] == [11319, 11319, 11320]


def test_sop_bad_inputs(tmp_path: Path) -> None:
    root = _fake_sop(tmp_path)
    good = (root / "Ebay_test.txt").read_text()
    (root / "Ebay_test.txt").write_text("image_id class_id path\n" + good.split("\n", 1)[1])
    with pytest.raises(ValueError, match=r"Ebay_test\.txt:1: header"):
        parse_sop(root)
    (root / "Ebay_test.txt").write_text(good + "7 x 1 bicycle_final/222_0.JPG\n")
    with pytest.raises(ValueError, match=r"Ebay_test\.txt:5: malformed line"):
        parse_sop(root)
    (root / "Ebay_test.txt").write_text(good + "7 11321 3 chair_final/missing.JPG\n")
    with pytest.raises(FileNotFoundError, match=r"Ebay_test\.txt:5: listed image .*missing\.JPG"):
        parse_sop(root)
    (root / "Ebay_test.txt").write_text(_SOP_HEADER)
    with pytest.raises(ValueError, match="Ebay_test split is empty"):
        parse_sop(root)
    (root / "Ebay_train.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Ebay_train.txt"):
        parse_sop(root)


# --------------------------------------------------------------------------- ImageDataset / transforms


def test_image_dataset_loads_real_market_images(market: ReIDSplits) -> None:
    ds = ImageDataset(market.query[:4], transform=build_transforms((64, 32), train=False))
    img, pid, camid = ds[1]
    assert img.shape == (3, 64, 32) and img.dtype == torch.float32
    assert (pid, camid) == (market.query[1].pid, market.query[1].camid)
    raw, _, _ = ImageDataset(market.query[:1])[0]
    assert raw.shape == (3, 128, 64) and 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0
    images, pids, camids = next(iter(DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 64, 32) and pids.tolist() == [s.pid for s in market.query[:4]]


def test_eval_transform_normalises_with_imagenet_stats(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("RGB", (10, 20), (128, 128, 128)).save(path)
    img, _, _ = ImageDataset([Sample(str(path), 0, 0)], build_transforms((8, 4), train=False))[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(img, ((128 / 255 - mean) / std)[:, None, None].expand(3, 8, 4), atol=1e-5, rtol=0)


def test_train_transform_randomises_but_keeps_shape(tmp_path: Path) -> None:
    path = tmp_path / "grad.png"
    Image.fromarray(np.tile(np.arange(0, 250, 25, dtype=np.uint8), (20, 1))[..., None].repeat(3, 2)).save(path)
    tf = build_transforms((16, 8), train=True)
    torch.manual_seed(0)
    outs = [tf(Image.open(path).convert("RGB")) for _ in range(8)]
    assert all(o.shape == (3, 16, 8) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_truncated_jpeg_error_names_file(tmp_path: Path) -> None:
    full = _write_jpeg(tmp_path / "0001_c1s1_000001_00.jpg").read_bytes()
    bad = tmp_path / "0001_c1s1_000002_00.jpg"
    bad.write_bytes(full[: len(full) // 3])
    with pytest.raises(OSError, match=r"0001_c1s1_000002_00\.jpg.*re-extract"):
        ImageDataset([Sample(str(bad), 1, 0)])[0]
    junk = tmp_path / "notes.jpg"
    junk.write_text("hello")
    with pytest.raises(OSError, match=r"notes\.jpg.*remove"):
        ImageDataset([Sample(str(junk), 1, 0)])[0]


# --------------------------------------------------------------------------- PKSampler


def _pids_fixture() -> list[int]:
    # identity i has i + 1 images (1..8), shuffled positions
    pids = [i for i in range(8) for _ in range(i + 1)]
    rng = np.random.default_rng(0)
    return [pids[j] for j in rng.permutation(len(pids))]


def test_pk_sampler_batches_are_p_ids_times_k() -> None:
    pids = _pids_fixture()
    sampler = PKSampler(pids, p=3, k=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(pids) // 12
    for batch in batches:
        assert len(batch) == 12
        ids = [pids[i] for i in batch]
        blocks = [ids[j:j + 4] for j in range(0, 12, 4)]
        assert all(len(set(b)) == 1 for b in blocks)  # k instances of one identity
        assert len({b[0] for b in blocks}) == 3  # p distinct identities
        for j in range(0, 12, 4):
            chunk = batch[j:j + 4]
            n_imgs = pids.count(pids[chunk[0]])
            if n_imgs >= 4:
                assert len(set(chunk)) == 4  # no repeats when the identity has enough images
            else:
                assert len(set(chunk)) == n_imgs  # all of its images, plus repeats


def test_pk_sampler_deterministic_per_seed_and_epoch() -> None:
    pids = _pids_fixture()
    a, b = PKSampler(pids, 2, 2, seed=5), PKSampler(pids, 2, 2, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != list(b)
    b.set_epoch(1)
    assert epoch1 == list(b)
    assert list(PKSampler(pids, 2, 2, seed=6)) != list(PKSampler(pids, 2, 2, seed=5))


def test_pk_sampler_with_dataloader_and_errors(tmp_path: Path) -> None:
    samples = [Sample(str(_write_jpeg(tmp_path / f"{i}.jpg")), pid, 0) for i, pid in enumerate([0, 0, 1, 1, 2, 2])]
    loader = DataLoader(ImageDataset(samples), batch_sampler=PKSampler([s.pid for s in samples], p=2, k=2))
    images, pids, _ = next(iter(loader))
    assert images.shape == (4, 3, 16, 8) and len(set(pids.tolist())) == 2
    with pytest.raises(ValueError, match="only 3 identities for p=4"):
        PKSampler([0, 1, 2], p=4, k=2)
    with pytest.raises(ValueError, match="k >= 1"):
        PKSampler([0, 1, 2], p=1, k=0)
