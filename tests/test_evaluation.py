"""evaluate_reid against FastReID's own evaluate_rank; Recall@K; distances; feature extraction."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cdd_plugin.evaluation import compute_distmat, evaluate_reid, extract_features, recall_at_k


@pytest.fixture(scope="module")
def fastreid_rank():
    """FastReID's real ``fastreid/evaluation/rank.py``.

    Loaded from its file because ``fastreid/evaluation/__init__.py`` no longer imports
    on Python 3.10+ (``collections.Mapping``); the module itself only needs numpy.
    """
    fastreid = pytest.importorskip("fastreid")
    path = Path(fastreid.__file__).parent / "evaluation" / "rank.py"
    spec = importlib.util.spec_from_file_location("fastreid_rank_reference", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cython rank evaluation ... is unavailable"
        spec.loader.exec_module(module)
    return module


def _reference(rank, dist, qp, gp, qc, gc, max_rank=50):
    cmc, all_ap, all_inp = rank.evaluate_rank(dist, qp, gp, qc, gc, max_rank, use_metric_cuhk03=False, use_cython=False)
    return cmc, np.asarray(all_ap), np.asarray(all_inp)


def _assert_same(res, ref, tol=1e-6):
    cmc, all_ap, all_inp = ref
    assert res["num_valid_queries"] == len(all_ap)
    assert abs(res["mAP"] - all_ap.mean()) < tol
    assert abs(res["mINP"] - all_inp.mean()) < tol
    assert res["cmc"].shape == cmc.shape
    np.testing.assert_allclose(res["cmc"], cmc, atol=tol, rtol=0)
    np.testing.assert_allclose(res["all_AP"], all_ap, atol=tol, rtol=0)
    np.testing.assert_allclose(res["all_INP"], all_inp, atol=tol, rtol=0)


def _random_case(seed, num_q, num_g, num_ids, num_cams, levels):
    rng = np.random.default_rng(seed)
    dist = rng.integers(0, levels, size=(num_q, num_g)).astype(np.float32)  # many exact ties
    qp = rng.integers(0, num_ids, num_q)
    gp = rng.integers(0, num_ids, num_g)
    qc = rng.integers(0, num_cams, num_q)
    gc = rng.integers(0, num_cams, num_g)
    qp[:3] = num_ids + 7  # identities absent from the gallery: skipped queries
    return dist, qp, gp, qc, gc


# --------------------------------------------------------------------------- evaluate_reid


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 13, 256])
def test_matches_fastreid_with_ties_and_camera_collisions(fastreid_rank, seed, chunk_size):
    dist, qp, gp, qc, gc = _random_case(seed, 40, 120 + 30 * seed, num_ids=12, num_cams=3, levels=6)
    res = evaluate_reid(dist, qp, gp, qc, gc, max_rank=20, chunk_size=chunk_size, progress=False)
    assert res["num_valid_queries"] < 40  # some queries were skipped
    _assert_same(res, _reference(fastreid_rank, dist, qp, gp, qc, gc, 20))


def test_matches_fastreid_on_realistic_size(fastreid_rank):
    rng = np.random.default_rng(10)
    num_q, num_g, num_ids = 300, 2000, 150
    gp = rng.integers(0, num_ids, num_g)
    gc = rng.integers(0, 6, num_g)
    qp = rng.integers(0, num_ids, num_q)
    qc = rng.integers(0, 6, num_q)
    proto = 0.6 * rng.normal(size=(num_ids, 16))
    feats_q = rng.normal(size=(num_q, 16)) + proto[qp]
    feats_g = rng.normal(size=(num_g, 16)) + proto[gp]
    dist = compute_distmat(torch.from_numpy(feats_q).float(), torch.from_numpy(feats_g).float()).numpy()
    dist[:, ::7] = np.round(dist[:, ::7], 1)  # sprinkle some ties
    res = evaluate_reid(torch.from_numpy(dist), torch.from_numpy(qp), gp, qc, torch.from_numpy(gc), progress=False)
    ref = _reference(fastreid_rank, dist, qp, gp, qc, gc)
    _assert_same(res, ref)
    assert 0.05 < res["mAP"] < 0.95  # a meaningful, non-degenerate case


def test_max_rank_capped_at_gallery_size(fastreid_rank):
    dist, qp, gp, _, _ = _random_case(5, 10, 8, num_ids=3, num_cams=2, levels=3)
    qc, gc = np.zeros(10, int), np.ones(8, int)  # nothing removed
    res = evaluate_reid(dist, qp, gp, qc, gc, max_rank=50, progress=False)
    assert res["cmc"].shape == (8,)
    _assert_same(res, _reference(fastreid_rank, dist, qp, gp, qc, gc, 50))


def test_short_filtered_gallery_pads_cmc_where_fastreid_crashes(fastreid_rank):
    # a query whose filtered gallery is shorter than max_rank: FastReID's per-query CMC
    # rows become ragged and np.asarray raises; the curve is 1 past the last match.
    dist = np.array([[0.3, 0.1, 0.2], [0.1, 0.2, 0.3]])
    qp, gp, qc, gc = np.array([1, 2]), np.array([1, 2, 1]), np.array([0, 0]), np.array([0, 1, 1])
    with pytest.raises(ValueError):
        _reference(fastreid_rank, dist, qp, gp, qc, gc, 3)
    res = evaluate_reid(dist, qp, gp, qc, gc, max_rank=3, progress=False)
    ref = _reference(fastreid_rank, dist, qp, gp, qc, gc, 2)  # 2 = the shortest filtered gallery
    np.testing.assert_allclose(res["cmc"], [*ref[0], 1.0])
    assert res["mAP"] == pytest.approx(ref[1].mean())


def test_same_id_same_camera_exclusion_by_hand(fastreid_rank):
    # one query (pid 1, camera 0); gallery sorted by distance
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    gp = np.array([1, 2, 1, 3, 1])
    gc = np.array([0, 1, 1, 1, 2])
    res = evaluate_reid(dist, [1], gp, [0], gc, max_rank=4, progress=False)
    # gallery[0] (same id, same camera) is removed -> ranking 2, 1, 3, 1: hits at ranks 2 and 4
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert res["mINP"] == pytest.approx(2 / 4)
    np.testing.assert_allclose(res["cmc"], [0, 1, 1, 1])
    _assert_same(res, _reference(fastreid_rank, dist, np.array([1]), gp, np.array([0]), gc, 4))
    # from another camera, gallery[0] counts: hits at ranks 1, 3, 5
    res_other_cam = evaluate_reid(dist, [1], gp, [5], gc, max_rank=4, progress=False)
    assert res_other_cam["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert res_other_cam["mINP"] == pytest.approx(3 / 5)
    np.testing.assert_allclose(res_other_cam["cmc"], [1, 1, 1, 1])


def test_string_labels_and_tensor_inputs_agree():
    dist, qp, gp, qc, gc = _random_case(7, 30, 90, num_ids=10, num_cams=3, levels=50)
    ref = evaluate_reid(dist, qp, gp, qc, gc, progress=False)
    as_str = evaluate_reid(torch.from_numpy(dist), [f"id{p}" for p in qp], [f"id{p}" for p in gp],
                           [f"c{c}" for c in qc], [f"c{c}" for c in gc], progress=False)
    assert as_str["mAP"] == ref["mAP"] and np.array_equal(as_str["cmc"], ref["cmc"])


def test_stable_tie_break_is_fastreid_with_index_order(fastreid_rank):
    dist, qp, gp, qc, gc = _random_case(3, 25, 200, num_ids=8, num_cams=3, levels=4)
    res = evaluate_reid(dist, qp, gp, qc, gc, tie_break="stable", progress=False)
    # ties broken by gallery index == a matrix whose ties are split by a tiny index-proportional epsilon
    tie_split = dist.astype(np.float64) + np.arange(200)[None, :] * 1e-6
    _assert_same(res, _reference(fastreid_rank, tie_split, qp, gp, qc, gc))


def test_no_valid_query_is_a_clear_error():
    dist = np.zeros((2, 3))
    with pytest.raises(ValueError, match="no query has a valid match"):
        # every gallery image of the query ids comes from the query's own camera
        evaluate_reid(dist, [1, 2], [1, 2, 9], [0, 1], [0, 1, 0], progress=False)


def test_bad_shapes_and_nan_are_errors():
    with pytest.raises(ValueError, match="g_pids has 2 entries"):
        evaluate_reid(np.zeros((2, 3)), [1, 2], [1, 2], [0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_reid(np.full((1, 2), np.nan), [1], [1, 1], [0], [1, 1])
    with pytest.raises(ValueError, match="2-D"):
        evaluate_reid(np.zeros(3), [1], [1, 1, 1], [0], [1, 1, 1])


# --------------------------------------------------------------------------- recall_at_k


def _brute_recall(q, q_lab, g, g_lab, ks, exclude_self):
    """Independent reference: full distance matrix, stable argsort."""
    d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")
    n_cand = g.shape[0] - int(exclude_self)
    hits = g_lab[order[:, :n_cand]] == q_lab[:, None]
    return {k: float(hits[:, : min(k, n_cand)].any(1).mean()) for k in ks}


def test_recall_hand_made_sop_case():
    feats = np.array([[0.0], [0.1], [5.0], [5.2], [10.0]])
    labels = [0, 0, 1, 2, 2]
    # item 0 <-> 1 hit at rank 1; item 2 is the only one of class 1 (never a hit);
    # item 3's neighbours: 5.0 (class 1), 10.0 (class 2) -> hit at rank 2; item 4: 5.2 -> hit at rank 1
    r = recall_at_k(feats, labels, ks=(1, 2, 10), metric="euclidean", progress=False)
    assert r == {1: pytest.approx(3 / 5), 2: pytest.approx(4 / 5), 10: pytest.approx(4 / 5)}


def test_recall_excludes_the_query_itself():
    feats = torch.eye(6)  # each item's only neighbour at distance 0 is itself
    labels = torch.arange(6)  # and nobody else shares its label
    for metric in ("cosine", "euclidean"):
        r = recall_at_k(feats, labels, ks=(1, 5, 100), metric=metric, progress=False)
        assert r == {1: 0.0, 5: 0.0, 100: 0.0}
    # an exact duplicate at another index is a legitimate neighbour
    dup = torch.cat([feats, feats[:1]])
    r = recall_at_k(dup, torch.cat([labels, labels[:1]]), ks=(1,), progress=False)
    assert r[1] == pytest.approx(2 / 7)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_recall_chunked_equals_brute_force(metric):
    rng = np.random.default_rng(0)
    n, classes = 300, 60
    labels = rng.integers(0, classes, n)
    feats = rng.normal(size=(n, 8)) + 1.2 * rng.normal(size=(classes, 8))[labels]
    ref_feats = feats / np.linalg.norm(feats, axis=1, keepdims=True) if metric == "cosine" else feats
    ks = (1, 2, 4, 8, 16, 1000)
    expected = _brute_recall(ref_feats, labels, ref_feats, labels, ks, exclude_self=True)
    assert 0.1 < expected[1] < 0.9
    for chunk in (1, 7, 64, 300, 4096):
        got = recall_at_k(torch.from_numpy(feats).float(), labels, ks, metric=metric, chunk_size=chunk, progress=False)
        assert got == pytest.approx(expected, abs=1e-12), f"chunk_size={chunk}"


def test_recall_query_gallery_form():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    g_lab = np.array([7, 8, 9])
    queries = np.array([[0.9, 0.1], [0.1, 0.9], [0.7, 0.7], [-1.0, -0.1]])
    q_lab = np.array([8, 8, 9, 9])
    # cosine ranks: q0 -> 7,8,9 (8 at 2); q1 -> 8 (1); q2 -> 7/8 tie then 9 (3); q3 -> 9 (1)
    r = recall_at_k(gallery, g_lab, ks=(1, 2, 3, 50), query_features=queries, query_labels=q_lab, progress=False)
    assert r == {1: pytest.approx(2 / 4), 2: pytest.approx(3 / 4), 3: 1.0, 50: 1.0}
    rng = np.random.default_rng(1)
    g, q = rng.normal(size=(200, 4)), rng.normal(size=(50, 4))
    gl, ql = rng.integers(0, 20, 200), rng.integers(0, 20, 50)
    got = recall_at_k(g, gl, (1, 5, 20), query_features=q, query_labels=ql, metric="euclidean", chunk_size=9, progress=False)
    assert got == pytest.approx(_brute_recall(q, ql, g, gl, (1, 5, 20), exclude_self=False), abs=1e-12)


def test_recall_input_errors():
    f = np.zeros((4, 3))
    with pytest.raises(ValueError, match="labels has 3 entries"):
        recall_at_k(f, [0, 1, 2])
    with pytest.raises(ValueError, match="empty"):
        recall_at_k(np.zeros((0, 3)), [])
    with pytest.raises(ValueError, match="unknown metric 'l1'"):
        recall_at_k(f, [0, 1, 2, 3], metric="l1")
    with pytest.raises(ValueError, match="both query_features and query_labels"):
        recall_at_k(f, [0, 1, 2, 3], query_features=f)
    with pytest.raises(ValueError, match="feature dims differ"):
        recall_at_k(f, [0, 1, 2, 3], query_features=np.zeros((2, 5)), query_labels=[0, 1])


# --------------------------------------------------------------------------- distances / features


def test_compute_distmat_metrics():
    rng = np.random.default_rng(2)
    q, g = torch.from_numpy(rng.normal(size=(5, 6))), torch.from_numpy(rng.normal(size=(7, 6)))
    torch.testing.assert_close(compute_distmat(q, g, "euclidean"), torch.cdist(q, g) ** 2)
    cos = 1 - torch.nn.functional.cosine_similarity(q[:, None], g[None], dim=-1)
    torch.testing.assert_close(compute_distmat(q, g, "cosine"), cos)
    with pytest.raises(ValueError, match="unknown metric"):
        compute_distmat(q, g, "manhattan")


class _TupleNet(nn.Module):
    """(logits, embedding); behaves differently in train mode (dropout) to catch a missing eval()."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 2, 5), nn.Dropout(0.9))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        emb = self.body(x)
        return self.head(emb), emb


def test_extract_features_tuple_output_flip_and_mode_restore():
    torch.manual_seed(0)
    model = _TupleNet().train()
    images = torch.randn(6, 3, 4, 2)
    pids, camids = torch.tensor([1, 1, 2, 2, 3, 3]), torch.tensor([0, 1, 0, 1, 0, 1])
    loader = [(images[:4], pids[:4], camids[:4]), {"images": images[4:], "targets": pids[4:], "camids": camids[4:]}]
    feats, got_pids, got_cams = extract_features(model, loader)
    assert model.training  # previous mode restored
    with torch.no_grad():
        expected = model.eval().body(images)
    torch.testing.assert_close(feats, expected)
    assert got_pids.tolist() == pids.tolist() and got_cams.tolist() == camids.tolist()
    flipped, _, _ = extract_features(model, loader, flip=True)
    with torch.no_grad():
        torch.testing.assert_close(flipped, (expected + model.body(images.flip(3))) / 2)
    assert not torch.allclose(flipped, feats)
    model.eval()
    extract_features(model, loader)
    assert not model.training
