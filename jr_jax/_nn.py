"""Encoders that map an ERP ``(n_times, n_channels)`` to a parameter vector ``(n_out,)``.

One interface: an ``eqx.Module`` called as ``encoder(x, *, key=None, inference=False)`` on one
sample and ``encoder.batch(x, *, keys=None, inference=False)`` on a batch, plus ``config`` (a
JSON-ready dict) so that :func:`build_encoder` can rebuild it for loading. The study's preset is :class:`BiLSTM` with its defaults: one
bidirectional layer of 64 units per direction, dropout 0.1, a linear head.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def _gates(z, h: int):
    """Gate activations from pre-activations ``z (..., 4h)`` in the order (input, forget, output, cell)."""
    s = jax.nn.sigmoid(z[..., : 3 * h])
    return s[..., :h], s[..., h:2 * h], s[..., 2 * h:], jnp.tanh(z[..., 3 * h:])


def _lstm_forward(pre, w_rec):
    """``pre (T, 2, B, 4h)`` input projections, ``w_rec (2, 4h, h)``: hidden states ``(T, 2, B, h)``,
    plus cell states and gate activations for the backward pass."""
    h = w_rec.shape[-1]

    def step(carry, p):
        hs, cs = carry  # (2, B, h) each
        i, f, o, g = _gates(p + jnp.einsum("gbh,gkh->gbk", hs, w_rec), h)
        cs = f * cs + i * g
        hs = o * jnp.tanh(cs)
        return (hs, cs), (hs, cs, jnp.concatenate([i, f, o, g], axis=-1))

    zeros = jnp.zeros(pre.shape[1:3] + (h,), pre.dtype)
    _, (hs, cs, acts) = jax.lax.scan(step, (zeros, zeros), pre)
    return hs, cs, acts


@jax.custom_vjp
def lstm_scan(pre: Float[Array, "T 2 B 4h"], w_rec: Float[Array, "2 4h h"]) -> Float[Array, "T 2 B h"]:
    """Both directions of an LSTM layer over a batch: hidden states ``(T, 2, B, h)`` from the input
    projections ``pre`` and the recurrent weights ``w_rec`` (zero initial state).

    Differentiated by a hand-written backward pass: the reverse scan carries only the state
    gradients (one small matrix product per step), and the recurrent weights' gradient is one
    large product after it, rather than one accumulation per step as autodiff of the scan does.
    """
    return _lstm_forward(pre, w_rec)[0]


def _lstm_scan_fwd(pre, w_rec):
    hs, cs, acts = _lstm_forward(pre, w_rec)
    return hs, (hs, cs, acts, w_rec)


def _lstm_scan_bwd(residuals, d_hs):
    hs, cs, acts, w_rec = residuals
    h = hs.shape[-1]
    c_prev = jnp.concatenate([jnp.zeros_like(cs[:1]), cs[:-1]])
    h_prev = jnp.concatenate([jnp.zeros_like(hs[:1]), hs[:-1]])

    def step(carry, xs):
        dh_next, dc_next = carry
        dh_out, c, cp, a = xs
        i, f, o, g = a[..., :h], a[..., h:2 * h], a[..., 2 * h:3 * h], a[..., 3 * h:]
        dh = dh_out + dh_next
        tc = jnp.tanh(c)
        dc = dc_next + dh * o * (1.0 - tc * tc)
        dz = jnp.concatenate([dc * g * i * (1.0 - i), dc * cp * f * (1.0 - f), dh * tc * o * (1.0 - o),
                              dc * i * (1.0 - g * g)], axis=-1)
        return (jnp.einsum("gbk,gkh->gbh", dz, w_rec), dc * f), dz

    zeros = jnp.zeros(hs.shape[1:], hs.dtype)
    _, dz = jax.lax.scan(step, (zeros, zeros), (d_hs, cs, c_prev, acts), reverse=True)
    return dz, jnp.einsum("tgbk,tgbh->gkh", dz, h_prev)


lstm_scan.defvjp(_lstm_scan_fwd, _lstm_scan_bwd)


class _BiLSTMLayer(eqx.Module):
    """Both directions of an LSTM layer in one scan over a batch.

    The input projections of all time steps are computed in one matrix product before the scan,
    both directions advance together, and the batch is the rows of each step's matrix product, so
    the sequential part is one small matmul per step (see :func:`lstm_scan` for the backward pass).
    Gates in the order (input, forget, output, cell), so that the three sigmoids are one operation.
    """

    w_in: Float[Array, "2 4h d"]
    w_rec: Float[Array, "2 4h h"]
    bias: Float[Array, "2 4h"]
    hidden: int = eqx.field(static=True)

    def __init__(self, input_size: int, hidden: int, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        bound = 1.0 / math.sqrt(hidden)  # the usual LSTM initialisation, U(-1/sqrt(h), 1/sqrt(h))
        self.w_in = jax.random.uniform(k1, (2, 4 * hidden, input_size), minval=-bound, maxval=bound)
        self.w_rec = jax.random.uniform(k2, (2, 4 * hidden, hidden), minval=-bound, maxval=bound)
        # forget-gate bias 1: a common choice that helps long sequences
        self.bias = jnp.zeros((2, 4 * hidden)).at[:, hidden:2 * hidden].set(1.0)
        self.hidden = hidden

    def __call__(self, x: Float[Array, "B T d"]) -> tuple[Float[Array, "B T 2h"], Float[Array, "B 2h"]]:
        """Both directions' outputs ``(B, T, 2h)`` and their final states ``(B, 2h)``."""
        xs = jnp.stack([x, x[:, ::-1]])  # (2, B, T, d): forward and time-reversed input
        pre = jnp.einsum("gkd,gbtd->tgbk", self.w_in, xs) + self.bias[None, :, None]  # (T, 2, B, 4h)
        out = lstm_scan(pre, self.w_rec)  # (T, 2, B, h)
        seq = jnp.concatenate([out[:, 0], out[::-1, 1]], axis=-1).transpose(1, 0, 2)
        return seq, jnp.concatenate([out[-1, 0], out[-1, 1]], axis=-1)


