"""`jr-jax reproduce`: end to end on the small test preset, resume without redoing steps, report read from results.json."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import jr_jax
from jr_jax import cli
from jr_jax._report import _compare_r
from jr_jax._reproduce import PRESETS, STUDY_PEARSON, STUDY_SNR_DB, level_label

# the module fixtures are built once: every test here runs on the same xdist worker
pytestmark = pytest.mark.xdist_group("reproduce")

SECTIONS = ["Main result", "Accuracy at every noise level", "What the ERP's amplitude means",
            "Posterior estimator: calibration", "The study's grid", "Sensitivity", "What differs from the study",
            "Steps and time"]
FIGURES = ["erp_examples.png", "scatter.png", "metric_vs_snr.png", "grid.png", "sensitivity.png",
           "calibration_50dB.png"]
# the test preset's steps, in the order the pipeline runs them
STEPS = ["data_levels", "erp_amplitude", "train_grid_clean", "evaluate_grid_clean", "train_grid_10dB",
         "evaluate_grid_10dB", "train_robust", "evaluate_robust", "train_posterior", "calibrate_posterior",
         "sensitivity"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "test"
    assert cli.main(["reproduce", "--preset", "test", "--out", str(out)]) == 0
    return out


def _table_row(md: str, label: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_report_has_every_section_with_finite_numbers(run):
    md = (run / "report.md").read_text()
    for section in SECTIONS:
        assert re.search(rf"^## {re.escape(section)}", md, flags=re.M), section
    for fig in FIGURES:
        data = (run / "figures" / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, fig  # a drawn figure, not an empty canvas
        assert f"figures/{fig}" in md
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES) and 'src="figures/' not in page  # self-contained
    title = re.search(r"<title>(.*?)</title>", page).group(1)
    assert "`" not in title and "preset test" in title
    res = json.loads((run / "results.json").read_text())
    cfg = PRESETS["test"]
    levels = [None if s is None else float(s) for s in cfg.test_levels_db]
    assert res["grid"]["test_levels_db"] == levels
    # every (method, level, parameter) of the network and ridge has finite metrics
    for part, methods in (("robust", ("jr_jax Bi-LSTM", "ridge", "prior mean")), ("grid", ("jr_jax Bi-LSTM",))):
        rows = res[part]["rows"]
        for method in methods:
            for snr in levels:
                got = [r for r in rows if r["method"] == method and r["snr_db"] == snr]
                n_models = len(cfg.train_levels_db) if part == "grid" else 1
                assert len(got) == 9 * n_models
                assert all(math.isfinite(r["r2"]) and math.isfinite(r["nrmse"]) for r in got)
                if method != "prior mean":  # a constant prediction has no correlation
                    assert all(math.isfinite(r["pearson"]) for r in got)
    sens = res["sensitivity"]
    assert np.isfinite([[r["S1"], r["ST"]] for r in sens["sobol"]["rows"]]).all()
    ceiling = np.asarray(sens["fisher"]["r2_ceiling_median"])
    assert ceiling.shape == (len([s for s in levels if s is not None]), 9)
    assert np.all((ceiling >= 0) & (ceiling <= 1))  # 1 - posterior/prior variance lies in [0, 1]
    # the ceiling cannot fall as the SNR rises (information scales with 1 / noise variance)
    snrs = sens["fisher"]["snrs_db"]
    order = np.argsort(snrs)
    assert np.all(np.diff(ceiling[order], axis=0) >= -1e-12)
    meta = res["meta"]
    assert meta["versions"]["jax"] and meta["device"]["platform"] == "cpu" and meta["seconds_all_steps"] > 0
    # the trained estimator is usable from code
    est = jr_jax.Estimator.load(run / "models" / "robust")
    ds = jr_jax.load_dataset(run / "data" / "levels.zarr")
    theta = est.predict_array(np.asarray(ds.erp[:3]))
    assert theta.shape == (3, 9) and np.isfinite(theta).all()
    assert est.manifest["snr_db"] == [0.0, 40.0] and est.manifest["data"]["n_train"] == res["data"]["levels"]["train"]


def test_report_numbers_are_read_from_results_json(run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    res = json.loads((out / "results.json").read_text())
    names = res["meta"]["prior"]["names"]
    snr = STUDY_SNR_DB  # the headline compares with the study at its SNR
    assert res["headline_snr_db"] == snr
    md = (out / "report.md").read_text()
    row = _table_row(md, "jr_jax Pearson r")
    expect = [next(r["pearson"] for r in res["robust"]["rows"] if r["method"] == "jr_jax Bi-LSTM"
                   and r["snr_db"] == snr and r["parameter"] == p) for p in names]
    assert row == [f"{v:.2f}" for v in expect]
    assert _table_row(md, "study's best Pearson r (~50 dB)") == [f"{STUDY_PEARSON[p]:.2f}" for p in names]
    r2 = [next(r["r2"] for r in res["robust"]["rows"] if r["method"] == "jr_jax Bi-LSTM"
               and r["snr_db"] == snr and r["parameter"] == p) for p in names]
    assert _table_row(md, "jr_jax R²") == [f"{v:.2f}" for v in r2]  # R² beside r
    n_test = res["data"]["levels"]["test"]
    assert _table_row(md, "r against the study's") == [_compare_r(a, STUDY_PEARSON[p], n_test, 100)
                                                        for a, p in zip(expect, names)]
    # change one number in results.json: the re-rendered report shows it
    for r in res["robust"]["rows"]:
        if r["method"] == "jr_jax Bi-LSTM" and r["snr_db"] == snr and r["parameter"] == "b_i":
            r["pearson"] = 0.987654
    (out / "results.json").write_text(json.dumps(res))
    jr_jax.render_report(out)
    row = _table_row((out / "report.md").read_text(), "jr_jax Pearson r")
    assert row[names.index("b_i")] == "0.99"
    assert ">0.99<" in (out / "report.html").read_text()


def test_rerun_resumes_without_redoing_finished_steps(run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    shutil.copytree(run, out)
    before = json.loads((out / "results.json").read_text())
    # as if the run had stopped after training the robust model: its evaluation and the sensitivity are missing
    (out / "steps" / "evaluate_robust.json").unlink()
    (out / "steps" / "sensitivity.json").unlink()
    (out / "results.json").unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished training step was run again")

    monkeypatch.setattr("jr_jax._train.train", no_training)
    monkeypatch.setattr("jr_jax._data.make_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("resimulated")))
    res = jr_jax.reproduce("test", out, progress=False, log=lambda msg: None)
    assert res["meta"]["steps_run_now"] == ["evaluate_robust", "sensitivity"]
    # the redone steps give the same numbers (fixed seeds)
    key = lambda r: (r["method"], r["snr_db"], r["parameter"])  # noqa: E731
    old = {key(r): r["r2"] for r in before["robust"]["rows"]}
    for r in res["robust"]["rows"]:
        assert r["r2"] == pytest.approx(old[key(r)], abs=1e-6)


def test_interrupted_step_leaves_no_marker(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("jr_jax._train.train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jr_jax.reproduce("test", out, progress=False, log=lambda msg: None)
    done = sorted(p.stem for p in (out / "steps").glob("*.json"))
    assert done == ["data_levels", "erp_amplitude"]  # the interrupted training left nothing behind
    assert not (out / "results.json").exists()


def test_other_configuration_or_foreign_folder_is_refused(run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(run, out)
    import dataclasses

    changed = dataclasses.replace(PRESETS["test"], n_levels=500, seed=3)
    with pytest.raises(ValueError, match=r"differs in: n_levels, seed"):
        jr_jax.reproduce(changed, out, progress=False, log=lambda msg: None)
    assert (out / "results.json").exists()  # nothing was deleted
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a jr_jax reproduce folder"):
        jr_jax.reproduce("test", foreign, progress=False, log=lambda msg: None)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="preset must be one of"):
        jr_jax.reproduce("fast", tmp_path / "x")
    assert level_label(None) == "clean" and level_label(20.0) == "20 dB"


def test_steps_table_is_in_run_order(run):
    res = json.loads((run / "results.json").read_text())
    assert list(res["meta"]["step_seconds"]) == STEPS
    md = (run / "report.md").read_text()
    table = md.split("| step | seconds |")[1].split("\n\n")[0]
    listed = [ln.split("|")[1].strip() for ln in table.strip().splitlines()[1:]]
    assert listed == STEPS + ["all steps"]


def test_amplitude_is_measured_from_the_run(run):
    """The amplitude the report explains is recomputed here from the stored test ERPs (numpy)."""
    res = json.loads((run / "results.json").read_text())
    ds = jr_jax.load_dataset(run / "data" / "levels.zarr")
    erp = np.asarray(ds.erp[:])[np.sort(ds.split().test)]
    rms = np.sqrt(np.mean(erp**2, axis=1))
    a = res["amplitude"]
    assert a["n"] == len(erp)
    assert a["rms_mv"]["q50"] == pytest.approx(np.median(rms), rel=1e-5)
    assert a["min_mv"]["q05"] == pytest.approx(np.percentile(erp.min(axis=1), 5), rel=1e-5)
    md = (run / "report.md").read_text()
    assert f"median RMS of {a['rms_mv']['q50']:.0f} mV" in md and "not a scalp voltage" in md


def test_posterior_calibration_matches_evaluate(run):
    """The report's posterior rows are those jr_jax.evaluate gives for the posterior estimator on
    the same test ERPs (the same noise and draws), and coverage grows with the interval level."""
    res = json.loads((run / "results.json").read_text())
    post = res["posterior"]
    cfg = PRESETS["test"]
    assert post["levels_db"] == [STUDY_SNR_DB, 0.0] and post["n_draws"] == cfg.calibration_draws
    est = jr_jax.Estimator.load(run / "models" / "posterior")
    assert est.kind == "posterior"
    ds = jr_jax.load_dataset(run / "data" / "levels.zarr")
    levels = [None if s is None else float(s) for s in cfg.test_levels_db]
    with pytest.warns(UserWarning):  # 40 test ERPs: evaluate warns that so few are noisy
        rows = jr_jax.evaluate(est, ds, levels, baselines=False, n_draws=cfg.calibration_draws)
    mine = {(r["method"], r["snr_db"], r["parameter"]): r for r in post["rows"]}
    compared = 0
    for r in rows:
        if r["snr_db"] in post["levels_db"]:
            got = mine[(r["method"], r["snr_db"], r["parameter"])]
            for k, v in r.items():
                if isinstance(v, float) and math.isfinite(v):
                    assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
            compared += 1
    assert compared == len(post["rows"]) == 2 * 13  # 9 parameters and 4 log(C*a_k) per level
    for r in post["rows"]:
        cov = [r[f"coverage_{k}"] for k in (50, 80, 90, 95)]
        assert all(0 <= c <= 1 for c in cov) and cov == sorted(cov)  # nested central intervals
        assert 0 <= r["sbc_pvalue"] <= 1 and r["contraction"] <= 1
    md = (run / "report.md").read_text()
    row = _table_row(md, "log(C*a_1)")
    first = next(r for r in post["rows"] if r["parameter"] == "log(C*a_1)" and r["snr_db"] == STUDY_SNR_DB)
    assert row[:4] == [f"{first[f'coverage_{k}']:.2f}" for k in (50, 80, 90, 95)]


def test_posterior_flow_is_trained_on_the_frozen_robust_regressor(run):
    """The reproduce posterior's embedding is the robust point regressor's network, leaf for leaf
    (frozen: training the flow did not change it), with the preset's flow options, and the report
    says so."""
    import equinox as eqx
    import jax

    cfg = PRESETS["test"]
    assert cfg.posterior_embedding == "robust"
    robust = jr_jax.Estimator.load(run / "models" / "robust")
    posterior = jr_jax.Estimator.load(run / "models" / "posterior")
    mine = jax.tree_util.tree_leaves(eqx.filter(posterior.encoder.embedding, eqx.is_array))
    theirs = jax.tree_util.tree_leaves(eqx.filter(robust.encoder, eqx.is_array))
    assert len(mine) == len(theirs) > 0
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mine, theirs))
    np.testing.assert_array_equal(np.asarray(posterior.x_mean), np.asarray(robust.x_mean))
    for option, value in cfg.posterior_options.items():
        assert posterior.manifest["encoder"][option] == value, option
    assert posterior.manifest["snr_db"] == list(cfg.posterior_snr_db) == [-5.0, 55.0]
    assert robust.manifest["snr_db"] == list(cfg.robust_snr_db)
    md = (run / "report.md").read_text()
    assert ("trained on the robust point regressor's estimates, its network frozen as the embedding, with the "
            "ERP's noise level as a feature and a conditional affine last layer") in md
    assert "training ERPs, −5 to 55 dB, 2 epochs" in md and "| posterior −5 to 55 dB | posterior |" in md
    assert "\n \n" not in md  # no empty paragraph where a short training has no "still falling" sentence


@pytest.mark.parametrize("change, match", [
    (dict(posterior_embedding="grid"), "posterior_embedding must be 'robust' or None"),
    (dict(posterior_snr_db=30.0), r"posterior_snr_db must be None or \(low, high\): two finite numbers"),
    (dict(posterior_snr_db=(40.0, 0.0)), "low <= high"),
    (dict(posterior_snr_db=(True, 55.0)), "two finite numbers"),
    (dict(posterior_snr_db=(-5.0, float("inf"))), "two finite numbers"),
    (dict(posterior_options=dict(noise_feature=True, knot=8)), "unknown posterior option.s. knot; allowed: embed_dim"),
    (dict(posterior_options=dict(noise_feature="yes")), "posterior noise_feature must be True or False, got 'yes'"),
    (dict(posterior_options=dict(flow_layers=0)), "posterior flow_layers must be an integer >= 1, got 0"),
    (dict(posterior_embedding=None, posterior_options=dict(regression_weight=float("nan"))),
     "posterior regression_weight must be a finite number >= 0, got nan"),
    (dict(posterior_options=dict(regression_weight=10.0)), "embed_dim and regression_weight are for a posterior"),
])
def test_reproduce_config_refuses_bad_posterior_settings(change, match):
    with pytest.raises(ValueError, match=match):
        PRESETS["test"].__class__(**dict(PRESETS["test"].to_dict(), **change))


def test_reproduce_config_takes_numpy_numbers_for_the_posterior_snrs():
    cfg = PRESETS["test"].__class__(**dict(PRESETS["test"].to_dict(), posterior_snr_db=(np.float32(-5), np.int64(55))))
    assert cfg.posterior_snr_db == (-5.0, 55.0) and cfg.to_dict()["posterior_snr_db"] == [-5.0, 55.0]


def test_a_run_folder_of_an_earlier_version_resumes_with_its_own_posterior_settings(tmp_path):
    """A config.json written before the posterior fields existed is read as what that version did (a
    posterior trained end to end): a configuration saying so resumes it; the current preset is
    refused, the message naming the fields and how to resume, and nothing is deleted."""
    from jr_jax._reproduce import _check_out

    cfg = PRESETS["test"]
    old = {k: v for k, v in cfg.to_dict().items()
           if k not in ("posterior_embedding", "posterior_snr_db", "posterior_options")}
    out = tmp_path / "old_run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(old))
    (out / "steps").mkdir()
    (out / "steps" / "data_levels.json").write_text("{}")
    with pytest.raises(ValueError, match=r"differs in: posterior_embedding, posterior_options, posterior_snr_db\) "
                                         r"\(it was written by an earlier version of jr_jax"):
        _check_out(out, cfg, force=False)
    earlier = cfg.__class__(**dict(cfg.to_dict(), posterior_embedding=None, posterior_snr_db=None,
                                   posterior_options={}))
    _check_out(out, earlier, force=False)  # resumes: no error, nothing removed
    assert (out / "steps" / "data_levels.json").is_file() and json.loads((out / "config.json").read_text()) == old


def test_the_report_says_which_calibration_target_each_level_meets():
    """Each level is put in the group its two targets (calibration error <= 0.03, no SBC p < 0.01) say;
    an error of exactly 0.03 meets its target."""
    from jr_jax._report import _targets_sentence

    values = {50.0: (0.042, 0.2), 30.0: (0.028, 0.003), 10.0: (0.030, 0.5), 0.0: (0.05, 0.001)}
    rows = {(q, s): dict(calibration_error=e if q == "b_i" else 0.01, sbc_pvalue=p if q == "A_e" else 0.5)
            for s, (e, p) in values.items() for q in ("A_e", "b_i")}
    text = _targets_sentence(list(values), ["A_e", "b_i"], lambda q, s: rows[(q, s)])
    assert text == ("At 10 dB, both calibration targets are met; at 50 dB, only the SBC target is met (a calibration "
                    "error above the target); at 30 dB, only the calibration error target is met (an SBC failure); "
                    "at 0 dB, neither target is met.")


def test_correlation_comparison_against_scipy():
    """_compare_r is Fisher's two-sample z test at the two-sided 5 % level (p from SciPy's normal)."""
    from scipy import stats

    for r1, r2, n1, n2 in [(0.13, 0.08, 1000, 100), (0.30, 0.08, 1000, 100), (0.95, 0.99, 5000, 100),
                           (0.60, 0.54, 1000, 100), (0.05, 0.54, 40, 100)]:
        z = (np.arctanh(r1) - np.arctanh(r2)) / np.sqrt(1 / (n1 - 3) + 1 / (n2 - 3))
        p = 2 * stats.norm.sf(abs(z))
        expect = "same" if p >= 0.05 else ("higher" if r1 > r2 else "lower")
        assert _compare_r(r1, r2, n1, n2) == expect
    assert _compare_r(0.13, 0.08, 1000, 100) == "same"  # the case a plain "exceeds" got wrong


def test_render_report_names_the_sections_an_older_results_file_lacks(tmp_path):
    """A results.json from an earlier version (no posterior or amplitude section, as the study report
    of 2026-11-25) gets one clear error naming them, not a KeyError from deep in the rendering."""
    old = {k: {} for k in ("meta", "data", "grid", "robust", "sensitivity", "study")}
    old["test_dataset"] = "large"
    (tmp_path / "results.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"no 'posterior', 'amplitude' section: it was written by an earlier version"):
        jr_jax.render_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_the_printed_expected_durations_are_the_measured_ones():
    """The line printed before a named preset runs quotes its measured time: the quick preset's from
    benchmarks/results/reproduce_quick.json, the study preset's from the sum of the committed study
    run's steps (docs/study/results.json); to the second, so a rerun of either must update it."""
    from jr_jax._reproduce import MEASURED_SECONDS, _expected_duration

    root = Path(__file__).resolve().parent.parent
    quick = json.loads((root / "benchmarks/results/reproduce_quick.json").read_text())
    study = json.loads((root / "docs/study/results.json").read_text())
    assert abs(MEASURED_SECONDS["quick"] - quick["wall_seconds"]) < 1
    assert abs(MEASURED_SECONDS["study"] - study["meta"]["seconds_all_steps"]) < 1
    assert f"about {quick['wall_seconds'] / 60:.0f} min on a 2-core CPU" in _expected_duration("quick")
    assert "about 1.9 h on a 2-core CPU" in _expected_duration("study")
    assert _expected_duration("test") is None
