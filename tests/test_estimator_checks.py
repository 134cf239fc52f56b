"""A saved estimator that cannot be read gives one clear error; evaluate and predict refuse ERPs made
with another prior or protocol than the training one; evaluate warns when the test split is too small."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jr_jax
from jr_jax._estimator import prior_differences, protocol_differences
from jr_jax._flow import PosteriorNet
from jr_jax.cli import main

# the module fixtures are built once: every test here runs on the same xdist worker
pytestmark = pytest.mark.xdist_group("estimator_checks")

PRIOR = jr_jax.Prior(names=("A_i", "b_i"))
PROTOCOL = jr_jax.Protocol(tmin=-0.1, tmax=0.3, fs=200.0, burn_in=0.5, dt=1e-3, n_trials=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A point estimator trained for one epoch on 20 ERPs, saved; its dataset (2 test ERPs)."""
    root = tmp_path_factory.mktemp("checks")
    ds = jr_jax.make_dataset(PRIOR, PROTOCOL, 20, root / "d.zarr", key=jax.random.key(0), chunk_size=20,
                             progress=False)
    est, _ = jr_jax.train(ds, kind="point", encoder=dict(hidden=8), epochs=1, batch_size=8, progress=False)
    est.save(root / "model")
    return est, ds, root


def _copy(est, directory, **manifest_changes):
    """``est`` saved with a changed manifest (as an estimator trained otherwise would record it)."""
    manifest = {k: v for k, v in {**est.manifest, **manifest_changes}.items()
                if not (k in manifest_changes and v is None)}
    jr_jax.Estimator(est.encoder, est.x_mean, est.x_std, manifest).save(directory)
    return jr_jax.Estimator.load(directory)


# --- 1. unreadable estimators ------------------------------------------------------------------


