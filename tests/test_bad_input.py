"""Bad input and existing paths: nothing of the user's is deleted, and errors say what is wrong."""

import json

import jax
import numpy as np
import pytest

import jr_jax
from jr_jax.cli import main

PROTOCOL = dict(n_trials=1)


def _make(path, n=2, **kw):
    return jr_jax.make_dataset(jr_jax.Prior(), jr_jax.Protocol(**PROTOCOL), n, path, key=jax.random.key(0),
                               chunk_size=2, progress=False, **kw)


# --- overwrite never deletes what is not a jr_jax dataset ------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's work")
    with pytest.raises(FileExistsError, match="is not a jr_jax dataset") as info:
        _make(folder, overwrite=True)
    assert str(folder) in str(info.value) and "will not be deleted" in str(info.value)
    assert "overwrite=True" not in str(info.value) and "--force" not in str(info.value)
    assert (folder / "keep.txt").read_text() == "the user's work"
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


def test_overwrite_refuses_a_file(tmp_path):
    path = tmp_path / "notes.zarr"
    path.write_text("not a folder")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is not a jr_jax dataset"):
            _make(path, overwrite=overwrite)
    assert path.read_text() == "not a folder"


def test_a_foreign_zarr_group_is_not_a_dataset(tmp_path):
    import zarr

    path = tmp_path / "other.zarr"
    zarr.open_group(str(path), mode="w").attrs["someone"] = "else"
    with pytest.raises(FileExistsError, match="is not a jr_jax dataset"):
        _make(path, overwrite=True)
    assert dict(zarr.open_group(str(path), mode="r").attrs) == {"someone": "else"}


