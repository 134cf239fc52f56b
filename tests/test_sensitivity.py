import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jr_jax
from jr_jax import sensitivity as sa

A, B = 7.0, 0.1
PI = math.pi


def ishigami(x):
    x = np.asarray(x)
    return np.sin(x[:, 0]) + A * np.sin(x[:, 1]) ** 2 + B * x[:, 2] ** 4 * np.sin(x[:, 0])


def ishigami_analytic():
    v1 = 0.5 * (1 + B * PI**4 / 5) ** 2
    v2 = A**2 / 8
    v13 = 8 * B**2 * PI**8 / 225
    v = v1 + v2 + v13
    return dict(S1=np.array([v1, v2, 0.0]) / v, ST=np.array([v1 + v13, v2, v13]) / v)


def test_sobol_wrapper_on_ishigami_matches_the_analytic_indices():
    """n = 2^13 Saltelli rows; every estimate within twice its 95 % bootstrap half-width of the
    analytic value (a normal estimate falls outside 2 x 1.96 SD with probability 1e-4)."""
    rows = sa.sobol_indices(ishigami, ["x1", "x2", "x3"], [-PI] * 3, [PI] * 3, 2**13, seed=1)
    exact = ishigami_analytic()
    for j, r in enumerate(rows):
        assert abs(r["S1"] - exact["S1"][j]) < 2 * r["S1_conf"] + 1e-3, r
        assert abs(r["ST"] - exact["ST"][j]) < 2 * r["ST_conf"] + 1e-3, r


def test_linear_model_total_index_over_dgsm_bound_is_pi2_over_12():
    """For q = sum c_i x_i with uniform inputs, ST_i = c_i^2 w_i^2 / (12 V) and the bound is
    c_i^2 w_i^2 / (pi^2 V): the ratio is pi^2/12 whatever c and w (checked to 2 % with 20 000 draws)."""
    rng = np.random.default_rng(0)
    lows, highs, c = np.array([0.0, -1.0, 2.0]), np.array([1.0, 3.0, 2.5]), np.array([2.0, -0.5, 4.0])
    x = lows + (highs - lows) * rng.random((20_000, 3))
    values = x @ c
    grads = np.broadcast_to(c, x.shape)
    rows = sa.dgsm_from_gradients(grads, values, lows, highs, ["a", "b", "c"])
    st = c**2 * (highs - lows) ** 2 / 12 / np.var(values)
    for j, r in enumerate(rows):
        assert st[j] / r["dgsm"] == pytest.approx(PI**2 / 12, rel=1e-12)
    st_sobol = sa.sobol_indices(lambda z: z @ c, ["a", "b", "c"], lows, highs, 2**12, seed=0)
    for j, r in enumerate(st_sobol):
        assert r["ST"] / rows[j]["dgsm"] == pytest.approx(PI**2 / 12, rel=0.05)


def test_dgsm_from_jax_grad_equals_salib_finite_difference_vi():
    """Same base points: nu_i from jax.grad and SALib's finite differences (delta = 1e-5 of the
    range, truncation error ~1e-5 relative) agree within 1 %."""
    from SALib.analyze import dgsm as salib_dgsm
    from SALib.sample import finite_diff

    prob = sa.problem(["x1", "x2", "x3"], [-PI] * 3, [PI] * 3)
    x = finite_diff.sample(prob, 2000, delta=1e-5, seed=3)
    y = ishigami(x)
    salib = salib_dgsm.analyze(prob, x, y, seed=3)
    base = x[:: 4]

    def f(z):
        return jnp.sin(z[0]) + A * jnp.sin(z[1]) ** 2 + B * z[2] ** 4 * jnp.sin(z[0])

    with jax.enable_x64(True):
        grads = np.asarray(jax.vmap(jax.grad(f))(jnp.asarray(base)))
    rows = sa.dgsm_from_gradients(grads, ishigami(base), [-PI] * 3, [PI] * 3, ["x1", "x2", "x3"])
    for j, r in enumerate(rows):
        assert r["vi"] == pytest.approx(salib["vi"][j], rel=1e-2)
        assert r["dgsm"] == pytest.approx(salib["dgsm"][j], rel=1e-2)
        assert r["vi_low"] <= r["vi"] <= r["vi_high"]


