import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PARAM_SETS, reference_solution

import jr_jax
from jr_jax import JRParams
from jr_jax._solve import CounterBrownianPath, brownian_increments, integrate

TS = np.round(np.arange(-0.2, 0.6 + 1e-9, 1e-3), 10)
STIM = jr_jax.Stimulus.study()


def _batch(sets):
    names = JRParams.names
    rows = [JRParams(**s) for s in sets]
    return JRParams(**{n: np.array([float(getattr(r, n)) for r in rows]) for n in names})


def test_ode_matches_scipy_dop853(x64):
    """Heun at dt = 1e-5 s against DOP853 (rtol 1e-11) at the defaults, the range corners and a mixed point.

    Tolerance 1e-4 of max|y|: Heun's global error is O(dt^2) (about 1e-5 here for the worst
    corner, see test_ode_convergence_orders), and an O(dt) defect such as a stimulus sampled at
    stage times gives about 3e-4 at this step, so it would fail.
    """
    params = _batch(PARAM_SETS.values()).astype(jnp.float64)
    ys = np.asarray(jr_jax.solve(params, TS, dt=1e-5, solver="heun", stimulus=STIM))
    assert ys.shape == (len(PARAM_SETS), len(TS), 6) and ys.dtype == np.float64
    for i, (name, p) in enumerate(PARAM_SETS.items()):
        ref = reference_solution(p, TS, stimulus=STIM)
        err = np.max(np.abs(ys[i] - ref)) / np.max(np.abs(ref))
        assert err < 1e-4, (name, err)


@pytest.mark.parametrize("solver, order", [("euler", 1.0), ("heun", 2.0), ("midpoint", 2.0)])
def test_ode_convergence_orders(x64, solver, order):
    """Global error against DOP853 at three steps: fitted log-log slope within 0.2 of the order."""
    ts = np.round(np.arange(-0.05, 0.3 + 1e-9, 1e-3), 10)
    ref = reference_solution(PARAM_SETS["mixed"], ts, stimulus=STIM)
    dts = np.array([1e-4, 5e-5, 2.5e-5])
    params = JRParams(**PARAM_SETS["mixed"]).astype(jnp.float64)
    errs = [np.max(np.abs(np.asarray(jr_jax.solve(params, ts, dt=dt, solver=solver, stimulus=STIM)) - ref)) for dt in dts]
    slope = np.polyfit(np.log(dts), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.2, (errs, slope)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sde_strong_order_one(x64, solver):
    """Strong error at T against a fine solution on the same Brownian path.

    The coarse solves use the counter path with ``substeps`` (each coarse increment is the sum
    of the fine ones, drawn in the solver loop), so this also checks that path. With additive
    noise both Euler-Maruyama and Heun have strong order 1. Mean |error| of y over 200 paths at
    4 coarse steps; fitted slope within 0.2 of 1.
    """
    n_paths, fine_dt, n_fine = 200, 1e-5, 12800
    params = JRParams(sigma=jr_jax.SIGMA_ABLEIDINGER_2017).astype(jnp.float64)
    params = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n_paths,)), params)
    keys = jax.random.split(jax.random.key(42), n_paths)
    y0 = jnp.tile(jnp.array([0.1, 20.0, 15.0, 0.0, 0.0, 0.0])[:, None], (1, n_paths))

    def final_state(factor):
        n = n_fine // factor
        path = CounterBrownianPath.from_keys(keys, n, fine_dt * factor, jnp.float64, substeps=factor)
        return integrate(params, y0, n, np.array([n]), dt=fine_dt * factor, solver=solver, increments=path)[-1]

    ref = final_state(1)
    # the fine path drawn in the loop equals the same increments materialised up front
    inc = brownian_increments(keys, n_fine, fine_dt, jnp.float64)
    upfront = integrate(params, y0, n_fine, np.array([n_fine]), dt=fine_dt, solver=solver, increments=inc)[-1]
    np.testing.assert_allclose(np.asarray(upfront), np.asarray(ref), rtol=1e-12, atol=1e-9)
    factors = np.array([8, 16, 32, 64])
    errs = [float(jnp.mean(jnp.abs(final_state(int(f))[1] - ref[1]))) for f in factors]
    slope = np.polyfit(np.log(factors * fine_dt), np.log(errs), 1)[0]
    assert abs(slope - 1.0) < 0.2, (errs, slope)


