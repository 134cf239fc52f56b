"""Fill the measured tables of the README and of the documentation pages from
benchmarks/results/*.json and docs/study/results.json, between <!-- name --> ... <!-- /name --> markers.

    python benchmarks/update_readme.py

Every marker below must appear in at least one of the files (README.md, docs/**/*.md outside
docs/study/); a marker may appear in several, and each copy is filled.
"""

import json
import os
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def link(target: str, page: Path) -> str:
    """The relative link from ``page`` to ``target`` (a path from the repository root)."""
    return Path(os.path.relpath(ROOT / target, page.parent)).as_posix()


def machine(device: dict | None) -> str:
    """'a 2-core CPU (AMD EPYC)' from a benchmark's recorded device (the development machine if absent)."""
    if not device:
        return "the 2-core development CPU"
    if device.get("platform") == "cpu":
        cpu = device.get("cpu")
        return f"a {device.get('cpu_cores', '?')}-core CPU" + (f" ({cpu})" if cpu else "")
    return f"{device.get('n_devices', '?')} × {device.get('device_kind', device.get('platform'))}"


def convergence_table(page: Path) -> str:
    c = json.loads((RESULTS / "convergence.json").read_text())
    lines = ["| solver | dt (ms) | median | 95th pct | max |", "| --- | --- | --- | --- | --- |"]
    for r in c["rows"]:
        lines.append(f"| {r['solver']} | {r['dt'] * 1e3:g} | {r['median'] * 100:.3f} % | {r['p95'] * 100:.2f} % | {r['max'] * 100:.2f} % |")
    d = c["default_float32"]
    lines += ["", f"The default in float32 (what users get), same {c['n']} draws: median {d['median'] * 100:.3f} %, "
              f"95th percentile {d['p95'] * 100:.2f} %, max {d['max'] * 100:.2f} %."]
    return "\n".join(lines)


ROWS = [
    "jr_jax.solve SDE (heun), interleaved with tvboptim",
    "tvboptim 0.4.0 Heun (native, keeps every step)",
    "jr_jax.solve SDE (heun), both pinned to one core",
    "tvboptim Heun, both pinned to one core",
    "jr_jax.solve SDE (heun), increments materialised up front",
    "hand-written lax.scan Heun, same counter noise",
    "counter noise generator alone, in a time loop",
    "jr_jax.solve SDE (euler)",
    "jax.vmap over single jr_jax.solve SDE (euler)",
    "jr_jax.solve SDE (heun)",
    "jr_jax.solve ODE (euler)",
    "jr_jax.solve ODE (heun)",
    "jr_jax.simulate SDE (euler), 1 device",
    "jr_jax.simulate SDE (euler), 2 host devices",
    "hand-written lax.scan Euler-Maruyama",
    "NumPy vectorised Euler-Maruyama",
    "jr_jax Brownian increments alone (per-key)",
    "jax.random.normal, same count (roofline)",
]


def performance_table(page: Path) -> str:
    s = json.loads((RESULTS / "simulate.json").read_text())
    sizes = sorted(s["sizes"], key=int)
    lines = ["| M sim-steps/s | " + " | ".join(f"N = {n}" for n in sizes) + " |", "| --- |" + " --- |" * len(sizes)]
    for name in ROWS:
        if all(name in s["sizes"][n] for n in sizes):
            lines.append(f"| {name} | " + " | ".join(f"{s['sizes'][n][name]['msteps_per_s']:.1f}" for n in sizes) + " |")

    def rate(n, name):
        return s["sizes"][n][name]["msteps_per_s"]

    def row(label, values, verdict):
        return f"| {label} | " + " | ".join(values) + f" | {verdict} |"

    numpy_1 = [rate(n, "jr_jax.solve SDE (euler)") / rate(n, "NumPy vectorised Euler-Maruyama") for n in sizes]
    numpy_2 = [rate(n, "jr_jax.simulate SDE (euler), 2 host devices") / rate(n, "NumPy vectorised Euler-Maruyama") for n in sizes]
    roof_1 = [rate(n, "jr_jax.solve SDE (euler)") / rate(n, "jax.random.normal, same count (roofline)") for n in sizes]
    roof_2 = [rate(n, "jr_jax.simulate SDE (euler), 2 host devices") / rate(n, "jax.random.normal, same count (roofline)") for n in sizes]
    ode = [rate(n, "jr_jax.solve ODE (euler)") for n in sizes]
    compile_s = [s["sizes"][n]["compile_s_sde_euler"] for n in sizes]
    recompiled = [s["sizes"][n]["recompiled_for_new_values"] for n in sizes]

    def verdict(values, target):
        return "yes" if all(v >= target for v in values) else "no: " + ", ".join(f"{v:.2f}" for v in values)

    ratios = s.get("ratios", {})
    tvb = [ratios.get(n, {}).get("sde_heun_over_tvboptim") for n in sizes]
    tvb_one = [ratios.get(n, {}).get("sde_heun_over_tvboptim_one_core") for n in sizes]
    gen = [ratios.get(n, {}).get("sde_heun_over_generator") for n in sizes]
    issue_rows = []
    if all(v is not None for v in tvb):
        issue_rows.append(row("Heun ≥ 2× tvboptim's Heun (interleaved, wall clock)", [f"{v:.2f}×" for v in tvb],
                              verdict(tvb, 2.0)))
    if all(v is not None for v in tvb_one):
        issue_rows.append(row("Heun ≥ 2× tvboptim's Heun (interleaved, both on one core)",
                              [f"{v:.2f}×" for v in tvb_one], verdict(tvb_one, 2.0)))
    if all(v is not None for v in gen):
        issue_rows.append(row("Heun ≥ 0.7 × the counter generator alone", [f"{v:.2f}" for v in gen], verdict(gen, 0.7)))

    m = s["memory"]
    out = [
        "\n".join(lines), "",
        "| target | " + " | ".join(f"N = {n}" for n in sizes) + " | met? |",
        "| --- |" + " --- |" * (len(sizes) + 1),
        *issue_rows,
        row("SDE ≥ 2× NumPy: `solve`, Euler–Maruyama, 1 device", [f"{v:.2f}×" for v in numpy_1], verdict(numpy_1, 2.0)),
        row("SDE ≥ 2× NumPy: `simulate`, one host device per core", [f"{v:.2f}×" for v in numpy_2], verdict(numpy_2, 2.0)),
        row("SDE ≥ 0.7 × noise roofline: `solve`, 1 device", [f"{v:.2f}" for v in roof_1], verdict(roof_1, 0.7)),
        row("SDE ≥ 0.7 × noise roofline: `simulate`, one host device per core", [f"{v:.2f}" for v in roof_2], verdict(roof_2, 0.7)),
        row("ODE ≥ 100 M sim-steps/s (Euler, 1 device)", [f"{v:.0f}" for v in ode], verdict(ode, 100.0)),
        row("compile ≤ 2 s (SDE, Euler)", [f"{v:.2f} s" for v in compile_s], "yes" if max(compile_s) <= 2 else "no"),
        row("no recompilation for new parameter values", ["none" if not r else "recompiled" for r in recompiled],
            "yes" if not any(recompiled) else "no"),
        "",
        f"100 000 ERPs (default protocol, noise-free, Heun at 0.25 ms: 8800 steps each) in chunks of 1024: "
        f"{m['seconds']:.1f} s ({m['n'] / m['seconds']:.0f} ERPs/s), peak RSS {m['peak_rss_gib']:.2f} GiB "
        f"(target ≤ 4 GiB: {'yes' if m['peak_rss_gib'] <= 4 else 'no'}), {m['valid']} valid.",
    ]
    return "\n".join(out)