def test_fisher_of_a_linear_gaussian_model_is_analytic():
    rng = np.random.default_rng(0)
    jac = rng.normal(size=(50, 3))
    sigma2 = 0.3
    out = sa.fisher_from_jacobian(jac, sigma2, prior_variances=[1.0, 2.0, 0.5])
    info = jac.T @ jac / sigma2
    np.testing.assert_allclose(out["information"], info, rtol=1e-12)
    np.testing.assert_allclose(out["crlb_sd"], np.sqrt(np.diag(np.linalg.inv(info))), rtol=1e-10)
    # Gaussian prior and linear model: the posterior is exact, R^2 ceiling = 1 - post var / prior var
    post = np.linalg.inv(info + np.diag(1 / np.array([1.0, 2.0, 0.5])))
    np.testing.assert_allclose(out["r2_ceiling"], 1 - np.diag(post) / [1.0, 2.0, 0.5], rtol=1e-10)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(info)), out["eigenvalues"], rtol=1e-10)


PROTOCOL = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study(), burn_in=0.3, tmin=-0.05, tmax=0.35)


def test_jr_elasticities_match_finite_differences_float64():
    """d log rms / d log theta by jacfwd against central differences in log theta (h = 1e-6): rtol 1e-5."""
    with jax.enable_x64(True):
        p = jr_jax.JRParams().astype(jnp.float64)
        el = sa.elasticities(p, PROTOCOL, "rms")
        q = sa.get_qoi("rms")
        for j, name in enumerate(jr_jax.STUDY_PARAMETERS):
            x = float(getattr(p, name))
            f = [float(jnp.log(q(jr_jax.simulate(p.replace(**{name: x * math.exp(s)}), PROTOCOL), PROTOCOL.times)))
                 for s in (1e-6, -1e-6)]
            assert el[j] == pytest.approx((f[0] - f[1]) / 2e-6, rel=1e-5, abs=1e-7), name
        wave = sa.elasticities(p, PROTOCOL, "waveform")
        assert wave.shape == (PROTOCOL.n_times, 9)


def test_jr_fisher_ceiling_and_sobol_morris_dgsm_run_end_to_end():
    prior = jr_jax.Prior()
    with jax.enable_x64(True):
        out = sa.fisher(jr_jax.JRParams().astype(jnp.float64), PROTOCOL, 20.0, prior=prior)
    assert out["information"].shape == (9, 9) and np.all(out["eigenvalues"] > -1e-6 * out["eigenvalues"].max())
    assert np.all((out["r2_ceiling"] >= 0) & (out["r2_ceiling"] <= 1))
    key = jax.random.key(0)
    s = sa.sobol(prior, PROTOCOL, "N1_amplitude", 8, key=key, chunk_size=64)
    assert len(s) == 9 and s[0]["n_simulations"] == 8 * 11
    m = sa.morris(prior, PROTOCOL, "rms", 4, key=key, chunk_size=64)
    assert len(m) == 9 and all(r["mu_star"] >= 0 for r in m)
    d = sa.dgsm(prior, PROTOCOL, "rms", 16, key=key, chunk_size=16)
    assert len(d) == 9 and all(r["vi"] >= 0 and r["dgsm"] >= 0 for r in d)


