"""EEG through MNE: sphere lead fields against independent references, sensor noise, Evoked in and out."""

import jax
import mne
import numpy as np
import pytest
from scipy.special import eval_legendre, lpmv

import jr_jax
import jr_jax.eeg as eeg
from jr_jax.cli import main

# the module fixtures are built once: every test here runs on the same xdist worker
pytestmark = pytest.mark.xdist_group("eeg")

MONTAGE_CHANNELS = ("F3", "FC3", "C3", "Fz", "FCz", "Cz", "Pz", "F4")
PROTOCOL = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study(), fs=250.0, tmin=-0.1, tmax=0.3, burn_in=0.3, n_trials=1)


def sphere_potential(electrodes, position, orientation, r0, radius, sigma, n_terms=1000):
    """Potential (V per A·m) on the surface of a homogeneous sphere from a current dipole inside it.

    Legendre series (e.g. Nunez & Srinivasan, Electric Fields of the Brain, 2006, ch. 6): with the
    dipole at distance b from the centre, angle γ to the electrode and f = b/R,
    V = 1/(4πσR²) Σ_n (2n+1) f^(n-1) [p_r P_n(cos γ) + p_t P_n^1(cos γ)/n]; p_t along the great
    circle towards the electrode. Independent of MNE's closed-form (Zhang 1995) and Berg-Scherg code.
    """
    rq = position - r0
    b = np.linalg.norm(rq)
    zq = rq / b
    n = np.arange(1, n_terms + 1)
    f = (b / radius) ** (n - 1)
    out = []
    for e in electrodes:
        u = (e - r0) / np.linalg.norm(e - r0)
        cosg = float(np.clip(u @ zq, -1, 1))
        t = u - cosg * zq
        p_t = orientation @ t / np.linalg.norm(t)
        p_r = orientation @ zq
        p1 = -lpmv(1, n, cosg)  # scipy includes the Condon-Shortley phase (-1)^m
        out.append(np.sum((2 * n + 1) * f * (p_r * eval_legendre(n, cosg) + p_t * p1 / n)))
    return np.array(out) / (4 * np.pi * sigma * radius**2)


