"""faiss indexes and k-means against the numpy brute-force reference (curate.features.index)."""

from __future__ import annotations

import numpy as np
import pytest

from curate.errors import ParameterError
from curate.features.index import brute_force_knn, build_index, faiss_gpus, kmeans, knn, recall_at_k


def _data(n: int, d: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((nq, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)


def test_brute_force_hand_worked():
    base = np.array([[1, 0], [0, 1], [1, 1], [-1, 0], [1, 0]], dtype=np.float32)
    q = np.array([[1, 0]], dtype=np.float32)
    s, i = brute_force_knn(q, base, 3, "ip")
    # inner products 1, 0, 1, -1, 1: the three 1's, ties by smaller id
    assert i.tolist() == [[0, 2, 4]] and s.tolist() == [[1.0, 1.0, 1.0]]
    s, i = brute_force_knn(q, base, 3, "l2")
    # squared distances 0, 2, 1, 4, 0
    assert i.tolist() == [[0, 4, 2]] and s.tolist() == [[0.0, 0.0, 1.0]]
    s, i = brute_force_knn(q, base, 2, "cosine")
    assert i.tolist() == [[0, 4]]
    s, i = brute_force_knn(q, base, 99, "ip")
    assert i.shape == (1, 5)  # k clipped to the base size


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_flat_matches_brute_force(metric):
    q, b = _data(3000, 48, 100, seed=1)
    ts, ti = brute_force_knn(q, b, 10, metric)
    fs, fi = knn(q, b, 10, metric=metric, index="flat", device="cpu")
    assert recall_at_k(fi, ti) == 1.0
    assert np.array_equal(fi, ti)
    np.testing.assert_allclose(fs, ts, rtol=1e-4, atol=1e-3)
    assert fs.dtype == np.float32 and fi.dtype == np.int64


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ivf_recall_on_random_vectors(metric):
    q, b = _data(10_000, 32, 200, seed=2)
    _, ti = brute_force_knn(q, b, 10, metric)
    _, ii = knn(q, b, 10, metric=metric, index="ivf", device="cpu")
    r = recall_at_k(ii, ti)
    assert r >= 0.9, r
    # and IVF is not secretly exact at nprobe=1: the calibration is what buys the recall
    _, i1 = knn(q, b, 10, metric=metric, index="ivf", nprobe=1, device="cpu")
    assert recall_at_k(i1, ti) < 0.6


def test_ivf_full_probe_is_exact_and_seeded():
    q, b = _data(2000, 16, 50, seed=3)
    _, ti = brute_force_knn(q, b, 5, "l2")
    idx = build_index(b, metric="l2", index="ivf", nlist=20, nprobe=20, device="cpu", seed=7)
    _, ii = idx.search(q, 5)
    assert recall_at_k(ii, ti) == 1.0
    a = knn(q, b, 5, metric="l2", index="ivf", nprobe=2, device="cpu", seed=7)
    c = knn(q, b, 5, metric="l2", index="ivf", nprobe=2, device="cpu", seed=7)
    assert np.array_equal(a[1], c[1])


def test_kmeans_seeded_and_recovers_planted_clusters():
    rng = np.random.default_rng(4)
    centres = np.array([[10, 0, 0], [0, 10, 0], [0, 0, 10]], dtype=np.float32)
    truth = np.repeat(np.arange(3), 200)
    x = centres[truth] + rng.standard_normal((600, 3)).astype(np.float32)
    c1, a1 = kmeans(x, 3, seed=5, device="cpu")
    c2, a2 = kmeans(x, 3, seed=5, device="cpu")
    assert np.array_equal(c1, c2) and np.array_equal(a1, a2)
    # planted partition recovered up to label permutation
    for k in range(3):
        assert len(set(a1[truth == k].tolist())) == 1
    assert len(set(a1.tolist())) == 3
    # assignment is the nearest centroid (numpy reference)
    d2 = ((x[:, None, :] - c1[None]) ** 2).sum(-1)
    assert np.array_equal(a1, d2.argmin(1))
    # the seed matters on unstructured data
    y = rng.standard_normal((500, 8)).astype(np.float32)
    assert np.array_equal(kmeans(y, 8, seed=1)[1], kmeans(y, 8, seed=1)[1])
    assert not np.array_equal(kmeans(y, 8, seed=1)[0], kmeans(y, 8, seed=2)[0])


def test_bad_input_is_rejected():
    q, b = _data(50, 4, 3)
    bad = b.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ParameterError, match="'base' parameter of knn must be finite.*row 7"):
        knn(q, bad, 3)
    with pytest.raises(ParameterError, match="'queries' parameter of knn must be of dimension 4"):
        knn(q[:, :3], b, 3)
    with pytest.raises(ParameterError, match="'k' parameter"):
        brute_force_knn(q, b, 0)
    with pytest.raises(ParameterError, match="'metric' parameter"):
        knn(q, b, 3, metric="manhattan")
    with pytest.raises(ParameterError, match="'index' parameter"):
        knn(q, b, 3, index="hnsw")
    with pytest.raises(ParameterError, match="'k' parameter of kmeans"):
        kmeans(b, 51)
    if faiss_gpus() == 0:
        with pytest.raises(ParameterError, match="'device' parameter"):
            knn(q, b, 3, device="cuda")