def test_oat_sweep_is_one_batch_of_the_simulator():
    p = jr_jax.JRParams()
    factors = np.array([0.5, 1.0, 1.5])
    erps = sa.oat(p, PROTOCOL, "A_i", factors)
    assert erps.shape == (3, PROTOCOL.n_times)
    np.testing.assert_allclose(erps[2], np.asarray(jr_jax.simulate(p.replace(A_i=33.0), PROTOCOL)), rtol=1e-4,
                               atol=1e-4)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="n must be a power of two.*try 128"):
        sa.sobol_indices(ishigami, ["x1", "x2", "x3"], [-PI] * 3, [PI] * 3, 100, seed=0)
    with pytest.raises(ValueError, match="not finite"):
        sa.sobol_indices(lambda x: np.full(len(x), np.nan), ["x1", "x2"], [0, 0], [1, 1], 8, seed=0)
    nan_qoi = sa.QoI("nan", lambda erp, t: jnp.nan * erp[0])
    with pytest.raises(ValueError, match="not finite"):
        sa.morris(jr_jax.Prior(), PROTOCOL, nan_qoi, 2, key=jax.random.key(0), chunk_size=32)
    with pytest.raises(ValueError, match="unknown QoI"):
        sa.get_qoi("P300")
    with pytest.raises(ValueError, match="uniform inputs"):
        sa.dgsm(jr_jax.Prior(kind="normal"), PROTOCOL, "rms", 4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="samples the prior's box uniformly"):
        sa.sobol(jr_jax.Prior(kind="normal"), PROTOCOL, "rms", 8, key=jax.random.key(0))
    with pytest.raises(ValueError, match="factors must be"):
        sa.oat(jr_jax.JRParams(), PROTOCOL, "A_i", [1.0, -1.0])


def test_sobol_waveform_per_time_and_aggregate():
    rows = sa.sobol_waveform(jr_jax.Prior(), PROTOCOL, 8, key=jax.random.key(1), time_stride=40, chunk_size=128)
    agg = [r for r in rows if r["time"] is None]
    per_time = [r for r in rows if r["time"] is not None]
    assert len(agg) == 9 and len(per_time) % 9 == 0 and per_time
    # the aggregate is the variance-weighted mean of the per-time indices
    times = sorted({r["time"] for r in per_time})
    w = np.array([next(r["variance"] for r in per_time if r["time"] == t) for t in times])
    s1_ai = np.array([next(r["S1"] for r in per_time if r["time"] == t and r["parameter"] == "A_i") for t in times])
    assert next(r["S1"] for r in agg if r["parameter"] == "A_i") == pytest.approx((w @ s1_ai) / w.sum())


def test_fisher_has_the_c_ak_scaling_direction_in_its_null_space():
    """The model depends on C and a_k only through C_k = a_k C: the direction (dC, da_k) =
    (C, -a_k) leaves the ERP unchanged, so J v = 0 and F has a zero eigenvalue (to rounding)."""
    names = jr_jax.STUDY_PARAMETERS
    with jax.enable_x64(True):
        p = jr_jax.JRParams().astype(jnp.float64)
        out = sa.fisher(p, PROTOCOL, 20.0, names=names)
    v = np.array([0, 0, 0, 0, 135.0, -1.0, -0.8, -0.25, -0.25])
    info = out["information"]
    assert abs(v @ info @ v) / (np.linalg.norm(v) ** 2 * out["eigenvalues"][-1]) < 1e-12
    assert out["eigenvalues"][0] / out["eigenvalues"][-1] < 1e-12


def test_a_i_enters_only_with_a_4_c_except_through_the_stimulus():
    """dy5 holds A_i only in the product A_i a_4 C (and A_i times the stimulus where the stimulus
    enters dy5). Scaling A_i by λ and a_4 by 1/λ therefore leaves the ERP unchanged when the stimulus
    drives p(t) only (default Stimulus), and changes it with the study's pattern, which adds the
    pulse to the dy5 bracket. float64; tolerance 1e-9 relative to the ERP's peak (rounding of the
    product over 2000 solver steps is ~1e-13)."""
    base = dict(A_i=30.0, a_4=0.3)
    scaled = dict(A_i=30.0 * 1.7, a_4=0.3 / 1.7)
    with jax.enable_x64(True):
        for stimulus, same in ((jr_jax.Stimulus(), True), (jr_jax.Stimulus.study(), False)):
            protocol = jr_jax.Protocol(stimulus=stimulus, n_trials=1)
            e0, e1 = (np.asarray(jr_jax.simulate(jr_jax.JRParams(**kw).astype(jnp.float64), protocol))
                      for kw in (base, scaled))
            rel = np.abs(e1 - e0).max() / np.abs(e0).max()
            if same:
                assert rel < 1e-9
            else:
                assert rel > 1e-2  # the stimulus term separates A_i from a_4 C
