import itertools

import numpy as np
import pytest

from toolchain.core.errors import ToolchainError
from toolchain.kernels import (
    delta_weight,
    suffix_kernel,
    tt_ranks,
    tt_reconstruct,
    tt_svd,
    validate_cores,
    weight_sha256,
)

SHAPES = [(8, 6, 3), (12, 1, 3), (16, 4, 3, 3), (5, 7, 1), (3, 2, 5, 2), (64, 64, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_reconstruction_is_exact(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    cores = tt_svd(w, rank=10_000)
    np.testing.assert_allclose(tt_reconstruct(cores), w, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "rank", "expected"),
    [
        ((8, 6, 3), 4, (1, 4, 3, 1)),  # r2 <= k = 3
        ((8, 6, 3), 100, (1, 8, 3, 1)),  # r1 <= min(C_out, C_in*k) = 8, r2 <= k = 3
        ((12, 1, 3), 8, (1, 3, 3, 1)),  # depthwise: r1 <= 1*3
        ((16, 4, 3, 3), 4, (1, 4, 4, 3, 1)),
        ((64, 64, 1), 8, (1, 8, 1, 1)),  # pointwise: the last bond is 1
        ((2, 2, 50), 8, (1, 2, 4, 1)),  # r2 <= r1 * n2
    ],
)
def test_rank_clipped_per_bond(shape, rank, expected):
    assert tt_ranks(shape, rank) == expected
    cores = tt_svd(np.ones(shape, dtype=np.float32), rank)
    assert (*tuple(c.shape[0] for c in cores), 1) == expected


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_rank_is_refused(bad):
    with pytest.raises(ToolchainError, match="rank must be an integer >= 1"):
        tt_ranks((4, 4, 3), bad)


def test_truncation_error_decreases_with_rank():
    w = np.random.default_rng(1).standard_normal((16, 8, 3)).astype(np.float32)
    errs = [np.linalg.norm(tt_reconstruct(tt_svd(w, r)) - w) for r in (1, 2, 4, 8, 16)]
    assert all(a >= b - 1e-5 for a, b in itertools.pairwise(errs))
    assert errs[-1] < 1e-4 < errs[0]


def test_signs_are_fixed():
    w = np.random.default_rng(2).standard_normal((6, 4, 3))
    for core in tt_svd(w, 3)[:-1]:
        mat = core.reshape(-1, core.shape[2])
        pivots = np.argmax(np.abs(mat), axis=0)
        assert np.all(mat[pivots, np.arange(mat.shape[1])] > 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_delta_weight_matches_explicit_sum(shape):
    rng = np.random.default_rng(3)
    w = rng.standard_normal(shape).astype(np.float32)
    cores = tt_svd(w, 3)
    suffix = suffix_kernel(cores[1:])
    r1 = cores[0].shape[2]
    assert suffix.shape == (r1, *shape[1:])
    dg1 = rng.standard_normal((shape[0], r1)).astype(np.float32)
    expected = sum(dg1[:, j].reshape(-1, *[1] * (len(shape) - 1)) * suffix[j][None] for j in range(r1))
    np.testing.assert_allclose(delta_weight(dg1, suffix, 0.5), 0.5 * expected, rtol=1e-5, atol=1e-6)
    # ΔG1 = G1 recovers the TT approximation itself
    np.testing.assert_allclose(delta_weight(cores[0][0], suffix), tt_reconstruct(cores), atol=1e-5)


@pytest.mark.parametrize(
    ("cores", "message"),
    [
        ([np.zeros((1, 4, 2))], "at least 2 cores"),
        ([np.zeros((1, 4, 2)), np.zeros((3, 3, 1))], "bond 1 does not match"),
        ([np.zeros((2, 4, 2)), np.zeros((2, 3, 1))], "outer TT ranks"),
        ([np.zeros((1, 4, 2)), np.full((2, 3, 1), np.nan)], "NaN or Inf"),
        ([np.zeros((1, 4)), np.zeros((2, 3, 1))], "must be 3-D"),
    ],
)
def test_validate_cores_refuses(cores, message):
    with pytest.raises(ToolchainError, match=message):
        validate_cores(cores)


def test_validate_cores_checks_modes():
    with pytest.raises(ToolchainError, match="modes do not match"):
        validate_cores(tt_svd(np.ones((4, 3, 3)), 2), (4, 3, 5))


def test_weight_sha256_depends_on_shape_and_values():
    a = np.arange(12, dtype=np.float32)
    assert weight_sha256(a) == weight_sha256(a.astype(np.float64))
    assert weight_sha256(a) != weight_sha256(a.reshape(3, 4))
    b = a.copy()
    b[5] = np.nextafter(b[5], np.float32(100))
    assert weight_sha256(a) != weight_sha256(b)
