"""Shared test helpers: an independent NumPy/SciPy reference of the JR model (DESIGN §2)."""

import functools
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from scipy.integrate import solve_ivp

# Equinox's runtime checks (inside diffrax and optimistix) lower to host callbacks by default, and
# XLA programs with host callbacks are never written to the persistent compilation cache below.
# In the tests they return NaN instead of raising (jr_jax's own solves already pass throw=False and
# flag failures by value), so the big programs (the fit's solve, the SMC) are compiled once per run
# and loaded from the cache in the other processes: the xdist workers, the CLI, the notebooks'
# kernels. Set before equinox is first imported, and inherited by every subprocess.
os.environ.setdefault("EQX_ON_ERROR", "nan")
# and keep programs that compile in a fraction of a second as well (many tests share them)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jr_jax  # noqa: E402


def pytest_configure(config):
    """One persistent XLA compilation cache for this run, shared by the xdist workers and by the
    subprocesses the tests start (the CLI, the notebooks' kernels), so that a program compiled in one
    process is loaded, not compiled again, in another. The cache is a fresh temporary folder, removed
    at the end: nothing is carried between runs."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ and not hasattr(config, "workerinput"):
        cache = tempfile.mkdtemp(prefix="jr_jax_xla_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        config._jr_jax_cache = cache
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
    cache = getattr(config, "_jr_jax_cache", None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
        del os.environ["JAX_COMPILATION_CACHE_DIR"]


_GROUP_MARK = re.compile(r"^pytestmark = pytest\.mark\.xdist_group\(", re.MULTILINE)


@functools.lru_cache(maxsize=None)
def _module_is_grouped(path: str) -> bool:
    """Whether a test module declares ``pytestmark = pytest.mark.xdist_group(...)``."""
    try:
        return bool(_GROUP_MARK.search(Path(path).read_text()))
    except OSError:
        return False


def pytest_xdist_make_scheduler(config, log):
    """Each module that declares an xdist_group runs whole on one worker, so its module fixtures are
    built once; every other test is scheduled on its own. (xdist's own ``loadgroup`` marks the group
    in the test's node id, which pytest >= 9.2 no longer lets a plugin rewrite: the groups were split
    over the workers and every module fixture was built on both.) The controller does not import the
    test modules, so it reads the mark from the module's text."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if _module_is_grouped(str(config.rootpath / module)) else nodeid

    return ModuleGroupScheduling(config, log)


# Parameter sets: defaults, the study's range corners, and a mixed point.
LOW = {n: jr_jax.PARAMETER_INFO[n][2][0] for n in jr_jax.STUDY_PARAMETERS}
HIGH = {n: jr_jax.PARAMETER_INFO[n][2][1] for n in jr_jax.STUDY_PARAMETERS}
MIXED = dict(A_e=5.0, A_i=30.0, b_e=80.0, b_i=40.0, C=300.0, a_1=1.2, a_2=0.6, a_3=0.3, a_4=0.2)
PARAM_SETS = {"default": {}, "low": LOW, "high": HIGH, "mixed": MIXED}


def reference_rhs(p: dict, stim_amplitude=0.0, stim_duration=0.05, gains=(0.0, 1.0, 0.0)):
    """dy/dt written out from DESIGN §2, with JR-1995 defaults for keys not in ``p``."""
    q = {n: jr_jax.PARAMETER_INFO[n][0] for n in jr_jax.PARAMETER_INFO}
    q.update(p)
    A, B, a, b, C = q["A_e"], q["A_i"], q["b_e"], q["b_i"], q["C"]
    C1, C2, C3, C4 = q["a_1"] * C, q["a_2"] * C, q["a_3"] * C, q["a_4"] * C

    def S(v):
        with np.errstate(over="ignore"):  # exp overflow -> S = 0, the correct limit
            return 2 * q["e0"] / (1 + np.exp(q["r"] * (q["v0"] - v)))

    def f(t, y):
        s = stim_amplitude if 0.0 <= t < stim_duration else 0.0
        return [
            y[3],
            y[4],
            y[5],
            A * a * (S(y[1] - y[2]) + gains[0] * s) - 2 * a * y[3] - a * a * y[0],
            A * a * (q["mu"] + gains[1] * s + C2 * S(C1 * y[0])) - 2 * a * y[4] - a * a * y[1],
            B * b * (C4 * S(C3 * y[0]) + gains[2] * s) - 2 * b * y[5] - b * b * y[2],
        ]

    return f


def reference_solution(p, ts, y0=None, stimulus=None, rtol=1e-11, atol=1e-11):
    """DOP853 solution at ``ts`` (s), integrated piecewise between the stimulus edges.

    The JR drift depends on t only through the stimulus, which is constant on each piece, so each
    piece is a smooth autonomous ODE that DOP853 resolves to ``rtol``.
    """
    stimulus = stimulus or jr_jax.Stimulus(amplitude=0.0)
    f = reference_rhs(p, stimulus.amplitude, stimulus.duration, stimulus.gains)
    ts = np.asarray(ts, float)
    edges = [e for e in (0.0, stimulus.duration) if ts[0] < e < ts[-1]]
    bounds = [ts[0], *edges, ts[-1]]
    y = np.zeros(6) if y0 is None else np.asarray(y0, float)
    out = np.empty((len(ts), 6))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        level_time = 0.5 * (lo + hi)
        rhs = lambda t, y, tl=level_time: f(tl, y)  # noqa: E731
        sel = (ts >= lo) & (ts <= hi)
        sol = solve_ivp(rhs, (lo, hi), y, method="DOP853", t_eval=ts[sel], rtol=rtol, atol=atol, dense_output=True)
        out[sel] = sol.y.T
        y = sol.sol(hi)
    return out


@pytest.fixture
def x64():
    import jax

    with jax.enable_x64(True):
        yield
