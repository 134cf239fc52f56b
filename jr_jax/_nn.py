"""Encoders that map an ERP ``(n_times, n_channels)`` to a parameter vector ``(n_out,)``.

One interface: an ``eqx.Module`` called as ``encoder(x, *, key=None, inference=False)`` on one
sample (vmap for a batch), plus ``config`` (a JSON-ready dict) so that :func:`build_encoder`
can rebuild it for loading. The study's preset is :class:`BiLSTM` with its defaults: one
bidirectional layer of 64 units per direction, dropout 0.1, a linear head.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class _BiLSTMLayer(eqx.Module):
    """Both directions of an LSTM layer in one scan.

    The input projections of all time steps are computed in one matrix product before the scan,
    and both directions advance together, so the sequential part is one small matmul per step.
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

    def __call__(self, x: Float[Array, "T d"]) -> tuple[Float[Array, "T 2h"], Float[Array, " 2h"]]:
        """Sequence of both directions' outputs ``(T, 2h)`` and their final states ``(2h,)``."""
        h = self.hidden
        xs = jnp.stack([x, x[::-1]])  # (2, T, d): forward and time-reversed input
        pre = jnp.einsum("gkd,gtd->tgk", self.w_in, xs) + self.bias  # (T, 2, 4h)

        def step(carry, p):
            hs, cs = carry  # (2, h) each
            z = p + jnp.einsum("gkh,gh->gk", self.w_rec, hs)
            gates = jax.nn.sigmoid(z[:, : 3 * h])
            i, f, o = gates[:, :h], gates[:, h:2 * h], gates[:, 2 * h:]
            cs = f * cs + i * jnp.tanh(z[:, 3 * h:])
            hs = o * jnp.tanh(cs)
            return (hs, cs), hs

        zeros = jnp.zeros((2, h), pre.dtype)
        (h_last, _), out = jax.lax.scan(step, (zeros, zeros), pre)  # out (T, 2, h)
        seq = jnp.concatenate([out[:, 0], out[::-1, 1]], axis=-1)
        return seq, h_last.reshape(-1)


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
        if self.conv is not None:
            x = jax.nn.gelu(self.conv(x.T)).T  # Conv1d works on (channels, time)
        final = None
        for layer in self.layers:
            x, final = layer(x)
        final = self.dropout(final, key=key, inference=inference or key is None)
        return self.head(final)


ENCODERS = {"bilstm": BiLSTM}


def build_encoder(config: dict, *, key: PRNGKeyArray) -> eqx.Module:
    """An encoder from its ``config`` (as stored in an estimator's manifest)."""
    config = dict(config)
    kind = config.pop("kind")
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder kind {kind!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[kind](**config, key=key)