class BiLSTM(eqx.Module):
    """Bidirectional LSTM encoder (the study's network), with an optional strided convolution
    front-end (its CNN-BiLSTM), stacked layers and several input channels.

    ``x``: ``(n_times, n_channels)``; output ``(n_out,)``: a linear head on the final states of
    both directions of the last layer (Keras' ``Bidirectional(LSTM(...))``).
    """

    conv: eqx.nn.Conv1d | None
    layers: tuple[_BiLSTMLayer, ...]
    dropout: eqx.nn.Dropout
    head: eqx.nn.Linear
    config: dict = eqx.field(static=True)

    def __init__(
        self,
        n_channels: int,
        n_out: int,
        *,
        hidden: int = 64,
        layers: int = 1,
        dropout: float = 0.1,
        conv_channels: int = 0,
        conv_kernel: int = 8,
        conv_stride: int = 4,
        key: PRNGKeyArray,
    ):
        for name, value, low in (("n_channels", n_channels, 1), ("n_out", n_out, 1), ("hidden", hidden, 1),
                                 ("layers", layers, 1), ("conv_channels", conv_channels, 0),
                                 ("conv_kernel", conv_kernel, 1), ("conv_stride", conv_stride, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"BiLSTM {name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"BiLSTM dropout must be in [0, 1), got {dropout!r}")
        keys = jax.random.split(key, layers + 2)
        width = n_channels
        self.conv = None
        if conv_channels:
            self.conv = eqx.nn.Conv1d(n_channels, conv_channels, conv_kernel, stride=conv_stride, key=keys[-2])
            width = conv_channels
        stack = []
        for k in range(layers):
            stack.append(_BiLSTMLayer(width, hidden, key=keys[k]))
            width = 2 * hidden
        self.layers = tuple(stack)
        self.dropout = eqx.nn.Dropout(dropout)
        self.head = eqx.nn.Linear(2 * hidden, n_out, key=keys[-1])
        self.config = dict(kind="bilstm", n_channels=n_channels, n_out=n_out, hidden=hidden, layers=layers,
                           dropout=dropout, conv_channels=conv_channels, conv_kernel=conv_kernel,
                           conv_stride=conv_stride)

    def __call__(self, x: Float[Array, "T C"], *, key: PRNGKeyArray | None = None, inference: bool = False):
        """One ERP ``(n_times, n_channels)`` to ``(n_out,)``; ``key`` for dropout (none: inference)."""
        keys = None if key is None else key[None]
        return self.batch(x[None], keys=keys, inference=inference)[0]

    def batch(self, x: Float[Array, "B T C"], *, keys: PRNGKeyArray | None = None, inference: bool = False):
        """A batch ``(B, n_times, n_channels)`` to ``(B, n_out)``; ``keys (B,)`` for dropout.

        The same numbers as :meth:`__call__` per sample, computed with the batch as the rows of
        each recurrent step's matrix product (faster than ``jax.vmap`` over :meth:`__call__`).
        """
        if self.conv is not None:
            x = jax.vmap(lambda xi: jax.nn.gelu(self.conv(xi.T)).T)(x)  # Conv1d works on (channels, time)
        final = None
        for layer in self.layers:
            x, final = layer(x)
        if keys is None or inference:
            final = self.dropout(final, inference=True)
        else:
            final = jax.vmap(lambda f, k: self.dropout(f, key=k))(final, keys)
        return jax.vmap(self.head)(final)


ENCODERS = {"bilstm": BiLSTM}


def build_encoder(config: dict, *, key: PRNGKeyArray) -> eqx.Module:
    """An encoder from its ``config`` (as stored in an estimator's manifest)."""
    config = dict(config)
    kind = config.pop("kind")
    if kind == "posterior":  # the flow head lives in _flow (it imports this module)
        from ._flow import PosteriorNet

        return PosteriorNet(**config, key=key)
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder kind {kind!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[kind](**config, key=key)