def test_brownian_increments_are_standard_normal_per_column():
    from scipy import stats

    keys = jax.random.split(jax.random.key(0), 4)
    inc = np.asarray(brownian_increments(keys, 5000, 1e-4, jnp.float32))
    assert inc.shape == (5000, 4)
    for j in range(4):  # KS at alpha 1e-3 against N(0, dt)
        assert stats.kstest(inc[:, j] / np.sqrt(1e-4), "norm").pvalue > 1e-3
    # column j depends on keys[j] alone
    np.testing.assert_array_equal(np.asarray(brownian_increments(keys[2:3], 5000, 1e-4, jnp.float32))[:, 0], inc[:, 2])


def test_batch_equals_loop_of_single_solves_and_vmap():
    params = jr_jax.Prior().sample(jax.random.key(0), 4).replace(sigma=3.0).broadcast()
    keys = jax.random.split(jax.random.key(1), 4)
    ts = np.arange(0, 0.3, 1e-3)
    batched = np.asarray(jr_jax.solve(params, ts, key=keys, stimulus=STIM))
    looped = np.stack([np.asarray(jr_jax.solve(params[i], ts, key=keys[i], stimulus=STIM)) for i in range(4)])
    vmapped = np.asarray(jax.vmap(lambda p, k: jr_jax.solve(p, ts, key=k, stimulus=STIM))(params, keys))
    scale = np.max(np.abs(looped))
    np.testing.assert_allclose(batched, looped, rtol=0, atol=1e-5 * scale)  # float32 rounding only
    np.testing.assert_allclose(vmapped, looped, rtol=0, atol=1e-5 * scale)


def test_sigma_zero_or_no_key_is_the_ode():
    ts = np.arange(0, 0.2, 1e-3)
    a = jr_jax.solve(JRParams(), ts)
    b = jr_jax.solve(JRParams(), ts, key=jax.random.key(0))
    c = jr_jax.solve(JRParams(sigma=6.0), ts)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    d = jr_jax.solve(JRParams(sigma=6.0), ts, key=jax.random.key(0))
    assert not np.allclose(np.asarray(a), np.asarray(d))


def _erp_functional(ts, key=None, dt=2.5e-4):
    weights = np.sin(np.linspace(0, 3, len(ts)))

    def f(p):
        y = jr_jax.solve(p, ts, key=key, dt=dt, stimulus=STIM)
        return jnp.sum(weights * (y[:, 1] - y[:, 2]))

    return f


@pytest.mark.parametrize("stochastic", [False, True])
def test_gradient_matches_central_differences_float64(x64, stochastic):
    """jax.grad of a weighted ERP sum against central differences (h = 1e-6 relative).

    The fixed-step solution is a smooth function of the parameters, so the difference quotient has
    error O(h^2) + O(eps/h), about 1e-10 relative: rtol 1e-6 is loose for it, tight for any bug.
    """
    ts = np.round(np.arange(-0.05, 0.25 + 1e-9, 1e-3), 10)
    key = jax.random.key(7) if stochastic else None
    p0 = JRParams(**PARAM_SETS["mixed"], sigma=4.0 if stochastic else 0.0).astype(jnp.float64)
    f = _erp_functional(ts, key)
    grad = jax.grad(f)(p0)
    for name in jr_jax.STUDY_PARAMETERS + ("mu",):
        x = float(getattr(p0, name))
        h = 1e-6 * x
        fd = (f(p0.replace(**{name: x + h})) - f(p0.replace(**{name: x - h}))) / (2 * h)
        np.testing.assert_allclose(float(getattr(grad, name)), float(fd), rtol=1e-6, atol=1e-9, err_msg=name)


def test_gradient_float32_agrees_with_float64():
    """The float32 gradient is usable: within 1e-3 relative of the float64 one (norm over parameters)."""
    ts = np.round(np.arange(-0.05, 0.25 + 1e-9, 1e-3), 10)
    p = JRParams(**PARAM_SETS["mixed"])
    g32 = jax.grad(_erp_functional(ts))(p)
    with jax.enable_x64(True):
        g64 = jax.grad(_erp_functional(ts))(p.astype(jnp.float64))
    names = jr_jax.STUDY_PARAMETERS
    a = np.array([float(getattr(g32, n)) for n in names])
    b = np.array([float(getattr(g64, n)) for n in names])
    assert getattr(g32, "A_e").dtype == jnp.float32
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-3


