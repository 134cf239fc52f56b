import numpy as np

from jr_jax.cli import main


def test_simulate_writes_erps_params_and_plot_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", "--n", "3", "--out", str(out), "--trials", "2", "--seed", "1"]) == 0
    data = np.load(out / "erps.npz")
    assert data["erp"].shape == (3, 1201) and data["theta"].shape == (3, 9) and data["valid"].all()
    assert list(data["names"])[:2] == ["A_e", "A_i"]
    lines = (out / "params.csv").read_text().splitlines()
    assert lines[0].startswith("sample,A_e [mV],A_i [mV]") and len(lines) == 4
    assert (out / "erps.png").stat().st_size > 10_000
    before = (out / "erps.npz").read_bytes()
    assert main(["simulate", "--n", "2", "--out", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert (out / "erps.npz").read_bytes() == before  # untouched
    assert main(["simulate", "--n", "2", "--out", str(out), "--force"]) == 0
    assert np.load(out / "erps.npz")["erp"].shape == (2, 1201)


def test_simulate_with_noise_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "noisy"
    assert main(["simulate", "--n", "2", "--out", str(out), "--sigma", "6.15", "--trials", "2", "--snr", "10"]) == 0
    assert np.isfinite(np.load(out / "erps.npz")["erp"]).all()
    assert main(["simulate", "--n", "0", "--out", str(tmp_path / "x")]) == 2
    assert main(["simulate", "--sigma", "-1", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "--n must be >= 1" in err and "sigma must be >= 0" in err
