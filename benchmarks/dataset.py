"""Dataset pipeline throughput and memory: make_dataset against the bare simulator, in one run.

- ERPs/s of ``make_dataset`` (simulation + zarr writes + digests + done-markers) and of the bare
  simulator over the same chunks (``simulate`` per chunk, results waited for and dropped);
  target: the pipeline at >= 0.9 of the simulator.
- Peak resident memory of ``make_dataset`` for two dataset sizes with the same chunk size, each in
  a fresh process: memory should follow the chunk size, not n.

Default protocol (noise-free: one 2.2 s trajectory per ERP, Heun at 0.25 ms), prior: the study's
box. Writes JSON.

    python benchmarks/dataset.py [--n 20000] [--chunk-size 1024] [--out benchmarks/results/dataset.json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

import jr_jax

MEMORY = """
import json, resource, time, jax, jr_jax
t = time.perf_counter()
jr_jax.make_dataset(jr_jax.Prior(), jr_jax.Protocol(), {n}, {path!r}, key=jax.random.key(0), chunk_size={chunk},
                    progress=False)
print(json.dumps(dict(n={n}, seconds=time.perf_counter() - t,
                      peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))
"""


def bare_simulator(n, chunk, protocol):
    prior, key = jr_jax.Prior(), jax.random.key(0)
    for lo in range(0, n, chunk):
        params = prior.sample(jax.random.fold_in(key, 0), chunk, first_index=lo)
        jax.block_until_ready(jr_jax.simulate(params, protocol, key=jax.random.fold_in(key, 1), chunk_size=chunk,
                                              first_index=lo))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/dataset.json")
    args = ap.parse_args()
    n, chunk, protocol = args.n, args.chunk_size, jr_jax.Protocol()
    tmp = Path(tempfile.mkdtemp(prefix="jr_jax_bench_"))
    try:
        bare_simulator(chunk, chunk, protocol)  # compile
        jr_jax.make_dataset(jr_jax.Prior(), protocol, chunk, tmp / "warm.zarr", key=jax.random.key(1),
                            chunk_size=chunk, progress=False)
        rates = {"simulator": [], "make_dataset": []}
        for rep in range(2):  # alternate, so that drifts of the machine hit both alike
            t = time.perf_counter()
            bare_simulator(n, chunk, protocol)
            rates["simulator"].append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            jr_jax.make_dataset(jr_jax.Prior(), protocol, n, tmp / f"d{rep}.zarr", key=jax.random.key(0),
                                chunk_size=chunk, progress=False)
            rates["make_dataset"].append(n / (time.perf_counter() - t))
        best = {k: max(v) for k, v in rates.items()}
        ratio = best["make_dataset"] / best["simulator"]
        size_mb = sum(f.stat().st_size for f in (tmp / "d0.zarr").rglob("*") if f.is_file()) / 2**20
        print(f"n = {n}, chunk = {chunk}, default protocol, {len(jax.devices())} device(s)")
        print(f"bare simulator   {best['simulator']:8.0f} ERPs/s   (runs: {', '.join(f'{r:.0f}' for r in rates['simulator'])})")
        print(f"make_dataset     {best['make_dataset']:8.0f} ERPs/s   (runs: {', '.join(f'{r:.0f}' for r in rates['make_dataset'])})")
        print(f"ratio            {ratio:8.2f}   (target >= 0.9); dataset on disk {size_mb:.0f} MiB")
        memory = []
        for m in (n // 4, n):
            out = subprocess.run([sys.executable, "-c", MEMORY.format(n=m, path=str(tmp / f"m{m}.zarr"), chunk=chunk)],
                                 capture_output=True, text=True, check=True, env=dict(os.environ))
            memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"peak RSS for n = {m:7d}: {memory[-1]['peak_rss_gib']:.2f} GiB ({memory[-1]['seconds']:.1f} s)")
        result = dict(n=n, chunk_size=chunk, devices=len(jax.devices()), erps_per_s=best, runs=rates,
                      ratio=ratio, target=0.9, met=ratio >= 0.9, dataset_mib=size_mb, memory=memory,
                      jr_jax=jr_jax.__version__, jax=jax.__version__)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