def test_an_empty_folder_is_used_and_a_dataset_is_overwritten(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    ds = _make(folder, n=2)
    assert ds.complete and ds.erp.shape[0] == 2
    ds = _make(folder, n=3, overwrite=True)  # a jr_jax dataset: replaced
    assert ds.complete and jr_jax.load_dataset(folder, verify=True).n == 3


def test_cli_simulate_force_keeps_a_users_folder(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's work")
    assert main(["simulate", "--n", "2", "--trials", "1", "--out", str(folder), "--force"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "is not a jr_jax dataset" in err and "--force" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert (folder / "keep.txt").read_text() == "the user's work"
    assert not (tmp_path / "mine.png").exists()


def test_cli_train_force_keeps_a_checkpoint_folder_that_is_not_jr_jax(tmp_path, capsys):
    data = tmp_path / "d.zarr"
    _make(data, n=2)
    out = tmp_path / "model"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "keep.txt").write_text("the user's work")
    main(["train", str(data), "--out", str(out), "--force", "--epochs", "1", "--hidden", "4", "--batch-size", "2"])
    assert (out / "checkpoint" / "keep.txt").read_text() == "the user's work"


def test_reproduce_force_keeps_a_folder_that_is_not_a_run(tmp_path):
    from jr_jax._reproduce import _check_out

    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("the user's work")
    (out / "config.json").write_text(json.dumps({"name": "my own settings"}))
    for force in (False, True):
        with pytest.raises(FileExistsError, match="is not a jr_jax reproduce folder") as info:
            jr_jax.reproduce("test", out, force=force, progress=False, log=lambda *a: None)
        assert str(out) in str(info.value) and "will not be deleted" in str(info.value)
    (out / "config.json").unlink()
    with pytest.raises(FileExistsError, match="is not a jr_jax reproduce folder"):
        jr_jax.reproduce("test", out, force=True, progress=False, log=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a jr_jax reproduce folder"):
        _check_out(a_file, jr_jax.PRESETS["test"], force=True)
    assert a_file.read_text() == "x"

    # a real run with another configuration is replaced with force (and refused without)
    run = tmp_path / "run"
    _check_out(run, jr_jax.PRESETS["quick"], force=False)
    (run / "steps").mkdir()
    with pytest.raises(ValueError, match="different configuration"):
        _check_out(run, jr_jax.PRESETS["test"], force=False)
    _check_out(run, jr_jax.PRESETS["test"], force=True)
    assert json.loads((run / "config.json").read_text())["preset"] == "test" and not (run / "steps").exists()
    # an empty folder is used
    empty = tmp_path / "empty"
    empty.mkdir()
    _check_out(empty, jr_jax.PRESETS["test"], force=False)
    assert (empty / "config.json").is_file()


def test_a_corrupt_reproduce_config_is_named(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"preset": "test", ')
    with pytest.raises(ValueError, match=r"config\.json is corrupt") as info:
        jr_jax.reproduce("test", out, force=True, progress=False, log=lambda *a: None)
    assert str(out / "config.json") in str(info.value)
    assert (out / "config.json").exists()


# --- errors that say what is wrong -----------------------------------------------------------------

@pytest.mark.parametrize("value", ["abc", None, ["1", "x"], object()])
def test_jrparams_names_the_field_that_is_not_a_number(value):
    with pytest.raises((TypeError, ValueError), match=r"JRParams\.A_i must be a number or an array"):
        jr_jax.JRParams(A_i=value)


def test_prior_bounds_that_are_not_numbers_are_named():
    with pytest.raises(ValueError, match=r"Prior bounds for A_e: need two numbers"):
        jr_jax.Prior(bounds={"A_e": ("low", 3.0)})


def test_a_missing_dataset_is_said_not_to_exist(tmp_path, capsys):
    missing = tmp_path / "nothere.zarr"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        jr_jax.load_dataset(missing)
    assert isinstance(info.value, jr_jax.DatasetError) and str(missing) in str(info.value)
    assert main(["info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "not a jr_jax dataset" not in err
    with pytest.raises(jr_jax.DatasetError, match="is not a jr_jax dataset"):  # exists, but is not one
        jr_jax.load_dataset(tmp_path)


def test_a_corrupt_dataset_metadata_file_is_named(tmp_path, capsys):
    path = tmp_path / "d.zarr"
    _make(path, n=3)
    marker = path / ".jr_jax" / "done" / "1.json"
    marker.write_text('{"chunk": 1, "start"')
    ds = jr_jax.load_dataset(path)
    assert ds.verify() == [1]  # an unreadable done-marker: that chunk is unverified
    with pytest.raises(jr_jax.DatasetError, match=r"1\.json is corrupt") as info:
        ds.n_valid()
    assert str(marker) in str(info.value)
    assert main(["info", str(path)]) == 2 and "1.json is corrupt" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"chunk\(s\) \[1\] do not match"):
        assert _make(path, n=3).complete  # resuming recomputes that chunk
    assert jr_jax.load_dataset(path, verify=True).n_valid() == 3

    (path / "zarr.json").write_text("{not json")
    with pytest.raises(jr_jax.DatasetError, match=r"zarr\.json is corrupt") as info:
        jr_jax.load_dataset(path)
    assert str(path / "zarr.json") in str(info.value)
    with pytest.raises(jr_jax.DatasetError, match=r"zarr\.json is corrupt"):
        _make(path, n=3)
    assert _make(path, n=3, overwrite=True).complete  # still recognisably jr_jax's: replaced


# --- ERP files for jr-jax infer: explicit units, a header line, a clear message otherwise ---------

def test_infer_reads_csv_with_a_header_and_converts_units(tmp_path):
    from jr_jax.cli import _read_erp_file

    erp = np.array([[1.0, -2.0, 3.5], [0.5, 0.25, -1.0]])
    rows = tmp_path / "rows.csv"
    rows.write_text("t0,t1,t2\n" + "\n".join(",".join(f"{v:g}" for v in r) for r in erp) + "\n")
    np.testing.assert_allclose(_read_erp_file(rows, "mV"), erp)
    np.testing.assert_allclose(_read_erp_file(rows, "uV"), erp * 1e-3)
    np.testing.assert_allclose(_read_erp_file(rows, "V"), erp * 1e3)
    column = tmp_path / "column.csv"  # one number per row: a single ERP
    column.write_text("erp_uV\n" + "\n".join(f"{v:g}" for v in erp[0]) + "\n")
    np.testing.assert_allclose(_read_erp_file(column, "uV"), erp[0] * 1e-3)
    np.save(tmp_path / "e.npy", erp)
    np.testing.assert_allclose(_read_erp_file(tmp_path / "e.npy", "V"), erp * 1e3)


def test_infer_erp_files_need_units_and_numbers(tmp_path, capsys):
    from jr_jax.cli import _read_erp_file

    good = tmp_path / "good.csv"
    good.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="--units .* is required for .npy/.csv"):
        _read_erp_file(good, None)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\nx,y,z\n")
    with pytest.raises(ValueError, match=r"line 3: not comma-separated numbers.*one ERP per row.*one number per row"):
        _read_erp_file(bad, "mV")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2,3\n4,5\n")
    with pytest.raises(ValueError, match="different numbers of values"):
        _read_erp_file(ragged, "mV")
    text = tmp_path / "s.npy"
    np.save(text, np.array(["a", "b"]))
    with pytest.raises(ValueError, match="must hold an array of numbers"):
        _read_erp_file(text, "mV")
    with pytest.raises(SystemExit):
        main(["infer", "--help"])
    assert "--units {mV,uV,V}" in capsys.readouterr().out


def test_help_shows_every_default():
    from jr_jax.cli import _parser

    commands = next(a for a in _parser()._actions if a.choices and "simulate" in a.choices).choices
    assert set(commands) == {"reproduce", "simulate", "train", "evaluate", "infer", "fit", "sensitivity", "info"}
    for name, p in commands.items():
        p.format_help()
        formatter = p._get_formatter()
        for action in p._actions:
            if action.option_strings and action.nargs != 0 and not action.required:
                shown = formatter._get_help_string(action) % dict(default=action.default)
                assert "(default:" in shown, (name, action.option_strings, shown)


def test_cli_simulate_keeps_a_plot_beside_an_empty_folder(tmp_path, capsys):
    (tmp_path / "new").mkdir()
    (tmp_path / "new.png").write_text("a user's figure")
    assert main(["simulate", "--n", "2", "--trials", "1", "--out", str(tmp_path / "new")]) == 2
    assert "new.png already exists" in capsys.readouterr().err
    assert (tmp_path / "new.png").read_text() == "a user's figure"
