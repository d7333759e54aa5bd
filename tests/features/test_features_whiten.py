"""TAROT whitening identities (spec §9, §11.10) against direct numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from curate.errors import ParameterError, SchemaError
from curate.features.store import FeatureSet
from curate.features.whiten import mahalanobis_cosine, whiten, whiten_feature_sets


def _data(n=300, m=40, d=6, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.linspace(0.1, 3, d)  # anisotropic, correlated
    return rng.standard_normal((n, d)) @ mix + 2.0, rng.standard_normal((m, d)) @ mix - 1.0


def test_hand_worked_2d():
    # X = [[1,0],[-1,0],[0,2],[0,-2]]: mean 0, Σ = diag(0.5, 2); with λ=0, L = diag(√.5, √2)
    phi, psi = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]]), np.array([[0.0, -2.0]])
    zd, zq = whiten(phi, psi, ridge=0.0)
    np.testing.assert_allclose(zd, [[1, 0], [-1, 0], [0, 1]], atol=1e-12)
    np.testing.assert_allclose(zq, [[0, -1]], atol=1e-12)


def test_equals_mahalanobis_cosine_and_zca():
    phi, psi = _data()
    for ridge, mode in ((1e-3, "relative"), (1e-2, "absolute"), (0.0, "relative")):
        zd, zq = whiten(phi, psi, ridge=ridge, ridge_mode=mode, chunk=7)
        s = zd @ zq.T
        np.testing.assert_allclose(s, mahalanobis_cosine(phi, psi, ridge=ridge, ridge_mode=mode), atol=1e-10)
        zd2, zq2 = whiten(phi, psi, ridge=ridge, ridge_mode=mode, method="zca")
        np.testing.assert_allclose(zd2 @ zq2.T, s, atol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(zd, axis=1), 1, rtol=1e-12)


def test_affine_invariance_without_ridge():
    phi, psi = _data(n=2000, m=50)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 6)) + 3 * np.eye(6)
    b = rng.standard_normal(6) * 10
    zd, zq = whiten(phi, psi, ridge=0.0)
    zd2, zq2 = whiten(phi @ w.T + b, psi @ w.T + b, ridge=0.0)
    np.testing.assert_allclose(zd2 @ zq2.T, zd @ zq.T, atol=1e-8)


def test_scale_and_shift_invariance_with_relative_ridge():
    phi, psi = _data()
    zd, zq = whiten(phi, psi, ridge=1e-1)
    zd2, zq2 = whiten(phi * 37.5, psi * 37.5, ridge=1e-1)
    np.testing.assert_allclose(zd2 @ zq2.T, zd @ zq.T, atol=1e-12)
    zd3, zq3 = whiten(phi + 5.0, psi + 5.0, ridge=1e-1)
    np.testing.assert_allclose(zd3 @ zq3.T, zd @ zq.T, atol=1e-10)
    # the absolute ridge is not scale invariant: it is a different operator
    za, qa = whiten(phi * 1e-3, psi * 1e-3, ridge=1e-1, ridge_mode="absolute")
    assert np.abs(za @ qa.T - zd @ zq.T).max() > 1e-3


def test_bad_input():
    phi, psi = _data()
    bad = phi.copy()
    bad[4, 2] = np.nan
    with pytest.raises(SchemaError, match="row 5"):
        whiten(bad, psi)
    with pytest.raises(SchemaError, match="width"):
        whiten(phi, psi[:, :3])
    with pytest.raises(ParameterError, match="'ridge' parameter of whiten"):
        whiten(phi, psi, ridge=-1)
    with pytest.warns(UserWarning, match="N \\+ M"):
        whiten(phi[:5], psi[:2], ridge=1e-3)


def test_singular_covariance_retries_with_warning():
    phi = np.tile([[1.0, 2.0, 3.0]], (10, 1)) * np.arange(10)[:, None]  # rank 1
    with pytest.warns(UserWarning):
        zd, zq = whiten(phi, phi[:2], ridge=0.0)
    assert np.all(np.isfinite(zd))


def test_feature_sets_layout_guard():
    phi, psi = _data()
    a = FeatureSet("grad/sgd", np.array([f"u{i}" for i in range(len(phi))]), phi, {"layout_hash": "A"})
    b = FeatureSet("grad/sgd/targets", np.array([f"t{i}" for i in range(len(psi))]), psi, {"layout_hash": "A"})
    za, zb = whiten_feature_sets(a, b)
    assert za.name == "grad/whitened" and zb.values.shape == psi.shape and za.meta["whitened"]
    b.meta["layout_hash"] = "B"
    with pytest.raises(SchemaError, match="layout hash"):
        whiten_feature_sets(a, b)
