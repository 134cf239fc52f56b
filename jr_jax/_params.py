"""Jansen-Rit parameters (units mV, s, s^-1), their ranges, and priors over them."""

from __future__ import annotations

from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

# name -> (JR-1995 default, unit, (low, high) of the study's range or None)
PARAMETER_INFO: dict[str, tuple[float, str, tuple[float, float] | None]] = {
    "A_e": (3.25, "mV", (2.6, 9.75)),
    "A_i": (22.0, "mV", (17.6, 110.0)),
    "b_e": (100.0, "1/s", (50.0, 150.0)),
    "b_i": (50.0, "1/s", (25.0, 75.0)),
    "C": (135.0, "1", (65.0, 1350.0)),
    "a_1": (1.0, "1", (0.5, 1.5)),
    "a_2": (0.8, "1", (0.4, 1.2)),
    "a_3": (0.25, "1", (0.125, 0.375)),
    "a_4": (0.25, "1", (0.125, 0.375)),
    "mu": (220.0, "1/s", (120.0, 320.0)),
    "sigma": (0.0, "1/sqrt(s)", None),
    "v0": (6.0, "mV", None),
    "e0": (2.5, "1/s", None),
    "r": (0.56, "1/mV", None),
}
PARAMETER_NAMES: tuple[str, ...] = tuple(PARAMETER_INFO)
#: The nine parameters the reference study varies (v2), in its order.
STUDY_PARAMETERS: tuple[str, ...] = ("A_e", "A_i", "b_e", "b_i", "C", "a_1", "a_2", "a_3", "a_4")

_POSITIVE = ("A_e", "A_i", "b_e", "b_i", "C", "a_1", "a_2", "a_3", "a_4", "e0", "r")
_NON_NEGATIVE = ("mu", "sigma")

#: sigma that reproduces the stochastic JR of Ableidinger, Buckwar & Hinterleitner (2017), whose
#: noise intensity on dY4 is 2000 = A_e * b_e * sigma at the default A_e = 3.25 mV, b_e = 100 /s.
SIGMA_ABLEIDINGER_2017 = 2000.0 / 325.0


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _as_float_array(x, name: str | None = None):
    if isinstance(x, jax.Array) or isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return jnp.asarray(x)
    field = f"JRParams.{name}" if name else "a JRParams field"
    if isinstance(x, (str, bytes)) or isinstance(x, np.ndarray) and x.dtype.kind in "OSUV":
        raise TypeError(f"{field} must be a number or an array of numbers, got {x!r:.80} ({type(x).__name__})")
    try:
        return jnp.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{field} must be a number or an array of numbers, got {x!r:.80} ({type(x).__name__}): "
                        f"{e}") from None


def _converter(name: str):
    """The converter of field ``name``: its errors name the field."""

    def convert(x):
        return _as_float_array(x, name)

    convert.__name__ = f"_as_float_array_{name}"
    return convert


