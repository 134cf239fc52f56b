"""sbi's NPE on jr_jax's simulations, for benchmarks/posterior.py: run in an environment of its own.

sbi (and torch) are benchmark-only dependencies, never jr_jax's. Install them beside the project:

    python3 -m venv /tmp/sbi_venv && /tmp/sbi_venv/bin/pip install sbi==0.27.0
    python benchmarks/posterior.py --sbi-python /tmp/sbi_venv/bin/python ...

``benchmarks/posterior.py`` writes the training simulations (theta and the ERPs with measurement
noise already added, SNR drawn per simulation as jr_jax's NPE draws it per batch) and the
observations to an .npz file and calls this script on it. This script needs only NumPy, torch and
sbi: it trains sbi's NPE with its default density estimator (a masked autoregressive flow, "maf")
behind its CNN embedding (``CNNEmbedding``, 1-D, default layers), the prior box given as a
``BoxUniform`` for the support (the simulations come from the study's truncated normal), then draws
``--draws`` samples per observation. Writes the draws and the wall times to ``--out``.

    /tmp/sbi_venv/bin/python benchmarks/sbi_npe.py SIMS.npz --out DRAWS.npz [--draws 1000]
"""

import argparse
import json
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sims", help=".npz with theta (n, d), x (n, T), lows, highs, observations (m, T)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--max-epochs", type=int, default=200, help="sbi's max_num_epochs (early stopping after 20)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from sbi.inference import NPE
    from sbi.neural_nets import posterior_nn
    from sbi.neural_nets.embedding_nets import CNNEmbedding
    from sbi.utils import BoxUniform

    torch.manual_seed(args.seed)
    data = np.load(args.sims)
    theta = torch.as_tensor(data["theta"], dtype=torch.float32)
    x = torch.as_tensor(data["x"], dtype=torch.float32)
    prior = BoxUniform(torch.as_tensor(data["lows"], dtype=torch.float32),
                       torch.as_tensor(data["highs"], dtype=torch.float32))
    embedding = CNNEmbedding(input_shape=(x.shape[1],))
    t0 = time.perf_counter()
    inference = NPE(prior=prior, density_estimator=posterior_nn(model="maf", embedding_net=embedding))
    estimator = inference.append_simulations(theta, x).train(max_num_epochs=args.max_epochs, show_train_summary=False)
    train_seconds = time.perf_counter() - t0
    posterior = inference.build_posterior(estimator)
    obs = torch.as_tensor(data["observations"], dtype=torch.float32)
    draws = np.zeros((len(obs), args.draws, theta.shape[1]), np.float32)
    t0 = time.perf_counter()
    for i in range(len(obs)):
        draws[i] = posterior.sample((args.draws,), x=obs[i], show_progress_bars=False).numpy()
    sample_seconds = (time.perf_counter() - t0) / len(obs)
    epochs = len(inference.summary["validation_loss"]) if hasattr(inference, "summary") else None
    np.savez_compressed(args.out, draws=draws)
    print("\nsbi_npe result: " + json.dumps(dict(sbi_version=__import__("sbi").__version__, torch_version=torch.__version__,
                          torch_threads=torch.get_num_threads(), train_seconds=train_seconds,
                          sample_seconds_per_erp=sample_seconds, epochs=epochs, n_train=int(len(theta)))))


if __name__ == "__main__":
    main()