def test_jit_does_not_retrace_for_new_values():
    ts = np.arange(0, 0.1, 1e-3)
    traces = []

    @jax.jit
    def f(p):
        traces.append(1)
        return jr_jax.solve(p, ts)

    f(JRParams(A_e=np.full(3, 3.0)))
    f(JRParams(A_e=np.full(3, 4.0)))
    assert len(traces) == 1


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: jr_jax.solve(JRParams(), np.zeros((2, 2))), ValueError, "ts must be a 1-D"),
        (lambda: jr_jax.solve(JRParams(), [0.0, 0.2, 0.1]), ValueError, "non-decreasing"),
        (lambda: jr_jax.solve(JRParams(), [0.0, 0.1], dt=0.0), ValueError, "dt must be a number > 0"),
        (lambda: jr_jax.solve(JRParams(), [0.0, 0.1], solver="rk45"), ValueError, "solver must be one of"),
        (lambda: jr_jax.solve(JRParams(), [0.0, 0.1], y0=np.zeros(5)), ValueError, "y0 must have shape"),
        (lambda: jr_jax.solve({"A_e": 3.0}, [0.0, 0.1]), TypeError, "params must be a JRParams"),
        (lambda: jr_jax.solve(JRParams(sigma=1.0), [0.0, 0.1], key=1), TypeError, "key must be a JAX PRNG key"),
        (lambda: jr_jax.solve(JRParams(sigma=np.ones(3)), [0.0, 0.1], key=jax.random.split(jax.random.key(0), 2)),
         ValueError, "keys of shape"),
        (lambda: jr_jax.solve(JRParams(A_e=np.ones((2, 2))), [0.0, 0.1]), ValueError, "one batch axis"),
        (lambda: jax.jit(lambda t: jr_jax.solve(JRParams(), t))(jnp.arange(3.0)), TypeError, "ts must be concrete"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_reverse_mode_gradient_of_a_densely_saved_solve(x64):
    """A solve saved at every step (111 points, Euler, 1 ms): jax.grad equals central differences.

    This configuration once gave reverse-mode gradients off by up to 5 % with diffrax's default
    checkpointing; the solver now keeps one checkpoint per step. rtol 1e-6 as above.
    """
    prior = jr_jax.Prior()
    theta = np.asarray(prior.sample_array(jax.random.key(0), 3))[1].astype(np.float64)
    ts = np.arange(111) * 1e-3 - 0.01

    def f(t):
        y = jr_jax.solve(prior.to_params(jnp.asarray(t)[None])[0], ts, dt=1e-3, solver="euler")
        return jnp.sum((y[:, 1] - y[:, 2]) ** 2)

    grad = np.asarray(jax.grad(f)(jnp.asarray(theta)))
    for j in range(len(theta)):
        h = 1e-6 * theta[j]
        up, down = theta.copy(), theta.copy()
        up[j] += h
        down[j] -= h
        fd = (float(f(up)) - float(f(down))) / (2 * h)
        np.testing.assert_allclose(grad[j], fd, rtol=1e-6, err_msg=prior.names[j])


def test_step_coefficients_give_the_model_drift(x64):
    """The solver's precomputed per-step drift equals ``dt * drift(y)`` (the model's own formula).

    Float64 at the parameter sets of the range corners and random states of PSP-sized amplitude
    (mV, mV/s): relative agreement 1e-12, i.e. the same function up to rounding.
    """
    from jr_jax._solve import StepCoefficients

    params = _batch(PARAM_SETS.values()).astype(jnp.float64)
    n = len(PARAM_SETS)
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(0.0, [[5.0]] * 3 + [[500.0]] * 3, (6, n)))
    dt = 2.5e-4
    got = np.stack(StepCoefficients.from_params(params, dt).step_drift(tuple(y)))
    want = dt * np.asarray(jr_jax.drift(None, y, params))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.max(np.abs(want)))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_a_trajectory_does_not_depend_on_its_batch(solver):
    """A parameter set solved in a batch of 5, under jax.vmap, and alone (SDE with the study stimulus,
    0.3 s at 0.1 ms, float32). vmap and the batch agree bit for bit. Alone, XLA compiles scalar code
    that may round a step's sums in another order (1 ulp a step): within 1e-4 of the largest |y|, the
    batch-layout tolerance of tests/test_simulate.py; a wrong key or parameter set is off by O(1)."""
    params = jr_jax.Prior().sample(jax.random.key(3), 5).replace(sigma=jr_jax.SIGMA_ABLEIDINGER_2017).broadcast()
    keys = jax.random.split(jax.random.key(4), 5)
    ts = np.arange(0.0, 0.3 + 1e-9, 1e-3)
    solve = jax.jit(lambda p, k: jr_jax.solve(p, ts, key=k, dt=1e-4, solver=solver, stimulus=STIM))
    batch = np.asarray(solve(params, keys))
    assert np.all(np.isfinite(batch))
    np.testing.assert_array_equal(np.asarray(jax.vmap(solve)(params, keys)), batch)
    alone = np.stack([np.asarray(solve(params[i], keys[i])) for i in range(5)])
    np.testing.assert_allclose(alone, batch, rtol=0, atol=1e-4 * np.abs(batch).max())