class JRParams(eqx.Module):
    """Parameters of the Jansen-Rit model in mV, s and s^-1 (DESIGN §2).

    Every field is an array: scalars for one parameter set, or arrays with a common leading batch
    axis ``(N,)`` for a batch (fields may mix scalars and ``(N,)`` arrays; they broadcast).

    ``A_e``, ``A_i``: excitatory and inhibitory PSP amplitudes (mV); ``b_e``, ``b_i``: inverse
    PSP time constants (s^-1); ``C``: connectivity constant, with ``a_1..a_4`` its fractions
    (C1..C4 = a_k C); ``mu``: mean input firing rate (s^-1); ``sigma``: intensity of the white-noise
    input (s^-1/2; it enters dy4 as A_e b_e sigma dW, so sigma = 2000/325 ~ 6.15 gives the noise
    2000 of Ableidinger et al. 2017); ``v0`` (mV), ``e0`` (s^-1), ``r`` (mV^-1): sigmoid.
    """

    A_e: Float[Array, "*batch"] = eqx.field(default=3.25, converter=_converter("A_e"))
    A_i: Float[Array, "*batch"] = eqx.field(default=22.0, converter=_converter("A_i"))
    b_e: Float[Array, "*batch"] = eqx.field(default=100.0, converter=_converter("b_e"))
    b_i: Float[Array, "*batch"] = eqx.field(default=50.0, converter=_converter("b_i"))
    C: Float[Array, "*batch"] = eqx.field(default=135.0, converter=_converter("C"))
    a_1: Float[Array, "*batch"] = eqx.field(default=1.0, converter=_converter("a_1"))
    a_2: Float[Array, "*batch"] = eqx.field(default=0.8, converter=_converter("a_2"))
    a_3: Float[Array, "*batch"] = eqx.field(default=0.25, converter=_converter("a_3"))
    a_4: Float[Array, "*batch"] = eqx.field(default=0.25, converter=_converter("a_4"))
    mu: Float[Array, "*batch"] = eqx.field(default=220.0, converter=_converter("mu"))
    sigma: Float[Array, "*batch"] = eqx.field(default=0.0, converter=_converter("sigma"))
    v0: Float[Array, "*batch"] = eqx.field(default=6.0, converter=_converter("v0"))
    e0: Float[Array, "*batch"] = eqx.field(default=2.5, converter=_converter("e0"))
    r: Float[Array, "*batch"] = eqx.field(default=0.56, converter=_converter("r"))

    names: ClassVar[tuple[str, ...]] = PARAMETER_NAMES

    def __check_init__(self):
        shapes = []
        for name in PARAMETER_NAMES:
            value = getattr(self, name)
            if not jnp.issubdtype(value.dtype, jnp.floating):
                raise TypeError(f"JRParams.{name} must be a floating-point array, got {value.dtype}")
            shapes.append(value.shape)
            if not _is_concrete(value):
                continue
            v = np.asarray(value)
            if not np.all(np.isfinite(v)):
                raise ValueError(f"JRParams.{name} must be finite, got {v}")
            if name in _POSITIVE and not np.all(v > 0):
                raise ValueError(
                    f"JRParams.{name} must be > 0 ({PARAMETER_INFO[name][1]}), got min {v.min()}"
                )
            if name in _NON_NEGATIVE and not np.all(v >= 0):
                raise ValueError(
                    f"JRParams.{name} must be >= 0 ({PARAMETER_INFO[name][1]}), got min {v.min()}"
                )
        try:
            np.broadcast_shapes(*shapes)
        except ValueError:
            raise ValueError(
                "JRParams fields must broadcast to one batch shape; got shapes "
                + ", ".join(f"{n}={s}" for n, s in zip(PARAMETER_NAMES, shapes))
            ) from None

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Common shape of all fields: ``()`` for one parameter set, ``(N,)`` for a batch."""
        return np.broadcast_shapes(*(getattr(self, n).shape for n in PARAMETER_NAMES))

    def broadcast(self) -> "JRParams":
        """The same parameters with every field broadcast to ``batch_shape``."""
        shape = self.batch_shape
        return JRParams(**{n: jnp.broadcast_to(getattr(self, n), shape) for n in PARAMETER_NAMES})

    def astype(self, dtype) -> "JRParams":
        return JRParams(**{n: getattr(self, n).astype(dtype) for n in PARAMETER_NAMES})

    def replace(self, **values) -> "JRParams":
        """A copy with the named fields replaced."""
        unknown = set(values) - set(PARAMETER_NAMES)
        if unknown:
            raise ValueError(f"unknown JRParams field(s) {sorted(unknown)}; allowed: {PARAMETER_NAMES}")
        return JRParams(**{n: values.get(n, getattr(self, n)) for n in PARAMETER_NAMES})

    def __getitem__(self, index) -> "JRParams":
        """Index the batch axis: ``params[i]`` is the i-th parameter set."""
        b = self.broadcast()
        return JRParams(**{n: getattr(b, n)[index] for n in PARAMETER_NAMES})

    def __len__(self) -> int:
        shape = self.batch_shape
        if not shape:
            raise TypeError("len() of an unbatched JRParams")
        return shape[0]

    def to_dict(self) -> dict[str, float | list]:
        """Field values as plain Python numbers or lists (JSON-ready)."""
        return {n: np.asarray(getattr(self, n)).tolist() for n in PARAMETER_NAMES}

    # --- the millisecond convention of TVB / vbjax / tvboptim --------------------------------

    def to_tvb(self) -> dict[str, np.ndarray]:
        """Values in TVB's ``JansenRit`` names and units (ms, ms^-1, mV).

        Rates are divided by 1000 (``a = b_e/1000`` ms^-1, ...); ``v0`` is passed through as it is
        (TVB's own default is 5.52 mV, jr_jax's 6 mV: no value is changed behind your back).
        ``J`` is TVB's name for C. ``sigma`` has no TVB counterpart and is not returned.
        """
        return {tvb: np.asarray(getattr(self, ours)) * scale for tvb, (ours, scale) in _TVB.items()}

    @classmethod
    def from_tvb(cls, **tvb_values) -> "JRParams":
        """Parameters from values in TVB's names and ms units (the inverse of :meth:`to_tvb`).

        Every name of TVB's ``JansenRit`` that jr_jax models must be given: ``A, B, a, b, J,
        a_1, a_2, a_3, a_4, mu, v0, nu_max, r``. Missing names raise, because TVB's defaults
        differ from jr_jax's (v0 = 5.52 vs 6 mV) and nothing is guessed.
        """
        missing = [n for n in _TVB if n not in tvb_values]
        unknown = [n for n in tvb_values if n not in _TVB]
        if missing or unknown:
            raise ValueError(
                f"from_tvb needs exactly the TVB names {list(_TVB)}; missing {missing}, unknown {unknown}"
            )
        return cls(**{ours: np.asarray(tvb_values[tvb], float) / scale for tvb, (ours, scale) in _TVB.items()})


# TVB name -> (jr_jax name, factor from jr_jax units to TVB units)
_TVB: dict[str, tuple[str, float]] = {
    "A": ("A_e", 1.0),
    "B": ("A_i", 1.0),
    "a": ("b_e", 1e-3),
    "b": ("b_i", 1e-3),
    "J": ("C", 1.0),
    "a_1": ("a_1", 1.0),
    "a_2": ("a_2", 1.0),
    "a_3": ("a_3", 1.0),
    "a_4": ("a_4", 1.0),
    "mu": ("mu", 1e-3),
    "v0": ("v0", 1.0),
    "nu_max": ("e0", 1e-3),
    "r": ("r", 1.0),
}


class Prior(eqx.Module):
    """A prior over some JR parameters; the others are held at ``base``.

    ``kind="uniform"`` (default): box-uniform over ``bounds``. ``kind="normal"``: the study's
    normal (mean at the middle of the range, SD a quarter of the range) truncated to the range,
    so that no draw leaves it (the study's untruncated draws produced negative rates).

    ``names``: the varied parameters (default: the study's nine). ``bounds``: ``{name: (low,
    high)}`` overriding the study's ranges (DESIGN §2).
    """

    names: tuple[str, ...] = eqx.field(static=True, default=STUDY_PARAMETERS)
    kind: Literal["uniform", "normal"] = eqx.field(static=True, default="uniform")
    bounds: dict[str, tuple[float, float]] | None = eqx.field(static=True, default=None)
    base: JRParams = eqx.field(default_factory=JRParams)

    def __check_init__(self):
        if self.kind not in ("uniform", "normal"):
            raise ValueError(f"Prior kind must be 'uniform' or 'normal', got {self.kind!r}")
        if len(self.names) == 0 or len(set(self.names)) != len(self.names):
            raise ValueError(f"Prior names must be distinct and non-empty, got {self.names}")
        for n in self.names:
            if n not in PARAMETER_INFO:
                raise ValueError(f"Prior names: unknown parameter {n!r}; allowed {PARAMETER_NAMES}")
        for n in self.bounds or {}:
            if n not in self.names:
                raise ValueError(f"Prior bounds given for {n!r}, which is not in names {self.names}")
        lows, highs = self.lows, self.highs
        for n, lo, hi in zip(self.names, lows, highs):
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"Prior bounds for {n}: need finite low < high, got ({lo}, {hi})")
            if n in _POSITIVE and lo <= 0:
                raise ValueError(f"Prior bounds for {n}: the low bound must be > 0, got {lo}")
            if n in _NON_NEGATIVE and lo < 0:
                raise ValueError(f"Prior bounds for {n}: the low bound must be >= 0, got {lo}")
        if self.base.batch_shape != ():
            raise ValueError("Prior base must be an unbatched JRParams")

    def _bound(self, name: str) -> tuple[float, float]:
        if self.bounds and name in self.bounds:
            try:
                lo, hi = self.bounds[name]
                return float(lo), float(hi)
            except (TypeError, ValueError):
                raise ValueError(f"Prior bounds for {name}: need two numbers (low, high), "
                                 f"got {self.bounds[name]!r:.80}") from None
        rng = PARAMETER_INFO[name][2]
        if rng is None:
            raise ValueError(f"Prior: {name} has no default range; pass bounds={{'{name}': (low, high)}}")
        return rng

    @property
    def lows(self) -> np.ndarray:
        """Low bounds, shape ``(n_params,)``, in each parameter's unit."""
        return np.array([self._bound(n)[0] for n in self.names])

    @property
    def highs(self) -> np.ndarray:
        """High bounds, shape ``(n_params,)``."""
        return np.array([self._bound(n)[1] for n in self.names])

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(PARAMETER_INFO[n][1] for n in self.names)

    def sample_array(self, key: PRNGKeyArray, n: int, *, first_index: int = 0) -> Float[Array, "n n_params"]:
        """``n`` draws as an array ``(n, n_params)`` in the order of ``names``.

        Row i is draw ``first_index + i``, which depends only on ``key`` and that index (not on n).
        """
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"Prior.sample: n must be a positive integer, got {n!r}")
        lows, highs = jnp.asarray(self.lows), jnp.asarray(self.highs)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(first_index, first_index + n))
        d = len(self.names)
        if self.kind == "uniform":
            u = jax.vmap(lambda k: jax.random.uniform(k, (d,)))(keys)
            return lows + (highs - lows) * u
        z = jax.vmap(lambda k: jax.random.truncated_normal(k, -2.0, 2.0, (d,)))(keys)
        return jnp.clip((lows + highs) / 2 + (highs - lows) / 4 * z, lows, highs)

    def sample(self, key: PRNGKeyArray, n: int, *, first_index: int = 0) -> JRParams:
        """``n`` draws as a batched :class:`JRParams` (every field of shape ``(n,)``)."""
        return self.to_params(self.sample_array(key, n, first_index=first_index))

    def to_dict(self) -> dict:
        """A JSON-ready description; :meth:`from_dict` rebuilds the same prior."""
        return dict(
            kind=self.kind,
            names=list(self.names),
            bounds={n: [float(lo), float(hi)] for n, lo, hi in zip(self.names, self.lows, self.highs)},
            base=self.base.to_dict(),
        )

    @classmethod
    def from_dict(cls, d: dict) -> "Prior":
        return cls(
            names=tuple(d["names"]),
            kind=d["kind"],
            bounds={n: tuple(b) for n, b in d["bounds"].items()},
            base=JRParams(**d["base"]),
        )

    def to_params(self, theta: Float[Array, "n n_params"]) -> JRParams:
        """Rows of ``theta`` (in the order of ``names``) as a batched ``JRParams``."""
        theta = jnp.asarray(theta)
        if theta.ndim != 2 or theta.shape[1] != len(self.names):
            raise ValueError(f"theta must have shape (n, {len(self.names)}), got {theta.shape}")
        values = {n: theta[:, i] for i, n in enumerate(self.names)}
        return self.base.replace(**values).broadcast()

    def to_array(self, params: JRParams) -> Float[Array, "n n_params"]:
        """The varied parameters of ``params`` as an array ``(N, n_params)``."""
        b = params.broadcast()
        return jnp.stack([jnp.atleast_1d(getattr(b, n)) for n in self.names], axis=-1)