def dataset_table(page: Path) -> str:
    d = json.loads((RESULTS / "dataset.json").read_text())
    m = d["memory"]
    return "\n".join([
        f"| n = {d['n']}, chunks of {d['chunk_size']}, default protocol | ERPs/s |",
        "| --- | --- |",
        f"| bare simulator | {d['erps_per_s']['simulator']:.0f} |",
        f"| `make_dataset` (simulate + write + digests) | {d['erps_per_s']['make_dataset']:.0f} |",
        f"| ratio (target ≥ {d['target']}) | {d['ratio']:.2f} ({'met' if d['met'] else 'not met'}) |",
        "",
        "Peak RSS of `make_dataset` in a fresh process: "
        + ", ".join(f"{x['peak_rss_gib']:.2f} GiB for n = {x['n']}" for x in m)
        + f" (chunks of {d['chunk_size']}): memory follows the chunk size, not n.",
    ])


def train_table(page: Path) -> str:
    d = json.loads((RESULTS / "train.json").read_text())
    return "\n".join([
        "| training samples/s | |",
        "| --- | --- |",
        f"| jr_jax Equinox Bi-LSTM (JAX {d['jax']}), one device | {d['jax_one_device_samples_per_s']:.1f} |",
        f"| jr_jax Equinox Bi-LSTM, batch split over {d['devices']} host devices (one per core) | "
        f"{d['jax_samples_per_s']:.1f} |",
        f"| torch.nn.LSTM, bidirectional, 2 threads (torch {d['torch']}) | {d['torch_samples_per_s']:.1f} |",
        f"| ratio, {d['devices']} host devices (target ≥ {d['target']}), median of {d['repeats']} interleaved repeats | "
        f"{d['ratio']:.2f} ({'met' if d['met'] else 'not met'}; range {d['ratio_range'][0]:.2f}–"
        f"{d['ratio_range'][1]:.2f}); one device: {d['ratio_one_device']:.2f} "
        f"({d['ratio_one_device_range'][0]:.2f}–{d['ratio_one_device_range'][1]:.2f}) |",
        f"| jr_jax with a stride-4 Conv1d front-end, {d['devices']} host devices | {d['conv_frontend_samples_per_s']:.1f} |",
    ])