def test_leadfield_matches_the_homogeneous_sphere_series():
    """MNE's sphere model with one conductivity everywhere vs the Legendre series of the same sphere.

    Tolerance 2e-5 of the largest gain: MNE fits three Berg-Scherg terms even for a homogeneous
    sphere (first term mu = 0.999998; measured deviation 2e-6) and stores gains in float32 (6e-8).
    """
    info = eeg.montage_info("biosemi64")
    radius, r0, _ = mne.bem.fit_sphere_to_headshape(info, dig_kinds=("eeg",), units="m", verbose=False)
    sigma = 0.33
    sphere = mne.make_sphere_model(r0=r0, head_radius=radius, relative_radii=(0.9, 1.0), sigmas=(sigma, sigma),
                                   verbose=False)
    elec = np.array([ch["loc"][:3] for ch in info["chs"]])
    elec = r0 + radius * (elec - r0) / np.linalg.norm(elec - r0, axis=1, keepdims=True)
    for position, orientation in [((-0.04, 0.015, 0.095), None), ((0.03, -0.02, 0.06), (0.3, -0.6, 0.2))]:
        p = np.array(position)
        ori = (p - r0) / np.linalg.norm(p - r0) if orientation is None else np.array(orientation) / np.linalg.norm(orientation)
        lf = eeg.leadfield("biosemi64", position, orientation, sphere=sphere, moment_per_mv=1.0, reference=None)
        ref = sphere_potential(elec, p, ori, r0, radius, sigma) * 1e-6  # V/(A·m) -> mV/mV at 1 nAm/mV
        assert lf.ch_names == tuple(info.ch_names)
        np.testing.assert_allclose(lf.gain, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_leadfield_matches_mne_forward_solution_on_a_discrete_source_space():
    """Four-shell default: our gain vs mne.make_forward_solution with a free-orientation point source
    projected on the orientation (a different MNE path: no fixed-orientation conversion). Both are
    float32 gains from the same sphere: agreement to 1e-6 of the largest gain."""
    info = eeg.montage_info("biosemi64")
    radius, r0, _ = mne.bem.fit_sphere_to_headshape(info, dig_kinds=("eeg",), units="m", verbose=False)
    sphere = mne.make_sphere_model(r0=r0, head_radius=radius, verbose=False)
    p, ori = np.array([-0.035, 0.02, 0.09]), np.array([0.2, 0.5, 0.84])
    ori /= np.linalg.norm(ori)
    src = mne.setup_volume_source_space(pos=dict(rr=p[None], nn=ori[None]), verbose=False)
    fwd = mne.make_forward_solution(info, None, src, sphere, meg=False, eeg=True, verbose=False)
    G = np.asarray(fwd["sol"]["data"], float)  # (64, 3): free orientation
    lf = eeg.leadfield("biosemi64", p, ori, moment_per_mv=2.5)
    ref = 2.5e-6 * (G @ ori)
    ref -= ref.mean()
    np.testing.assert_allclose(lf.gain, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    via_forward = eeg.from_forward(fwd, 0, ori, moment_per_mv=2.5)
    np.testing.assert_allclose(via_forward.gain, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    assert via_forward.ch_names == lf.ch_names
    with pytest.raises(ValueError, match="free orientations"):
        eeg.from_forward(fwd)


def test_default_leadfield_is_average_referenced_and_in_the_scalp_erp_range():
    lf = eeg.leadfield()
    unref = eeg.leadfield(reference=None)
    assert len(lf.gain) == 64 and abs(lf.gain.sum()) < 1e-12 * np.abs(lf.gain).sum()
    np.testing.assert_allclose(lf.gain, unref.gain - unref.gain.mean(), rtol=1e-12)
    np.testing.assert_allclose(eeg.leadfield(moment_per_mv=3.0).gain, 3.0 * lf.gain, rtol=1e-12)
    subset = eeg.leadfield(ch_names=MONTAGE_CHANNELS, reference=None)  # same sphere, fitted to all 64
    np.testing.assert_allclose(subset.gain, unref.gain[[lf.ch_names.index(c) for c in MONTAGE_CHANNELS]], rtol=1e-12)
    # the documented scale: ERP of the defaults (study stimulus) peaks near 10 µV at the nearest electrodes
    erp = np.asarray(jr_jax.simulate(jr_jax.JRParams(), jr_jax.Protocol(stimulus=jr_jax.Stimulus.study(),
                                                                        lead_field=lf.gain)))
    peak_uv = np.abs(erp).max() * 1e3
    assert 5 < peak_uv < 20, peak_uv
    assert lf.ch_names[int(np.abs(lf.gain).argmax())] in ("FC3", "FC5", "F3", "C3")  # left frontocentral
    with pytest.raises(ValueError, match="outside the innermost shell"):
        eeg.leadfield(position=(0.0, 0.0, 0.14))
    with pytest.raises(ValueError, match="built-in montages"):
        eeg.leadfield(montage="no-such-montage")
    with pytest.raises(ValueError, match="moment_per_mv"):
        eeg.leadfield(moment_per_mv=-1.0)


def test_sensor_noise_has_the_covariance_and_snr():
    """Empirical noise covariance vs the requested one (average-referenced, scaled to the SNR) over
    n = 400 x 300 independent samples: sampling SD of a variance is sqrt(2/n) = 0.4 %, so 3 %."""
    c, t, n = 5, 300, 400
    rng = np.random.default_rng(0)
    a = rng.normal(size=(c, c))
    sigma = a @ a.T + c * np.eye(c)
    erp = np.sin(np.linspace(0, 6, t))[:, None] * np.array([1.0, -2.0, 0.5, 3.0, 0.0])
    keys = jax.random.split(jax.random.key(1), n)
    batch = np.broadcast_to(erp, (n, t, c))
    for reference in ("average", None):
        clean = erp - erp.mean(axis=1, keepdims=True) if reference else erp
        noisy = np.asarray(eeg.add_sensor_noise(batch, 10.0, key=keys, cov=sigma, reference=reference), float)
        noise = (noisy - clean).reshape(-1, c)
        h = np.eye(c) - 1.0 / c if reference else np.eye(c)
        target = h @ sigma @ h
        target *= np.mean(clean**2) / 10.0 / (np.trace(target) / c)
        emp = noise.T @ noise / len(noise)
        np.testing.assert_allclose(emp, target, rtol=0, atol=0.03 * np.diag(target).max())
        if reference:
            assert np.abs(noisy.sum(axis=2)).max() < 1e-5 * np.abs(noisy).max()
    # an mne.Covariance in another channel order is matched by name
    names = [f"E{i}" for i in range(c)]
    order = [3, 0, 4, 1, 2]
    cov = mne.Covariance(sigma[np.ix_(order, order)], [names[i] for i in order], [], [], n)
    a1 = eeg.add_sensor_noise(erp, 0.0, key=jax.random.key(2), cov=cov, ch_names=names)
    a2 = eeg.add_sensor_noise(erp, 0.0, key=jax.random.key(2), cov=sigma)
    np.testing.assert_allclose(a1, a2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pass ch_names"):
        eeg.add_sensor_noise(erp, 0.0, key=jax.random.key(2), cov=cov)
    # a diagonal mne.Covariance holds variances as a vector: the same noise as per-channel SDs
    variances = np.diag(sigma)[order]
    diag_cov = mne.Covariance(variances, [names[i] for i in order], [], [], n)
    assert diag_cov["diag"]
    d1 = eeg.add_sensor_noise(erp, 0.0, key=jax.random.key(2), cov=diag_cov, ch_names=names)
    d2 = eeg.add_sensor_noise(erp, 0.0, key=jax.random.key(2), cov=np.sqrt(np.diag(sigma)))
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="positive semi-definite"):
        eeg.add_sensor_noise(erp, 0.0, key=jax.random.key(2), cov=-np.eye(c))


def test_from_evoked_resamples_and_interpolates_onto_the_model_grid():
    """A BioSemi-rate recording (512 Hz; its samples fall between those of the model's 250 Hz grid)
    vs the exact band-limited signal (components <= 30 Hz) on the grid. FFT resampling and the cubic
    spline at 250 Hz leave < 0.5 % of the peak (spline error for 30 Hz at 4 ms steps:
    (2π·0.12)^4/384 ≈ 0.1 %)."""
    comps = [(2e-6, 3.0, 0.1), (1e-6, 11.0, 1.0), (0.5e-6, 30.0, 2.0)]
    sig = lambda tt: sum(a * np.sin(2 * np.pi * f * tt + ph) for a, f, ph in comps)  # noqa: E731
    ev = mne.EvokedArray(np.zeros((2, 512)), mne.create_info(["Cz", "Pz"], 512.0, "eeg"), tmin=-0.3, verbose=False)
    ev.data[:] = np.stack([sig(ev.times), -0.5 * sig(ev.times)])
    assert 0.1 < (ev.times[0] * 250) % 1 < 0.9  # resampled from its first sample, it is off the model's grid
    x = eeg.from_evoked(ev, protocol=PROTOCOL, reference=None)
    exact = sig(PROTOCOL.times)[:, None] * np.array([1.0, -0.5]) * 1e3
    exact -= exact[:25].mean(axis=0)  # baseline over tmin <= t < 0: 25 samples
    assert x.shape == (PROTOCOL.n_times, 2)
    np.testing.assert_allclose(x, exact, rtol=0, atol=5e-3 * np.abs(exact).max())


def test_from_evoked_baseline_follows_the_training_erps(models):
    """A constant 3 µV offset: removed when the model's ERPs were baseline-corrected (the default),
    kept when they were not (protocol or estimator manifest with baseline=False). The same float64
    data go through both paths, so they differ by rounding only (atol 1e-9 mV against ~1e-2 mV
    signals); the offset itself is checked against the stored ERP, which the file holds in float32
    (1e-6 of the 0.01 mV peak, under rtol 1e-4 of the 3e-3 mV offset)."""
    d, erp, lf, protocol = models
    ev = mne.read_evokeds(d / "sim-ave.fif", condition=0, verbose=False)
    ev.data += 3e-6
    corrected = eeg.from_evoked(ev, protocol=protocol, reference=None)
    raw = eeg.from_evoked(ev, protocol=protocol.replace(baseline=False), reference=None)
    n_pre = int(round(-protocol.tmin * protocol.fs))
    np.testing.assert_allclose(corrected[:n_pre].mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(raw - corrected, np.broadcast_to(raw[:n_pre].mean(axis=0), raw.shape), atol=1e-9)
    np.testing.assert_allclose(raw[:n_pre].mean(axis=0) - erp[0][:n_pre].mean(axis=0), 3e-3, rtol=1e-4)
    multi = jr_jax.Estimator.load(d / "multi")
    assert multi.manifest["baseline"] is True
    np.testing.assert_allclose(eeg.from_evoked(ev, estimator=multi, reference=None), corrected, atol=1e-9)
    multi.manifest["baseline"] = False
    np.testing.assert_allclose(eeg.from_evoked(ev, estimator=multi, reference=None), raw, atol=1e-9)


def test_source_channel_round_trip():
    """A source-level ERP (no lead field) goes out as one misc channel and comes back unchanged: no
    EEG reference or volt-scale check applies to it; float32 storage bounds the error (1e-6)."""
    erp = np.asarray(jr_jax.simulate(jr_jax.JRParams(), PROTOCOL))
    ev = eeg.to_evoked(erp, PROTOCOL)
    assert ev.ch_names == ["source"] and ev.get_channel_types() == ["misc"] and ev.nave == 1
    x = eeg.from_evoked(ev, fs=PROTOCOL.fs, tmin=PROTOCOL.tmin, tmax=PROTOCOL.tmax)
    assert x.shape == (PROTOCOL.n_times, 1)
    np.testing.assert_allclose(x[:, 0], erp, rtol=0, atol=1e-6 * np.abs(erp).max())
    with pytest.raises(ValueError, match=r"expected \(101, 3\)"):
        eeg.to_evoked(np.zeros((101, 2)), PROTOCOL, ch_names=["Cz", "Pz", "Fz"])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Eight channels of the default lead field; a multichannel model and a single-channel model
    (each channel's ERP a sample), both trained for one epoch: enough to test the data path."""
    d = tmp_path_factory.mktemp("eeg")
    lf = eeg.leadfield(ch_names=MONTAGE_CHANNELS)
    protocol = PROTOCOL.replace(lead_field=lf.gain)
    prior = jr_jax.Prior(kind="normal")
    params = prior.sample(jax.random.key(0), 48)
    erp = np.asarray(jr_jax.simulate(params, protocol))
    theta = np.asarray(prior.to_array(params))
    kw = dict(names=prior.names, lows=prior.lows, highs=prior.highs, fs=protocol.fs, tmin=protocol.tmin,
              units=prior.units)
    enc = dict(hidden=4, conv_channels=4, conv_kernel=4, conv_stride=4)
    multi = jr_jax.TrainingData.from_arrays(theta, erp, **kw)
    multi.info["ch_names"] = list(lf.ch_names)
    est_multi, _ = jr_jax.train(multi, kind="point", encoder=enc, epochs=1, batch_size=16, progress=False)
    single = jr_jax.TrainingData.from_arrays(np.repeat(theta, len(lf.gain), axis=0),
                                             erp.transpose(0, 2, 1).reshape(-1, protocol.n_times), **kw)
    est_single, _ = jr_jax.train(single, kind="point", encoder=enc, epochs=1, batch_size=64, progress=False)
    est_multi.save(d / "multi")
    est_single.save(d / "single")
    ev = eeg.to_evoked(erp[0], protocol, ch_names=lf.ch_names)
    ev.save(d / "sim-ave.fif", verbose=False)
    return d, erp, lf, protocol


def test_evoked_file_round_trip_through_from_evoked_and_predict(models, capsys):
    d, erp, lf, protocol = models
    ev = mne.read_evokeds(d / "sim-ave.fif", condition=0, verbose=False)
    assert ev.nave == 1 and np.isclose(ev.info["sfreq"], 250.0) and ev.get_montage() is not None
    np.testing.assert_allclose(ev.data, erp[0].T * 1e-3, rtol=1e-6, atol=0)  # stored in V (float32)
    multi = jr_jax.Estimator.load(d / "multi")
    x, names = eeg.from_evoked(d / "sim-ave.fif", estimator=multi, return_ch_names=True)
    assert names == list(lf.ch_names) and x.shape == (protocol.n_times, 8)
    # float32 storage and re-referencing an already average-referenced field: 1e-6 of the peak
    np.testing.assert_allclose(x, erp[0], rtol=0, atol=1e-6 * np.abs(erp[0]).max())
    # the network's output is smooth in its input: 1e-4 of each parameter's range
    tol = 1e-4 * (multi.highs - multi.lows)
    np.testing.assert_array_less(np.abs(multi.predict_array(x) - multi.predict_array(erp[0])), tol)
    single = jr_jax.Estimator.load(d / "single")
    xs = eeg.from_evoked(ev, estimator=single)
    assert xs.shape == (8, protocol.n_times)
    np.testing.assert_allclose(xs, erp[0].T, rtol=0, atol=1e-6 * np.abs(erp[0]).max())

    assert main(["infer", str(d / "multi"), str(d / "sim-ave.fif")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("8 channels") and "A_i [mV]" in lines[0]
    printed = np.array(lines[1].split()[2:], float)
    np.testing.assert_allclose(printed, multi.predict_array(x), rtol=1e-3)  # 4 significant digits printed
    assert main(["infer", str(d / "single"), str(d / "sim-ave.fif"), "--picks", "Cz,F3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == ["Cz", "F3"]
    printed = np.array([ln.split()[1:] for ln in lines[1:]], float)
    np.testing.assert_allclose(printed, single.predict_array(xs[[5, 0]]), rtol=1e-3)
    assert main(["infer", str(d / "single"), str(d / "sim-ave.fif"), "--fs", "250"]) == 2
    assert "--fs is for" in capsys.readouterr().err


def test_from_evoked_errors(models, capsys):
    d, erp, lf, protocol = models
    multi = jr_jax.Estimator.load(d / "multi")
    ev = mne.read_evokeds(d / "sim-ave.fif", condition=0, verbose=False)
    slow = ev.copy().resample(200.0, verbose=False)
    with pytest.raises(ValueError, match="sampled at 200 Hz, below the model's fs = 250 Hz"):
        eeg.from_evoked(slow, estimator=multi)
    short = ev.copy().crop(0.0, None)
    with pytest.raises(ValueError, match="does not cover the model's window -0.1 to 0.3 s"):
        eeg.from_evoked(short, estimator=multi)
    with pytest.raises(ValueError, match=r"channel\(s\) \['Oz'\] not in the recording"):
        eeg.from_evoked(ev, ["Cz", "Oz"], protocol=protocol)
    with pytest.raises(ValueError, match=r"channel\(s\) \['Pz'\] not in the recording"):
        eeg.from_evoked(ev.copy().drop_channels(["Pz"]), estimator=multi)
    with pytest.raises(ValueError, match="marked bad"):
        bad = ev.copy()
        bad.info["bads"] = ["Cz"]
        eeg.from_evoked(bad, estimator=multi)
    micro = mne.EvokedArray(ev.data * 1e6, ev.info, tmin=ev.tmin, verbose=False)  # µV numbers stored as V
    with pytest.raises(ValueError, match="data in µV must be divided by 1e6"):
        eeg.from_evoked(micro, estimator=multi)
    with pytest.raises(ValueError, match="exactly one of estimator, protocol"):
        eeg.from_evoked(ev)
    assert main(["infer", str(d / "multi"), str(d / "missing-ave.fif")]) == 2
    assert "no such Evoked file" in capsys.readouterr().err
    micro.save(d / "micro-ave.fif", verbose=False)
    assert main(["infer", str(d / "multi"), str(d / "micro-ave.fif")]) == 2
    assert "µV" in capsys.readouterr().err
