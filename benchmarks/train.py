"""Training throughput: the Equinox Bi-LSTM against torch.nn.LSTM, same sizes, same batch, one run.

Both: one bidirectional LSTM layer of 64 units per direction on (batch 32, 1201 time steps, 1
channel), dropout 0.1, a linear head to 9 outputs on the final states, MSE loss, Adam; torch on 2
threads (`torch.set_num_threads(2)`). jr_jax is measured on one device and with the batch split
over one host device per core (what `jr_jax.train` does when the `jr-jax` command has set up the
devices; both use the same two cores as torch). Measured: samples/s of full training steps
(forward, backward, update), compile/warm-up apart. torch is a benchmark-only dependency:
`pip install torch==2.13.0`. Writes JSON.

    python benchmarks/train.py [--steps 30] [--repeats 5] [--out benchmarks/results/train.json]
"""

import argparse
import json
import os
import time
from pathlib import Path

# one JAX host device per core (read when JAX initialises its backend, so before any computation)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={os.cpu_count() or 1}").strip()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jr_jax._nn import BiLSTM  # noqa: E402
from jr_jax._train import _data_parallel  # noqa: E402

B, T, C, H, OUT = 32, 1201, 1, 64, 9


def jax_rate(steps, *, split_batch=False, **options):
    model = BiLSTM(C, OUT, hidden=H, **options, key=jax.random.key(0))
    opt = optax.adam(1e-3)
    state = opt.init(eqx.filter(model, eqx.is_array))
    put = jnp.asarray
    if split_batch:
        put, model, state = _data_parallel(B, model, state)

    @eqx.filter_jit
    def step(model, state, x, y, key):
        def loss(m):
            return jnp.mean((m.batch(x, keys=jax.random.split(key, x.shape[0])) - y) ** 2)

        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, value

    x = put(np.asarray(jax.random.normal(jax.random.key(1), (B, T, C))))
    y = put(np.zeros((B, OUT), np.float32))
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
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the ratio is their median")
    ap.add_argument("--out", default="benchmarks/results/train.json")
    args = ap.parse_args()
    n_dev = len(jax.local_devices())
    runs = []
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits all three alike
        one_sps, compile_s = jax_rate(args.steps)
        split_sps, split_compile_s = jax_rate(args.steps, split_batch=True)
        torch_sps, torch_version = torch_rate(args.steps)
        runs.append(dict(one=one_sps, split=split_sps, torch=torch_sps))
    conv_sps, _ = jax_rate(args.steps, split_batch=True, conv_channels=16, conv_kernel=8, conv_stride=4)
    med = {k: float(np.median([r[k] for r in runs])) for k in ("one", "split", "torch")}
    ratios = [r["split"] / r["torch"] for r in runs]
    ratios_one = [r["one"] / r["torch"] for r in runs]
    ratio, ratio_one = float(np.median(ratios)), float(np.median(ratios_one))
    print(f"batch {B} x {T} steps x {C} channel, LSTM {H} units per direction, bidirectional, 1 layer; "
          f"medians of {args.repeats} interleaved repeats of {args.steps} steps")
    print(f"Equinox Bi-LSTM (jr_jax), one device            {med['one']:7.1f} samples/s   (compile {compile_s:.1f} s)")
    print(f"Equinox Bi-LSTM (jr_jax), batch over {n_dev} devices   {med['split']:7.1f} samples/s   "
          f"(compile {split_compile_s:.1f} s)")
    print(f"torch.nn.LSTM {torch_version:8s} (2 threads)          {med['torch']:7.1f} samples/s")
    print(f"ratio jr_jax ({n_dev} devices) / torch              {ratio:7.2f}   (range {min(ratios):.2f}-{max(ratios):.2f}; "
          f"target >= 1.0, aim 2.0); one device: {ratio_one:.2f} ({min(ratios_one):.2f}-{max(ratios_one):.2f})")
    print(f"jr_jax with a stride-4 Conv1d front-end (16 channels), {n_dev} devices: {conv_sps:.1f} samples/s")
    result = dict(batch=B, time_steps=T, hidden=H, devices=n_dev, steps=args.steps, repeats=args.repeats,
                  jax_one_device_samples_per_s=med["one"], jax_samples_per_s=med["split"],
                  torch_samples_per_s=med["torch"], ratio=ratio, ratio_range=[min(ratios), max(ratios)],
                  ratio_one_device=ratio_one, ratio_one_device_range=[min(ratios_one), max(ratios_one)],
                  runs=runs, target=1.0, met=ratio >= 1.0, jax_compile_s=compile_s,
                  torch=torch_version, jax=jax.__version__, conv_frontend_samples_per_s=conv_sps,
                  numpy=np.__version__)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
