"""Training throughput: the Equinox Bi-LSTM against torch.nn.LSTM, same sizes, same batch, one run.

Both: one bidirectional LSTM layer of 64 units per direction on (batch 32, 1201 time steps, 1
channel), dropout 0.1, a linear head to 9 outputs on the final states, MSE loss, Adam; torch on 2
threads (`torch.set_num_threads(2)`). Measured: samples/s of full training steps (forward,
backward, update), compile/warm-up apart. torch is a benchmark-only dependency:
`pip install torch==2.13.0`. Writes JSON.

    python benchmarks/train.py [--steps 10] [--out benchmarks/results/train.json]
"""

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jr_jax._nn import BiLSTM

B, T, C, H, OUT = 32, 1201, 1, 64, 9


def jax_rate(steps, **options):
    model = BiLSTM(C, OUT, hidden=H, **options, key=jax.random.key(0))
    opt = optax.adam(1e-3)
    state = opt.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state, x, y, key):
        def loss(m):
            keys = jax.random.split(key, x.shape[0])
            return jnp.mean((jax.vmap(lambda xi, k: m(xi, key=k))(x, keys) - y) ** 2)

        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, value

    x = jax.random.normal(jax.random.key(1), (B, T, C))
    y = jnp.zeros((B, OUT))
    t = time.perf_counter()
    model, state, value = step(model, state, x, y, jax.random.key(2))
    jax.block_until_ready(value)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        model, state, value = step(model, state, x, y, jax.random.key(i))
    jax.block_until_ready(value)
    return B * steps / (time.perf_counter() - t), compile_s


def torch_rate(steps):
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(C, H, batch_first=True, bidirectional=True)
            self.drop = torch.nn.Dropout(0.1)
            self.head = torch.nn.Linear(2 * H, OUT)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return self.head(self.drop(torch.cat([h[0], h[1]], dim=-1)))

    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = torch.randn(B, T, C), torch.zeros(B, OUT)

    def step():
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return B * steps / (time.perf_counter() - t), torch.__version__


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/train.json")
    args = ap.parse_args()
    jax_sps, compile_s = jax_rate(args.steps)
    torch_sps, torch_version = torch_rate(args.steps)
    conv_sps, _ = jax_rate(args.steps, conv_channels=16, conv_kernel=8, conv_stride=4)
    ratio = jax_sps / torch_sps
    print(f"batch {B} x {T} steps x {C} channel, LSTM {H} units per direction, bidirectional, 1 layer")
    print(f"Equinox Bi-LSTM (jr_jax)   {jax_sps:7.1f} samples/s   (compile {compile_s:.1f} s)")
    print(f"torch.nn.LSTM {torch_version:8s}  {torch_sps:7.1f} samples/s   (2 threads)")
    print(f"ratio jr_jax / torch       {ratio:7.2f}   (target >= 1.0, aim 2.0)")
    print(f"jr_jax with a stride-4 Conv1d front-end (16 channels): {conv_sps:.1f} samples/s")
    result = dict(batch=B, time_steps=T, hidden=H, jax_samples_per_s=jax_sps, torch_samples_per_s=torch_sps,
                  ratio=ratio, target=1.0, met=ratio >= 1.0, jax_compile_s=compile_s, torch=torch_version,
                  jax=jax.__version__, conv_frontend_samples_per_s=conv_sps, numpy=np.__version__)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
