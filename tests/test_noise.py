"""The counter-based noise of the SDE solver: Threefry-2x32-20, inverse-CDF normals, the Brownian path.

Statistical tests state their size (false-alarm rate) and power. Each uses a fixed seed, so it is
deterministic; the thresholds are what a sound generator passes with probability >= 1 - 1e-4.
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.extend.random import threefry2x32_p
from scipy import stats

import jr_jax
from jr_jax import JRParams
from jr_jax._solve import (
    CounterBrownianPath,
    brownian_increments,
    integrate,
    per_sample_keys,
    standard_normals,
    step_normals,
    threefry2x32,
)


def _u32(x):
    return jnp.asarray(np.asarray(x, dtype=np.uint32))


def test_threefry_known_answers_and_jax_primitive():
    """The Random123 known-answer vectors of Threefry-2x32-20, and bit equality with JAX's primitive."""
    kat = [  # (key, counter, output) from Random123's kat_vectors
        ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ]
    for key, ctr, out in kat:
        got = threefry2x32(*(_u32(v) for v in key + ctr))
        assert tuple(int(w) for w in got) == out
    rng = np.random.default_rng(0)
    k0, k1, x0, x1 = (_u32(rng.integers(0, 2**32, 4096, dtype=np.uint64)) for _ in range(4))
    mine = threefry2x32(k0, k1, x0, x1)
    ref = threefry2x32_p.bind(k0, k1, x0, x1)
    for a, b in zip(mine, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _pooled_normals(n_keys=64, n_steps=4096, seed=0):
    keys = jax.random.split(jax.random.key(seed), n_keys)
    return np.asarray(standard_normals(keys, n_steps, jnp.float32), dtype=np.float64)  # (n_steps, n_keys)


def test_normals_ks_against_standard_normal():
    """KS over 2^18 draws (64 keys x 4096 steps) against N(0, 1) at alpha = 1e-4.

    Power: an SD off by 3 % moves the CDF by up to 0.242 * 0.03 = 0.0073 (at |z| = 1), against a
    critical distance of 2.07 / sqrt(2^18) = 0.0040: detected with probability > 0.99.
    Also per key (4096 draws each): no key's p-value below 1e-4 / 64 (Bonferroni).
    """
    z = _pooled_normals()
    assert stats.kstest(z.ravel(), "norm").pvalue > 1e-4
    pvalues = [stats.kstest(z[:, j], "norm").pvalue for j in range(z.shape[1])]
    assert min(pvalues) > 1e-4 / z.shape[1], min(pvalues)
    # a generator with a 3 % SD error fails the same test (the power claim above)
    assert stats.kstest(1.03 * z.ravel(), "norm").pvalue < 1e-4


def test_normals_moments():
    """Mean, variance, skewness and excess kurtosis of 2^18 draws within 4.5 standard errors.

    Standard errors under N(0, 1): 1/sqrt(n), sqrt(2/n), sqrt(6/n), sqrt(24/n) (0.002, 0.0028,
    0.0048, 0.0096 for n = 2^18). The support |z| <= 5.42 changes the kurtosis by < 1e-5.
    """
    z = _pooled_normals(seed=1).ravel()
    n = z.size
    checks = [
        (z.mean(), 0.0, 1 / np.sqrt(n)),
        (z.var(), 1.0, np.sqrt(2 / n)),
        (stats.skew(z), 0.0, np.sqrt(6 / n)),
        (stats.kurtosis(z), 0.0, np.sqrt(24 / n)),
    ]
    for value, expected, se in checks:
        assert abs(value - expected) < 4.5 * se, (value, expected, se)
    assert np.abs(z).max() < 5.43


def test_top_bits_are_uniform():
    """Chi-square of the top 8 bits of the normals' source words (256 bins, 2^18 words), p > 1e-4."""
    z = _pooled_normals(seed=2).ravel()
    u = stats.norm.cdf(z)  # the uniform each normal came from, up to float32 rounding
    counts = np.bincount(np.minimum((u * 256).astype(int), 255), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_independence_across_steps():
    """Lag-1..8 autocorrelations of each key's stream, and the pairs sharing one Threefry block.

    Under independence each pooled autocorrelation of n = 64 x 4095 products has SD 1/sqrt(n) =
    0.002; the bound 4.5 SD (0.0088) catches a lag correlation of 0.01 with probability ~0.7 and
    0.02 with probability ~1. Steps 2m and 2m + 1 come from the two words of one block: their
    correlation, and that of their squares (a non-linear dependence), are tested on their own.
    """
    z = _pooled_normals(seed=3)
    zc = z - z.mean(axis=0)
    for lag in range(1, 9):
        r = np.sum(zc[lag:] * zc[:-lag]) / np.sqrt(np.sum(zc[lag:] ** 2) * np.sum(zc[:-lag] ** 2))
        assert abs(r) < 4.5 / np.sqrt(zc[lag:].size), (lag, r)
    even, odd = z[0::2].ravel(), z[1::2].ravel()
    bound = 4.5 / np.sqrt(even.size)
    assert abs(np.corrcoef(even, odd)[0, 1]) < bound
    assert abs(np.corrcoef(even**2, odd**2)[0, 1]) < bound


@pytest.mark.parametrize("derive", ["fold_in", "split"])
def test_independence_across_keys(derive):
    """Correlations between the streams of 64 keys, from consecutive ``fold_in`` indices (how
    simulate derives sample keys) or from ``split``: 2016 pairs of 4096 draws.

    Each correlation has SD 1/64 under independence; the largest of 2016 stays below 5.5 SD
    (0.086) with probability 1 - 1e-4, while a shared or shifted stream gives up to 1. The sum of
    squares of all 2016 correlations times 4096 is chi-square with 2016 df (p > 1e-4): it detects a
    common correlation of 0.01 between all keys with probability ~1 (mean shift 2016 * 0.41).
    """
    key = jax.random.key(4)
    keys = per_sample_keys(key, 64) if derive == "fold_in" else jax.random.split(key, 64)
    z = np.asarray(standard_normals(keys, 4096, jnp.float32), dtype=np.float64)
    c = np.corrcoef(z.T)[np.triu_indices(64, 1)]
    assert np.max(np.abs(c)) < 5.5 / 64, np.max(np.abs(c))
    assert stats.chi2.sf(np.sum(c**2) * 4096, c.size) > 1e-4
    # shifted streams are not the same stream: key i at step k + 1 against key i at step k
    assert abs(np.corrcoef(z[1:, 0], z[:-1, 0])[0, 1]) < 4.5 / 64


def test_noise_depends_on_key_and_step_only():
    """A key's normals are the same whatever the batch, the number of steps and the step layout."""
    keys = jax.random.split(jax.random.key(5), 7)
    full = np.asarray(standard_normals(keys, 300, jnp.float32))
    np.testing.assert_array_equal(np.asarray(standard_normals(keys[3:4], 100, jnp.float32))[:, 0], full[:100, 3])
    k0, k1 = jax.random.key_data(keys)[:, 0], jax.random.key_data(keys)[:, 1]
    np.testing.assert_array_equal(np.asarray(step_normals(k0, k1, 257)), full[257])
    # keys of another implementation work and give a normal stream too
    rbg = jax.random.split(jax.random.key(5, impl="rbg"), 7)
    zr = np.asarray(standard_normals(rbg, 300, jnp.float32))
    assert zr.shape == (300, 7) and np.all(np.isfinite(zr)) and abs(np.corrcoef(zr[:, 0], full[:, 0])[0, 1]) < 0.3


def test_counter_path_increments_sums_and_substeps():
    """evaluate(t0, t1) sums the step increments; a path with substeps f is the fine path summed f
    at a time; W(t) of the fine path at 400 steps has variance 400 dt (4096 keys: SE 2.2 %)."""
    keys = jax.random.split(jax.random.key(6), 4096)
    dt = 1e-4
    fine = CounterBrownianPath.from_keys(keys, 400, dt, jnp.float32)
    inc = np.asarray(brownian_increments(keys, 400, dt, jnp.float32))
    np.testing.assert_allclose(np.asarray(fine.step_increment(17)), inc[17], rtol=0, atol=0)
    w = np.asarray(fine.evaluate(3.0, 40.0))
    np.testing.assert_allclose(w, inc[3:40].sum(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fine.evaluate(40.0, 3.0)), -w, rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(fine.evaluate(40.0)), inc[:40].sum(axis=0), rtol=0, atol=1e-6)
    coarse = CounterBrownianPath.from_keys(keys, 400 // 8, 8 * dt, jnp.float32, substeps=8)
    np.testing.assert_allclose(np.asarray(coarse.step_increment(5)), inc[40:48].sum(axis=0), rtol=1e-5, atol=1e-6)
    total = np.asarray(fine.evaluate(0.0, 400.0))
    assert abs(total.var() / (400 * dt) - 1) < 4.5 * np.sqrt(2 / total.size)
    levy = fine.evaluate(0.0, 2.0, use_levy=True)
    assert isinstance(levy, diffrax.BrownianIncrement)
    np.testing.assert_allclose(np.asarray(levy.W), inc[:2].sum(axis=0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="substeps must be an integer >= 1"):
        CounterBrownianPath.from_keys(keys, 10, dt, jnp.float32, substeps=0)


def test_solver_draws_the_same_increments_as_the_materialised_path():
    """integrate with the counter path (drawn in the loop) equals integrate with the same
    increments materialised up front: the same floating-point operations, so to rounding."""
    n, steps, dt = 8, 500, 2.5e-4
    params = jr_jax.Prior().sample(jax.random.key(0), n).replace(sigma=4.0).broadcast()
    keys = jax.random.split(jax.random.key(1), n)
    y0 = jnp.zeros((6, n))
    save = np.arange(0, steps + 1, 4)
    a = integrate(params, y0, steps, save, dt=dt, solver="heun",
                  increments=CounterBrownianPath.from_keys(keys, steps, dt, jnp.float32))
    b = integrate(params, y0, steps, save, dt=dt, solver="heun",
                  increments=brownian_increments(keys, steps, dt, jnp.float32))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_weak_variance_of_the_linear_regime_matches_lyapunov(solver):
    """With the feedback a_2 = 1e-9 the (y1, y4) pair is a linear SDE driven by A_e b_e sigma dW:
    its variance at T = 0.1 s from rest is exactly P(T) = int_0^T e^{Ms} G G' e^{M's} ds (Van
    Loan's method). 16384 paths at dt = 0.1 ms: the sample variance of y1 has relative SE
    sqrt(2/16384) = 1.1 %, bound 5 %; the discretisation bias (weak order 1, b_e dt = 0.01) is
    below 1 %. A wrong increment scale (dt instead of sqrt(dt), or a factor 2 in the variance)
    fails by far more.
    """
    n, dt, steps = 16384, 1e-4, 1000
    p = JRParams(a_2=1e-9, sigma=jr_jax.SIGMA_ABLEIDINGER_2017)
    params = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,)), p.broadcast())
    keys = per_sample_keys(jax.random.key(8), n)
    ys = integrate(params, jnp.zeros((6, n)), steps, np.array([steps]), dt=dt, solver=solver,
                   increments=CounterBrownianPath.from_keys(keys, steps, dt, jnp.float32))[-1]
    b, g = float(p.b_e), float(p.A_e * p.b_e * p.sigma)
    m = np.array([[0.0, 1.0], [-b * b, -2 * b]])
    gg = np.array([[0.0, 0.0], [0.0, g * g]])
    block = scipy.linalg.expm(np.block([[-m, gg], [np.zeros((2, 2)), m.T]]) * steps * dt)
    cov = block[2:, 2:].T @ block[:2, 2:]
    for row, var in ((1, cov[0, 0]), (4, cov[1, 1])):
        got = float(jnp.var(ys[row]))
        assert abs(got / var - 1) < 0.05, (solver, row, got, var)


def test_stochastic_solve_forward_and_reverse_gradients_agree(x64):
    """jax.jacfwd (differentiation="forward") and jax.grad (reverse, checkpointed) of a stochastic
    solve whose noise is drawn inside the loop by the counter-based path: the same derivative, to 1e-8 relative
    (both are exact derivatives of the same float64 computation), and central differences agree
    to 1e-5 (h = 1e-6 relative: error O(h^2) + O(eps/h))."""
    ts = np.round(np.arange(0.0, 0.1 + 1e-9, 1e-3), 10)
    key = jax.random.key(3)

    def f(a_i, mode):
        y = jr_jax.solve(JRParams(A_i=a_i, sigma=4.0).astype(jnp.float64), ts, key=key, dt=2.5e-4,
                         differentiation=mode)
        return jnp.sum((y[:, 1] - y[:, 2]) ** 2)

    x = jnp.float64(22.0)
    fwd = float(jax.jacfwd(lambda a: f(a, "forward"))(x))
    rev = float(jax.grad(lambda a: f(a, "reverse"))(x))
    h = 1e-6 * 22.0
    fd = (float(f(x + h, "forward")) - float(f(x - h, "forward"))) / (2 * h)
    assert fwd != 0.0
    np.testing.assert_allclose(fwd, rev, rtol=1e-8)
    np.testing.assert_allclose(fwd, fd, rtol=1e-5)