def test_load_refuses_truncated_random_or_foreign_weights(trained, tmp_path):
    est, _, root = trained
    weights = (root / "model" / "model.eqx").read_bytes()
    cases = {"truncated": weights[: len(weights) // 2], "random": os.urandom(len(weights)),
             "longer": weights + b"\0" * 16, "empty": b""}
    for name, content in cases.items():
        d = tmp_path / name
        est.save(d)
        (d / "model.eqx").write_bytes(content)
        with pytest.raises(jr_jax.EstimatorError) as info:
            jr_jax.Estimator.load(d)
        msg = str(info.value)
        assert isinstance(info.value, ValueError)
        assert str(d / "model.eqx") in msg and "corrupt" in msg, (name, msg)
        assert "another architecture" in msg and "\n" not in msg and len(msg) < 600, (name, msg)
    # weights of another architecture than the manifest's (hidden=16 written, hidden=8 described)
    wider = jr_jax.Estimator.skeleton({**est.manifest, "encoder": {**est.manifest["encoder"], "hidden": 16}})
    wider.save(tmp_path / "wider")
    d = tmp_path / "foreign"
    est.save(d)
    (d / "model.eqx").write_bytes((tmp_path / "wider" / "model.eqx").read_bytes())
    with pytest.raises(jr_jax.EstimatorError, match="model.eqx cannot be read.*another architecture"):
        jr_jax.Estimator.load(d)


def test_load_refuses_a_broken_manifest(trained, tmp_path):
    est, _, root = trained
    text = (root / "model" / "manifest.json").read_text()
    for name, content in {"truncated": text[: len(text) // 3], "binary": b"\xff\xfe\x00garbage",
                          "a list": "[1, 2]"}.items():
        d = tmp_path / name.replace(" ", "_")
        est.save(d)
        path = d / "manifest.json"
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        with pytest.raises(jr_jax.EstimatorError, match="manifest.json is corrupt") as info:
            jr_jax.Estimator.load(d)
        assert str(path) in str(info.value), name
    # valid JSON from another version: the encoder's description is missing or unknown
    manifest = json.loads(text)
    for i, change in enumerate(({"encoder": None}, {"encoder": {**manifest["encoder"], "kind": "transformer"}})):
        d = tmp_path / f"version_{i}"
        est.save(d)
        (d / "manifest.json").write_text(json.dumps({k: v for k, v in {**manifest, **change}.items()
                                                     if v is not None}))
        with pytest.raises(jr_jax.EstimatorError, match="manifest.json does not describe.*another version of jr_jax"):
            jr_jax.Estimator.load(d)


def test_cli_reports_an_unreadable_estimator_in_one_line(trained, tmp_path, capsys):
    est, ds, root = trained
    np.save(tmp_path / "erp.npy", np.asarray(ds.erp[:2]))
    broken = tmp_path / "broken"
    est.save(broken)
    weights = (broken / "model.eqx").read_bytes()
    (broken / "model.eqx").write_bytes(weights[:100])
    capsys.readouterr()
    commands = (["infer", str(broken), str(tmp_path / "erp.npy"), "--fs", "200", "--units", "mV"],
                ["evaluate", str(broken), str(ds.path), "--snr", "inf", "--no-baselines"])
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert str(broken / "model.eqx") in err and "corrupt" in err
    (broken / "model.eqx").write_bytes(weights)
    (broken / "manifest.json").write_text("{\"kind\": ")
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "manifest.json is corrupt" in err, err


# --- 2. evaluate on a dataset made otherwise -------------------------------------------------------


def test_protocol_and_prior_differences_name_each_field():
    a = PROTOCOL.to_dict()
    same = PROTOCOL.replace(dt=5e-4, solver="euler", burn_in=2.0, snr_db=10.0, noise_color="pink").to_dict()
    assert protocol_differences(a, same) == []
    other = PROTOCOL.replace(stimulus=jr_jax.Stimulus(amplitude=120.0, duration=0.02, gains=(1.0, 1.0, 0.0),
                                                      shape="gaussian"), n_trials=60, baseline=False).to_dict()
    assert protocol_differences(a, other) == [
        "stimulus.amplitude: 60.0 vs 120.0", "stimulus.duration: 0.05 vs 0.02",
        "stimulus.gains: [0.0, 1.0, 0.0] vs [1.0, 1.0, 0.0]", "stimulus.shape: 'rect' vs 'gaussian'",
        "n_trials: 1 vs 60", "baseline: True vs False"]
    old = {k: a[k] for k in ("fs", "tmin", "tmax")}  # an older manifest: only what it records is compared
    assert protocol_differences(old, other) == []

    p = PRIOR.to_dict()
    assert prior_differences(p, jr_jax.Prior(names=("A_i", "b_i")).to_dict()) == []
    q = jr_jax.Prior(names=("A_i", "b_e"), kind="normal", bounds={"A_i": (20.0, 100.0)},
                     base=jr_jax.JRParams(sigma=6.15)).to_dict()
    diff = prior_differences(p, q)
    assert diff[:2] == ["kind: 'uniform' vs 'normal'", "names: ['A_i', 'b_i'] vs ['A_i', 'b_e']"]
    assert diff[2] == "bounds.A_i: [17.6, 110.0] vs [20.0, 100.0]"
    assert len(diff) == 4 and diff[3].startswith("base.sigma: 0.0 (noise-free dynamics) vs 6.15")


def test_evaluate_refuses_a_dataset_made_with_another_prior_or_protocol(trained, tmp_path):
    est, ds, _ = trained
    with pytest.warns(UserWarning, match="only 2 ERPs"):
        assert jr_jax.evaluate(est, ds, (None,), baselines=False)  # its own dataset: accepted
    # a dataset simulated from a narrower prior
    narrow = jr_jax.make_dataset(jr_jax.Prior(names=("A_i", "b_i"), bounds={"A_i": (20.0, 100.0)}), PROTOCOL, 20,
                                 tmp_path / "narrow.zarr", key=jax.random.key(1), chunk_size=20, progress=False)
    with pytest.raises(ValueError, match=r"prior\.bounds\.A_i: \[17\.6, 110\.0\] vs \[20\.0, 100\.0\]"):
        jr_jax.evaluate(est, narrow, (None,), baselines=False)
    # estimators trained with another stimulus, n_trials or noisy dynamics, evaluated on this dataset
    stim = PROTOCOL.replace(stimulus=jr_jax.Stimulus(amplitude=120.0, shape="gaussian"), n_trials=60).to_dict()
    noisy = {**PRIOR.to_dict(), "base": {**PRIOR.to_dict()["base"], "sigma": 6.15}}
    other = _copy(est, tmp_path / "other", protocol=stim, prior=noisy)
    with pytest.raises(ValueError) as info:
        jr_jax.evaluate(other, ds, (None,), baselines=False)
    msg = str(info.value)
    for part in ("estimator vs dataset", "prior.base.sigma: 6.15 (noisy dynamics) vs 0.0 (noise-free dynamics)",
                 "protocol.stimulus.amplitude: 120.0 vs 60.0", "protocol.stimulus.shape: 'gaussian' vs 'rect'",
                 "protocol.n_trials: 60 vs 1"):
        assert part in msg, (part, msg)
    # how the ERPs were computed is not compared, and older manifests (no prior or protocol) still work
    computed = PROTOCOL.replace(dt=5e-4, burn_in=1.0, solver="euler").to_dict()
    for name, changes in {"computed": dict(protocol=computed), "old": dict(protocol=None, prior=None)}.items():
        with pytest.warns(UserWarning, match="only 2 ERPs"):
            assert jr_jax.evaluate(_copy(est, tmp_path / name, **changes), ds, (None,), baselines=False)


# --- 3. too few test ERPs ----------------------------------------------------------------------


def test_evaluate_warns_below_100_test_erps_only(trained, tmp_path):
    est, ds, _ = trained
    with pytest.warns(UserWarning, match=r"only 2 ERPs \(fewer than 100\).*Pearson r is ±1"):
        jr_jax.evaluate(est, ds, (None,), baselines=False)
    big = jr_jax.make_dataset(PRIOR, PROTOCOL, 1000, tmp_path / "big.zarr", key=jax.random.key(2), chunk_size=500,
                              progress=False)
    assert len(big.split().test) == 100
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*test split", category=UserWarning)
        rows = jr_jax.evaluate(est, big, (None,), baselines=False)
    assert rows[0]["n_test"] == 100


# --- 4. predict / sample with the ERP's protocol ---------------------------------------------------


def test_predict_refuses_an_erp_made_with_another_protocol(trained, tmp_path):
    est, ds, _ = trained
    erp = np.asarray(ds.erp[:3])
    np.testing.assert_array_equal(est.predict_array(erp, protocol=PROTOCOL), est.predict_array(erp))
    np.testing.assert_array_equal(est.predict_array(erp, protocol=PROTOCOL.replace(dt=5e-4, snr_db=10.0)),
                                  est.predict_array(erp))
    with pytest.raises(ValueError, match=r"estimator vs ERP\): stimulus\.amplitude: 60\.0 vs 120\.0; n_trials: 1 vs 60"):
        est.predict(erp, protocol=PROTOCOL.replace(stimulus=jr_jax.Stimulus(amplitude=120.0), n_trials=60))
    with pytest.raises(ValueError, match=r"baseline: True vs False"):
        est.predict_array(erp[0], protocol=PROTOCOL.replace(baseline=False))
    with pytest.raises(ValueError, match=r"tmax: 0\.3 vs 0\.5"):
        est.predict_array(erp, protocol=PROTOCOL.replace(tmax=0.5))
    with pytest.raises(TypeError, match="jr_jax.Protocol"):
        est.predict(erp, protocol=PROTOCOL.to_dict())
    # an older manifest without the protocol: its fs and epoch are still compared, nothing else
    old = _copy(est, tmp_path / "old", protocol=None, prior=None)
    other_stimulus = PROTOCOL.replace(stimulus=jr_jax.Stimulus(amplitude=120.0), n_trials=60)
    assert old.predict_array(erp, protocol=other_stimulus).shape == (3, 2)
    with pytest.raises(ValueError, match=r"fs: 200\.0 vs 100\.0"):
        old.predict_array(erp, protocol=PROTOCOL.replace(fs=100.0))


def test_predict_refuses_an_erp_that_is_not_numbers(trained):
    """Strings that NumPy would silently parse as floats, and objects, are refused with the dtype named."""
    est, ds, _ = trained
    n = np.asarray(ds.erp[:1]).shape[1]
    with pytest.raises(TypeError, match="erp must be numbers.*strings"):
        est.predict(["1"] * n)
    with pytest.raises(TypeError, match="erp must be numbers.*objects"):
        est.predict_array(np.array([object()] * n))


def test_sample_refuses_an_erp_made_with_another_protocol(trained):
    _, ds, _ = trained
    net = PosteriorNet(1, 2, encoder=dict(hidden=8), embed_dim=4, flow_layers=2, knots=4, nn_width=16,
                       key=jax.random.key(3))
    manifest = dict(kind="posterior", encoder=net.config, names=list(PRIOR.names), units=list(PRIOR.units),
                    lows=PRIOR.lows.tolist(), highs=PRIOR.highs.tolist(), fs=200.0, tmin=-0.1, tmax=0.3, n_times=81,
                    n_channels=1, n_trials=1, baseline=True, rms_range_mv=[1e-3, 1e3], protocol=PROTOCOL.to_dict())
    est = jr_jax.Estimator(net, jnp.zeros(1), jnp.ones(1), manifest)
    erp = np.asarray(ds.erp[:2])
    key = jax.random.key(0)
    np.testing.assert_array_equal(est.sample(erp, 5, key=key, protocol=PROTOCOL), est.sample(erp, 5, key=key))
    gaussian = PROTOCOL.replace(stimulus=jr_jax.Stimulus(shape="gaussian"))
    with pytest.raises(ValueError, match="stimulus.shape: 'rect' vs 'gaussian'"):
        est.sample(erp, 5, key=key, fs=200.0, protocol=gaussian, check_distribution=False)
    with pytest.raises(ValueError, match="stimulus.shape: 'rect' vs 'gaussian'"):
        est.predict_array(erp, protocol=gaussian)  # a posterior's predict is the mean of its draws


def test_predict_refuses_an_erp_with_a_dc_offset(trained):
    """A baseline-corrected model refuses an ERP whose pre-stimulus mean is not ~0: here each ERP
    shifted by twice its own RMS (the RMS stays within the training range, so only the baseline
    check can catch it); the unshifted ERPs are answered."""
    est, ds, _ = trained
    erp = np.asarray(ds.erp[:3], np.float64)
    assert est.predict_array(erp).shape == (3, 2)
    rms = np.sqrt(np.mean(erp**2, axis=1, keepdims=True))
    with pytest.raises(ValueError, match=r"erp sample 0 has a pre-stimulus mean of .* baseline-corrected"):
        est.predict(erp + 2 * rms)
    with pytest.raises(ValueError, match=r"erp sample 1 has a pre-stimulus mean"):
        est.predict_array(np.concatenate([erp[:1], erp[1:2] - 2 * rms[1:2]]))