def recovery_table(page: Path) -> str:
    path = RESULTS / "recovery" / "recovery.json"
    if not path.is_file():
        return "(not run yet: `python benchmarks/recovery.py`)"
    d = json.loads(path.read_text())
    rows = d["rows"]
    names = list(dict.fromkeys(r["parameter"] for r in rows))
    out = [f"{d['split']['train']} training, {d['split']['val']} validation, {d['split']['test']} test ERPs; "
           f"encoder {d['encoder']}; {d['epochs']} epochs in {d['train_s'] / 60:.1f} min.", "",
           "| Pearson r | SNR | " + " | ".join(names) + " |", "| --- | --- |" + " --- |" * len(names)]

    def table_rows(metric, methods):
        lines = []
        for method in methods:
            for snr in dict.fromkeys(r["snr_db"] for r in rows):
                vals = {r["parameter"]: r[metric] for r in rows if r["method"] == method and r["snr_db"] == snr}
                lines.append(f"| {method} | {'clean' if snr is None else f'{snr:g} dB'} | "
                             + " | ".join(f"{vals[n]:.2f}" for n in names) + " |")
        return lines

    out += table_rows("pearson", ["jr_jax Bi-LSTM", "ridge"])
    study = d["study_best_pearson"]
    out.append("| study's best (transformer, ~50 dB) | | " + " | ".join(f"{study[n]:.2f}" for n in names) + " |")
    out += ["", "| R² | SNR | " + " | ".join(names) + " |", "| --- | --- |" + " --- |" * len(names)]
    out += [r for r in table_rows("r2", ["jr_jax Bi-LSTM", "ridge", "prior mean"]) if "dB" in r or "clean" in r]
    beats = d["beats_study_at_30db"]
    out += ["", "At 30 dB jr_jax reaches the study's best on " + f"{sum(beats.values())} of {len(beats)} parameters"
            + ("" if all(beats.values()) else " (not on: " + ", ".join(p for p, b in beats.items() if not b) + ")")
            + ". R² per parameter, NRMSE, Spearman ρ and bias for every method and SNR are in "
            "`benchmarks/results/recovery/recovery.csv`; figures: `scatter_30db.png`, `pearson_vs_snr.png`."]
    return "\n".join(out)


