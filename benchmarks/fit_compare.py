"""Two runs of ``benchmarks/fit.py`` on the same ERPs, fit by fit: what a change of the fit did.

    python benchmarks/fit_compare.py OLD.json NEW.json --out benchmarks/results/fit_compare.json

Both runs must be of the same arguments (the same ERPs, noise and keys: the rows' truths are
checked). Pairs are the ERPs fitted in both, leaving out each run's first fit (compilation). Per
SNR: the median time per fit, the fits under the 10 s target, the samplers, the median reduced
chi-square; the Levenberg-Marquardt solve, whose code the runs are compared with unchanged, gives
the machines' speed ratio (the runs may be on different days); and the fits whose sampler changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def compare(old: dict, new: dict) -> dict:
    out = {}
    for snr, block in new["simulated"]["snr"].items():
        before = {r["index"]: r for r in old["simulated"]["snr"].get(snr, {}).get("fits", [])}
        pairs = [(before[r["index"]], r) for r in block["fits"]
                 if r["index"] in before and not r["first_call"] and not before[r["index"]]["first_call"]]
        for a, b in pairs:
            if not np.allclose(a["truth"], b["truth"], rtol=1e-6):
                raise SystemExit(f"the runs are of different ERPs (row {a['index']} at {snr} dB)")
        if not pairs:
            continue

        def side(k):
            rows = [p[k] for p in pairs]
            t = np.array([r["total_s"] for r in rows])
            return dict(median_s=float(np.median(t)), under_10_s=int(np.sum(t < 10)),
                        smc=int(sum(r["sampler"] == "smc" for r in rows)),
                        chi2_median=float(np.median([r["chi2_reduced"] for r in rows])),
                        solve_median_s=float(np.median([r["solve_s"] for r in rows])),
                        posterior_median_s=float(np.median([r["posterior_s"] for r in rows])))

        both_smc = [(a, b) for a, b in pairs if a["sampler"] == "smc" and b["sampler"] == "smc"]
        out[snr] = dict(
            pairs=len(pairs), old=side(0), new=side(1),
            time_ratio_median=float(np.median([b["total_s"] / a["total_s"] for a, b in pairs])),
            solve_ratio_median=float(np.median([b["solve_s"] / a["solve_s"] for a, b in pairs])),
            smc_posterior_ratio_median=(float(np.median([b["posterior_s"] / a["posterior_s"] for a, b in both_smc]))
                                        if both_smc else None),
            sampler_changed=[dict(index=a["index"], old=a["sampler"], new=b["sampler"],
                                  chi2=[a["chi2_reduced"], b["chi2_reduced"]], ess=[a["ess"], b["ess"]],
                                  pareto_k=[a["pareto_k"], b["pareto_k"]], total_s=[a["total_s"], b["total_s"]])
                             for a, b in pairs if a["sampler"] != b["sampler"]])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    old, new = json.loads(args.old.read_text()), json.loads(args.new.read_text())
    res = compare(old, new)
    for snr, r in res.items():
        o, n = r["old"], r["new"]
        print(f"{snr} dB, {r['pairs']} ERPs fitted in both: median time {o['median_s']:.1f} -> {n['median_s']:.1f} s; "
              f"under 10 s {o['under_10_s']} -> {n['under_10_s']}; SMC {o['smc']} -> {n['smc']}; median chi2 "
              f"{o['chi2_median']:.3f} -> {n['chi2_median']:.3f}; solve time ratio (unchanged code: the machines' speed) "
              f"{r['solve_ratio_median']:.2f}; SMC posterior time ratio {r['smc_posterior_ratio_median'] or float('nan'):.2f}; "
              f"sampler changed in {len(r['sampler_changed'])} fits")
    if args.out:
        args.out.write_text(json.dumps(dict(old=str(args.old), new=str(args.new), old_command=old.get("command"),
                                            new_command=new.get("command"), snr=res), indent=1) + "\n")


if __name__ == "__main__":
    main()