def grid_table(page: Path) -> str:
    path = RESULTS / "recovery" / "grid.json"
    if not path.is_file():
        return "(not run yet: `python benchmarks/recovery.py --grid`)"
    d = json.loads(path.read_text())
    rows, tests = d["rows"], d["test_snrs"]
    out = ["| mean R² over the nine parameters | " + " | ".join("clean" if t is None else f"test {t:g} dB" for t in tests)
           + " |", "| --- |" + " --- |" * len(tests)]
    for train in d["train_snrs"]:
        vals = [sum(r["r2"] for r in rows if r["train_snr_db"] == train and r["snr_db"] == t) / len(d["names"])
                for t in tests]
        out.append(f"| trained at {train:g} dB | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    out += ["", f"One model per training SNR ({d['epochs']} epochs each, same data and encoder as above; "
            f"{d['seconds'] / 60:.0f} min in all); per parameter in `benchmarks/results/recovery/grid.csv`."]
    return "\n".join(out)


def sensitivity_table(page: Path) -> str:
    d = json.loads((RESULTS / "sensitivity.json").read_text())
    names = d["names"]
    lines = ["| budget (simulations) | seconds | ranking stability |", "| --- | --- | --- |"]
    for method in ("sobol", "dgsm"):
        for r in d[method]:
            lines.append(f"| {'Sobol′ ST' if method == 'sobol' else 'DGSM'}: {r['n_simulations']} | {r['seconds']:.2f} | "
                         f"{r['stability']:.3f} |")
    st, dg = d["sobol"][-1], d["dgsm"][-1]
    lines += ["", "| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names),
              f"| Sobol′ ST ({st['n_simulations']} sims) | " + " | ".join(f"{v:.3f}" for v in st["ST"]) + " |",
              f"| DGSM bound ({dg['n_simulations']} draws) | " + " | ".join(f"{v:.3g}" for v in dg["dgsm"]) + " |",
              "| bound holds | " + " | ".join("yes" if d["bound_holds"][n] else "NO" for n in names) + " |", "",
              f"Stable ranking (5th-percentile bootstrap Spearman ≥ 0.9 at this and every larger budget): Sobol′ ST "
              f"from {d['stable_at']['sobol']} simulations, DGSM "
              + (f"from {d['stable_at']['dgsm']}" if d["stable_at"]["dgsm"] else
                 f"not within {d['dgsm'][-1]['n_simulations']} draws") + "."]
    return "\n".join(lines)


def multichannel_table(page: Path) -> str:
    path = RESULTS / "multichannel.json"
    if not path.is_file():
        return "(not run yet: `python benchmarks/multichannel.py`)"
    d = json.loads(path.read_text())
    rows, names = d["rows"], d["names"]
    enc, sp = d["encoder"], d["split"]
    out = [f"{sp['train']} training, {sp['val']} validation, {sp['test']} test ERPs; both models: Conv1d "
           f"({enc['conv_channels']} channels, kernel {enc['conv_kernel']}, stride {enc['conv_stride']}) + Bi-LSTM "
           f"({enc['hidden']} units), {d['epochs']} epochs on SNRs drawn in [{d['train_snr_db'][0]:g}, "
           f"{d['train_snr_db'][1]:g}] dB; training "
           + ", ".join(f"{k} {v / 60:.1f} min" for k, v in d["train_s"].items()) + "."]
    seen = list(dict.fromkeys((r["model"], r["noise"]) for r in rows))
    combos = sorted(seen, key=lambda mn: (mn[1] != "white", seen.index(mn)))  # white noise first
    for metric, label in (("pearson", "Pearson r"), ("r2", "R²")):
        out += ["", f"| {label} | noise | SNR | " + " | ".join(names) + " | mean |",
                "| --- | --- | --- |" + " --- |" * (len(names) + 1)]
        for model, noise in combos:
            escaped = model.replace("|", "\\|")  # a pipe in a label would split the table cell
            for snr in d["test_snrs"]:
                vals = {r["parameter"]: r[metric] for r in rows
                        if r["model"] == model and r["noise"] == noise and r["snr_db"] == snr}
                if vals:
                    out.append(f"| {escaped} | {noise if snr is not None else ''} | "
                               f"{'clean' if snr is None else f'{snr:g} dB'} | "
                               + " | ".join(f"{vals[n]:.2f}" for n in names)
                               + f" | {sum(vals.values()) / len(vals):.2f} |")
    return "\n".join(out)


def _fit_benchmark():
    """benchmarks/fit.py as a module (its targets and its rule for timed fits)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fit_benchmark", ROOT / "benchmarks" / "fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fit_simulated_table(page: Path) -> str:
    """jr_jax.fit on the simulated ERPs of ``benchmarks/fit.py`` (the 200-ERP run, possibly still
    partial: it resumes across sessions), from benchmarks/results/fit_simulated.json."""
    path = RESULTS / "fit_simulated.json"
    if not path.is_file():
        return "(not run yet: see `benchmarks/fit.py --n 200`)"
    fit_benchmark = _fit_benchmark()
    d = json.loads(path.read_text())
    sim, a = d["simulated"], d["arguments"]
    names = d["prior"]["names"]
    first = d["date_utc"][:10]
    resumed = sorted({t[:10] for t in d.get("resumed_utc", [])} - {first})
    n_done = {snr: v["n_fits"] for snr, v in sim["snr"].items()}
    status = "complete" if d.get("complete") else "partial, to be resumed with `--resume`"
    sim_stats = {}
    command = d["command"].replace(" --resume", "").split(" --note")[0]
    out = [f"`{command}`: {a['n']} simulated ERPs per SNR from `jr_jax.Prior()` "
           f"(clean RMS median {sim['clean_rms_median_mv']:.2g} mV), {a['n_starts'] or 4} amortised starts, "
           f"{a['smc_particles']} SMC particles; 2-core CPU, started {first}"
           + (f", resumed {', '.join(resumed)}" if resumed else "") + (". Fits: " if d.get("complete") else ". Fits so far: ")
           + ", ".join(f"{n} of {a['n']} at {snr} dB" for snr, n in n_done.items()) + f" ({status}).", "",
           "| SNR | fits | χ² median (q90) | waveform R² median | samplers (their median time) | time per fit median (q90) | fits timed |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for snr, v in sim["snr"].items():  # from the fits' rows, with the benchmark's own rule for the timed ones
        rows = v["fits"]
        chi2 = np.array([r["chi2_reduced"] for r in rows])
        timed_rows, starved = fit_benchmark.timed_fits(rows)
        secs = np.array([r["total_s"] for r in timed_rows])
        samplers = ", ".join(
            f"{k.replace('laplace-importance', 'importance')} {sum(r['sampler'] == k for r in rows)} "
            f"({np.median([r['total_s'] for r in timed_rows if r['sampler'] == k]):.1f} s)"
            for k in sorted({r["sampler"] for r in rows}))
        n_first = sum(bool(r["first_call"]) for r in rows)
        left = ([f"{n_first} first of a process: compilation"] if n_first else []) + (
            [f"{len(starved)} CPU shared or paused"] if starved else [])
        timed = f"{len(secs)}" + (f" (left out: {'; '.join(left)})" if left else "")
        out.append(f"| {snr} dB | {len(rows)} | {np.median(chi2):.3f} ({np.quantile(chi2, 0.9):.3f}) | "
                   f"{np.median([r['r2'] for r in rows]):.3f} | {samplers} | "
                   f"{np.median(secs):.1f} s ({np.quantile(secs, 0.9):.1f} s) | {timed} |")
        sim_stats[snr] = (len(rows), float(np.median(chi2)), float(np.median(secs)))
    out += ["", "Parameter R² against the truth (the amortised posterior mean; the fit's MAP; the fit's posterior mean):", "",
            "| SNR | estimate | " + " | ".join(names) + " |", "| --- | --- |" + " --- |" * len(names)]
    for snr, v in sim["snr"].items():
        for m, r2 in v["parameter_r2"].items():
            out.append(f"| {snr} dB | {m} | " + " | ".join(f"{r2[n]:.2f}" for n in names) + " |")
    out.append("")
    for snr, (n, chi2_med, t_med) in sim_stats.items():
        ok = chi2_med <= fit_benchmark.TARGET_SIM_CHI2 and t_med <= fit_benchmark.TARGET_SIM_SECONDS
        out.append(f"- {'PASS' if ok else 'FAIL'} ({'so far, ' if n < a['n'] else ''}{n} fits) at {snr} dB: median "
                   f"χ² ≤ {fit_benchmark.TARGET_SIM_CHI2} from amortised starts at ≤ {fit_benchmark.TARGET_SIM_SECONDS:g} s "
                   f"a fit: χ² {chi2_med:.3f}, {t_med:.1f} s")
    return "\n".join(out)


def _study() -> dict:
    return json.loads((ROOT / "docs" / "study" / "results.json").read_text())


def _study_conditions(res) -> str:
    """When the study run finished, and where its conditions are stated (a run resumed across
    sessions, or sharing the CPU, adds up longer step times than one run alone)."""
    finished = res["meta"].get("finished", "")[:10]
    return f"sum of its steps, finished {finished}; conditions in docs/study/README.md"


def study_report(page: Path) -> str:
    """The study preset's report (docs/study/results.json) and the quick preset's measured time."""
    res = _study()
    quick = json.loads((RESULTS / "reproduce_quick.json").read_text())
    rows = res["robust"]["rows"]
    cfg, d = res["meta"]["config"], res["data"]

    def val(method, snr, p, metric):
        return next(r[metric] for r in rows if r["method"] == method and r["snr_db"] == snr and r["parameter"] == p)

    rt = res["robust"]["training"]
    lines = [f"`jr-jax reproduce --preset study` (report: [`docs/study/report.md`]({link('docs/study/report.md', page)})) follows the "
             f"study's design: ten noise levels (clean, then 40 to 0 dB SNR of the averaged ERP), "
             f"{d['levels']['n']} simulations per level with an 80/10/10 split, one model trained at each level and "
             f"tested at every level; and, to show what more simulations buy, one noise-robust model trained on "
             f"{rt['n_train']} ERPs with SNRs drawn in {cfg['robust_snr_db'][0]:g}–{cfg['robust_snr_db'][1]:g} dB. "
             f"All steps took {res['meta']['seconds_all_steps'] / 60:.0f} min on the 2-core development CPU"
             f" ({_study_conditions(res)}). Test split: "
             f"{d[res['test_dataset']]['test']} ERPs.", "",
             ] + _headline_comparison(res)
    g = res["grid"]
    levels = g["test_levels_db"]
    lab = lambda s: "clean" if s is None else f"{s:g} dB"  # noqa: E731

    def mean_r2(rs, snr, train=None):
        v = [r["r2"] for r in rs if r["method"] == "jr_jax Bi-LSTM" and r["snr_db"] == snr and r.get("train_snr_db") == train]
        return sum(v) / len(v)

    lines += [f"Mean R² over the nine parameters, one model per training level ({d['levels']['train']} training ERPs each), "
              "tested at every level:", "",
              "| trained at \\ tested at | " + " | ".join(lab(s) for s in levels) + " |", "| --- |" + " --- |" * len(levels)]
    for t in g["train_levels_db"]:
        lines.append(f"| {lab(t)} | " + " | ".join(f"{mean_r2(g['rows'], s, t):.2f}" for s in levels) + " |")
    lines.append(f"| noise-robust, {rt['n_train']} ERPs | " + " | ".join(f"{mean_r2(rows, s):.2f}" for s in levels) + " |")
    lines += ["", f"![r and R² against SNR]({link('docs/study/figures/metric_vs_snr.png', page)})", "",
              "The quick preset (the README's first command): " + quick_timing(quick)]
    return "\n".join(lines)


def quick_timing(quick: dict) -> str:
    """The quick preset's measured time, with the machine, the date, the range over the recorded
    runs and the commands that measured it."""
    # the range only over runs of the present sizes (runs before the sizes were recorded used others)
    all_runs = quick.get("runs", [])
    runs = [r for r in all_runs if r.get("sizes") == quick.get("sizes")]
    earlier = [r for r in all_runs if r.get("sizes") != quick.get("sizes")]
    when = f" on {quick['date_utc'][:10]}" if "date_utc" in quick else ""
    out = (f"measured on {machine(quick.get('device'))}, its steps took {quick['wall_seconds'] / 60:.1f} min{when} "
           f"(`python benchmarks/reproduce_quick.py`, peak RSS {quick['peak_rss_gib']:.1f} GiB; the target is 5 min "
           "on a normal day)")
    if len(runs) > 1:
        minutes = [r["wall_seconds"] / 60 for r in runs]
        first, last = runs[0]["date_utc"][:10], runs[-1]["date_utc"][:10]
        dates = f"on {first}" if first == last else f"from {first} to {last}"
        low, high = f"{min(minutes):.1f}", f"{max(minutes):.1f}"
        took = f"{low} min each" if low == high else f"{low} to {high} min"
        out += (f"; {len(runs)} runs {dates} took {took} (this shared machine's speed varies from day to day)")
    if earlier and quick.get("sizes"):
        minutes = [r["wall_seconds"] / 60 for r in earlier]
        out += (f"; {len(earlier)} earlier run(s) of other sizes (in `benchmarks/results/reproduce_quick.json`) took "
                f"{min(minutes):.1f} to {max(minutes):.1f} min")
    if "readme_command_fresh_clone_seconds" in quick:
        fresh = quick["readme_command_fresh_clone_seconds"] / 60
        when = (f" at {quick['readme_command_fresh_clone_commit']}, "
                f"{quick['readme_command_fresh_clone_date_utc'][:10]}" if "readme_command_fresh_clone_commit" in quick
                else "")
        out += (" and, in a separate run, the whole first command in a fresh clone, install included, "
                f"{fresh:.1f} min (`python benchmarks/reproduce_quick.py --fresh-clone`{when}). Runs of the first command "
                f"have taken from {fresh:.1f} min to 11 min 17 s on this kind of machine, the slowest on a day it ran "
                "about half as fast; from one run to the next, timings here vary by up to ±30 %.")
    elif len(runs) <= 1:
        out += ". From one run to the next, timings on this shared machine vary by up to ±30 %."
    else:
        out += "."
    return out


def readme_timing(page: Path) -> str:
    quick = json.loads((RESULTS / "reproduce_quick.json").read_text())
    return "The quick preset (the first command): " + quick_timing(quick) + " " + simulator_speed(page)


def simulator_speed(page: Path) -> str:
    """One sentence: the Heun SDE against tvboptim, from ``simulate.json``."""
    s = json.loads((RESULTS / "simulate.json").read_text())
    sizes = sorted(s["sizes"], key=int)
    ratios = s.get("ratios", {})
    two = [ratios.get(n, {}).get("sde_heun_over_tvboptim") for n in sizes]
    one = [ratios.get(n, {}).get("sde_heun_over_tvboptim_one_core") for n in sizes]
    if any(v is None for v in two + one):
        return ""
    guide = link("docs/guides/simulation.md", page)
    return (f"The simulator's Heun SDE (0.1 ms steps, N = {' and '.join(sizes)}) runs "
            f"{' and '.join(f'{v:.2f}' for v in two)}× as fast as tvboptim's on 2 cores, "
            f"{' and '.join(f'{v:.2f}' for v in one)}× with both on one core (target 2×, not met; "
            f"`python benchmarks/simulate.py`, [why]({guide}#performance)).")


def readme_result(page: Path) -> str:
    """The README's one result table: the study preset's noise-robust model at the report's headline
    SNR (the study's, about 50 dB, when the run tested it), and its figure."""
    res = _study()
    return "\n".join(_headline_comparison(res) + [
        f"All steps took {res['meta']['seconds_all_steps'] / 60:.0f} min on the 2-core development CPU "
        f"({_study_conditions(res)}; report: [`docs/study/report.md`]({link('docs/study/report.md', page)})).",
        "",
        f"![r and R² against SNR]({link('docs/study/figures/metric_vs_snr.png', page)})",
    ])


def _headline_comparison(res) -> list[str]:
    """The noise-robust model against the study's best published Pearson r, at the report's headline
    SNR: with the Fisher-z comparison of the report when that is the study's SNR, else said to be
    at another SNR."""
    from jr_jax._report import POINT, _compare_r, _headline, _metric

    names = res["meta"]["prior"]["names"]
    rows = res["robust"]["rows"]
    study = res["study"]
    snr = _headline(res)
    n_test = res["data"][res["test_dataset"]]["test"]
    matched = snr == study.get("snr_db")
    r = {p: _metric(rows, POINT, snr, p, "pearson") for p in names}
    r2 = {p: _metric(rows, POINT, snr, p, "r2") for p in names}
    head = f"at {snr:g} dB" if snr is not None else "clean"
    lines = [f"| {head}, {n_test} test ERPs | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names),
             "| jr_jax Pearson r (noise-robust model) | " + " | ".join(f"{r[p]:.2f}" for p in names) + " |",
             "| jr_jax R² | " + " | ".join(f"{r2[p]:.2f}" for p in names) + " |",
             "| ridge R² | " + " | ".join(f"{_metric(rows, 'ridge', snr, p, 'r2'):.2f}" for p in names) + " |",
             f"| study's best Pearson r (its transformer, about {study.get('snr_db', 50):g} dB"
             + ("" if matched else ": not the same SNR") + ") | " + " | ".join(f"{study['pearson'][p]:.2f}" for p in names) + " |"]
    if matched:
        cmp = {p: _compare_r(r[p], study["pearson"][p], n_test, study["n_test"]) for p in names}
        lines.append("| r against the study's (Fisher z, 5 %) | " + " | ".join(cmp[p] for p in names) + " |")
        higher = [p for p in names if cmp[p] == "higher"]
        lower = [p for p in names if cmp[p] == "lower"]
        text = (f"At the study's SNR jr_jax's Pearson r is higher than its best published one on {len(higher)} of "
                f"{len(names)} parameters" + (f", lower on {', '.join(lower)}" if lower else "")
                + f" (two independent correlations, {n_test} against about {study['n_test']} test ERPs); "
                "R² says more than r about how close the estimates are: "
                + (f"below 0.1 on {', '.join(p for p in names if r2[p] < 0.1)}." if any(r2[p] < 0.1 for p in names)
                   else "at least 0.1 on every parameter."))
    else:
        text = (f"This run has no {study.get('snr_db', 50):g} dB test level, so jr_jax's r is not compared with the "
                "study's; R² says more than r about how close the estimates are.")
    return lines + ["", text, ""]


def test_suite_timing(page: Path) -> str:
    """The test suite's measured time (benchmarks/test_suite.py), or its target if it has not been timed."""
    path = RESULTS / "test_suite.json"
    if not path.is_file():
        return ("The test suite's target is under 10 min on a 2-core CPU; it has not been timed in its present "
                "form: `python benchmarks/test_suite.py` times `.venv/bin/python -m pytest -q` and "
                "`python benchmarks/update_readme.py` then writes the measured figure here.")
    d = json.loads(path.read_text())
    runs = [r for r in d.get("runs", []) if r.get("returncode") == 0]
    latest = runs[-1] if runs else d  # the runs are appended in time order; the last is the newest code
    verdict = "within" if latest["wall_seconds"] <= d["target_seconds"] else "over"
    how = "a clean clone's `bash .ci/run`" if "clean clone" in latest.get("note", "") else "`python benchmarks/test_suite.py`"
    text = (f"The test suite, measured: {latest['wall_seconds'] / 60:.1f} min for `{d['command']}` on "
            f"{machine(d.get('device'))} ({latest['summary']}; {how} at {latest.get('commit', d.get('commit'))}, "
            f"{latest['date']}), {verdict} its target of {d['target_seconds'] / 60:.0f} min.")
    if len(runs) > 1:
        minutes = [r["wall_seconds"] / 60 for r in runs]
        dates = sorted({r["date"] for r in runs})
        text += (f" Over the {len(runs)} passing runs recorded since {dates[0]} (in `benchmarks/results/test_suite.json`, "
                 f"each with its commit) it took {min(minutes):.1f}–{max(minutes):.1f} min: this machine's speed "
                 f"varies from day to day.")
    return text


def posterior_table(page: Path) -> str:
    """Calibration of the posterior estimator at 30 dB (benchmarks/posterior.py)."""
    d = json.loads((RESULTS / "posterior.json").read_text())
    cal = d["snr"]["30"]["calibration"]
    names = [r["parameter"] for r in cal]
    label = lambda n: n.replace("log(C*", "log C·").rstrip(")") if n.startswith("log(") else n  # noqa: E731
    minus = lambda s: s.replace("-", "−")  # noqa: E731

    def row(title, fmt, key, signed=False):
        cells = ["" if key not in r else (minus(fmt(r[key])) if signed else fmt(r[key])) for r in cal]
        return f"| {title} | " + " | ".join(cells) + " |"

    return "\n".join([
        "| 30 dB | " + " | ".join(label(n) for n in names) + " |", "| --- |" + " --- |" * len(names),
        row("calibration error", lambda v: f"{v:.3f}", "calibration_error"),
        row("SBC uniformity p", lambda v: f"{v:.2g}", "sbc_pvalue"),
        row("coverage of 90 % intervals", lambda v: f"{v:.3f}", "coverage_90"),
        row("median contraction", lambda v: f"{v:.2f}", "contraction", signed=True),
        row("R², posterior mean", lambda v: f"{v:.2f}", "r2", signed=True),
        row("R², point regressor (same data)", lambda v: f"{v:.2f}", "point_r2", signed=True),
    ])


def reference_table(page: Path) -> str:
    """Each posterior method against the reference posteriors (benchmarks/posterior.py --reference)."""
    d = json.loads((RESULTS / "posterior.json").read_text())
    ref = d.get("reference")
    if not ref:
        return "Not measured: run `python benchmarks/posterior.py --reference benchmarks/results/reference_posteriors.npz`."
    meta = json.loads((RESULTS / "reference_posteriors.json").read_text())
    lines = ["| against the reference posteriors | SNR | observations | C2ST (0.5: indistinguishable) | "
             "mean error (reference SDs) | SD ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for snr, methods in ref["summary"].items():
        for name, v in methods.items():
            lines.append(f"| {name} | {snr} dB | {v['n_obs']} | {v['c2st']:.3f} | {v['mean_error_sd']:.2f} | "
                         f"{v['sd_ratio']:.2f} |")
    sbi = ref.get("sbi", {})
    timing = (f"Training on the same {d['n_train']} + validation simulations: jr_jax's NPE "
              f"{d['posterior_train_seconds']:.0f} s ({d['epochs']} epochs)" +
              ("" if "train_seconds" not in sbi else
               f", sbi's NPE {sbi['train_seconds']:.0f} s ({sbi.get('epochs')} epochs, torch {sbi['torch_version']}, "
               f"{sbi['torch_threads']} threads); drawing 1000 samples per ERP: sbi {sbi['sample_seconds_per_erp']:.2f} s"))
    obs = ref["observations"]
    npe_s = np.median([o["npe_sample_seconds"] for o in obs])
    corr = [o["correction_seconds"] for o in obs if "correction_seconds" in o]
    timing += f"; jr_jax's NPE {npe_s:.2f} s" + (f", the likelihood correction {np.median(corr):.0f} s (median)" if corr else "")
    conv = (f"The references: {meta['converged']} of {len(meta['observations'])} observations converged "
            f"({meta['runs']} independent SMC runs of {meta['particles']} particles each, R-hat < {meta['rhat_max']}; "
            f"`benchmarks/results/reference_posteriors.json`); only those are scored.")
    return "\n".join(lines + ["", timing + ".", "", conv])


def budget_table(page: Path) -> str:
    """The posterior benchmark at each simulation budget (benchmarks/posterior.py --name ...)."""
    runs = [(RESULTS / f"{name}.json") for name in ("posterior", "posterior_frozen_affine", "posterior_50000",
                                                    "posterior_50000_frozen_affine")]
    runs = [json.loads(f.read_text()) for f in runs if f.is_file()]
    lines = ["| simulations | NPE | SNR | C2ST: jr_jax NPE | C2ST: sbi NPE | C2ST: NPE + likelihood | worst calibration "
             "error | SBC failures (p < 0.01, of 13) | lowest R² ratio, posterior mean / point regressor | "
             "training: jr_jax NPE, sbi NPE |", "| --- |" + " --- |" * 9]
    for d in runs:
        options = d.get("posterior_options", {})
        network = ("flow on the frozen point regressor" if d.get("frozen_embedding") else "end to end") + (
            " + conditional affine" if options.get("conditional_affine") else "")
        ref = d.get("reference", {})
        sbi = ref.get("sbi", {})
        train = f"{d['posterior_train_seconds']:.0f} s, " + (f"{sbi['train_seconds']:.0f} s" if "train_seconds" in sbi
                                                             else "not run")
        for snr, entry in d["snr"].items():
            cal = entry["calibration"]
            summary = ref.get("summary", {}).get(snr, {})
            c2st = lambda n: f"{summary[n]['c2st']:.3f}" if n in summary else "not run"  # noqa: E731
            ratio, low = min((r["r2"] / r["point_r2"], r["parameter"]) for r in cal
                             if "point_r2" in r and r["point_r2"] > 0.2)
            worst = max(cal, key=lambda r: r["calibration_error"])
            budget = f"{d['n_simulations'] - d['n_test']:,}".replace(",", " ")
            lines.append(f"| {budget} | {network} | {snr} dB | {c2st('jr_jax NPE')} | {c2st('sbi NPE')} | "
                         f"{c2st('jr_jax NPE + likelihood')} | {worst['calibration_error']:.3f} ({worst['parameter']}) | "
                         f"{sum(r['sbc_pvalue'] < 0.01 for r in cal)} | {ratio:.2f} ({low}) | {train} |")
    lines += ["", "Simulations: training and validation (the held-out 1000 apart). The R² ratio is over the "
              "parameters whose point-regressor R² exceeds 0.2 (1: the target). `python benchmarks/posterior.py "
              "--n 10000 ...` makes the first budget's end-to-end rows and `--n 50000 --name posterior_50000 ...` "
              "the second's; with `--frozen-embedding --conditional-affine --name posterior_frozen_affine` (or "
              "`posterior_50000_frozen_affine`) the rows of the flow on the frozen point regressor (no sbi run "
              "beside them: the same simulations as the end-to-end rows of their budget). Training of the "
              "frozen-embedding NPE includes its point regressor's."]
    return "\n".join(lines)


def time_to_accuracy_table(page: Path) -> str:
    """Weak error against wall time, and the time at 1 % (benchmarks/time_to_accuracy.py)."""
    path = RESULTS / "time_to_accuracy.json"
    if not path.is_file():
        return "Not measured: run `python benchmarks/time_to_accuracy.py`."
    d = json.loads(path.read_text())
    lines = ["| solver | dt (ms) | weak error of the mean ERP (median) | wall time (s) |", "| --- | --- | --- | --- |"]
    for r in d["rows"]:
        lines.append(f"| {r['solver']} | {r['dt'] * 1e3:g} | {100 * r['error_median']:.2g} % | {r['seconds']:.2f} |")
    lines += ["", f"| at {100 * d['target']:g} % error | wall time (s) | speed-up over NumPy Euler–Maruyama |",
              "| --- | --- | --- |"]
    for solver, t in d["seconds_at_target"].items():
        bound = " (within at 1 ms, the coarsest step: an upper bound)" if d["within_target_at_coarsest_step"].get(solver) else ""
        sp = d["speedup_over_numpy"].get(solver)
        lines.append(f"| {solver} | {'not reached' if t is None else f'{t:.2f}'}{bound} | "
                     f"{'' if sp is None else f'{sp:.1f}×'} |")
    lines += ["", f"{d['n_erps']} ERPs ({d['params']} prior draws × {d['seeds']} keys), 60 trials each; reference "
              f"Heun at {d['dt_ref'] * 1e6:g} µs; `python benchmarks/time_to_accuracy.py`."]
    return "\n".join(lines)


def identifiability_table(page: Path) -> str:
    d = json.loads((RESULTS / "identifiability.json").read_text())
    labels = list(d["r2"])
    lines = ["| ridge test R² | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
    for t in d["targets"]:
        lines.append(f"| {t} | " + " | ".join(f"{d['r2'][lab][t]:.2f}" for lab in labels) + " |")
    lines += ["", f"{d['n']} clean ERPs from the study's prior, split 80/10/10; one ridge regression per target."]
    return "\n".join(lines)


def compilation_cache_timing(page: Path) -> str:
    """What the jr-jax command's compilation cache saves (benchmarks/compilation_cache.py)."""
    d = json.loads((RESULTS / "compilation_cache.json").read_text())
    same = "with the same printed fit" if d["same_answer"] else "but the printed fits differ"
    command = d["command"].replace("--condition Left Auditory", '--condition "Left Auditory"')
    return (f"On {machine(d.get('device'))}, `{command}` took "
            f"{d['cold']['wall_seconds']:.0f} s with an empty cache and {d['warm']['wall_seconds']:.0f} s the second "
            f"time ({d['warm_over_cold_wall']:.2f} of it), {same} (`python benchmarks/compilation_cache.py` at "
            f"{d['commit']}, {d['date']}).")


TABLES = (("convergence-table", convergence_table), ("performance-table", performance_table),
          ("dataset-table", dataset_table), ("train-table", train_table), ("recovery-table", recovery_table),
          ("sensitivity-table", sensitivity_table), ("grid-table", grid_table),
          ("multichannel-table", multichannel_table), ("fit-simulated-table", fit_simulated_table),
          ("study-report", study_report),
          ("identifiability-table", identifiability_table), ("posterior-table", posterior_table),
          ("reference-table", reference_table), ("budget-table", budget_table),
          ("time-to-accuracy-table", time_to_accuracy_table),
          ("readme-timing", readme_timing), ("readme-result", readme_result),
          ("test-suite-timing", test_suite_timing), ("compilation-cache-timing", compilation_cache_timing))


def pages() -> list[Path]:
    """The README and the documentation pages (docs/study/ is written by jr-jax reproduce, not here)."""
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if "study" not in p.relative_to(ROOT / "docs").parts[:1])
    return [ROOT / "README.md", *docs]


def main():
    found = {name: [] for name, _ in TABLES}
    for page in pages():
        text = original = page.read_text()
        for name, fill in TABLES:
            pattern = re.compile(rf"(<!-- {name} -->\n)(?:.*?\n)?(<!-- /{name} -->)", re.S)
            if pattern.search(text):
                found[name].append(page.relative_to(ROOT).as_posix())
                text = pattern.sub(lambda m: m.group(1) + fill(page) + "\n" + m.group(2), text)
        if text != original:
            page.write_text(text)
    missing = [name for name, where in found.items() if not where]
    if missing:
        raise SystemExit("no <!-- name --> block for: " + ", ".join(missing) + " (in README.md or docs/)")
    for name, where in found.items():
        print(f"{name}: {', '.join(where)}")


if __name__ == "__main__":
    main()
