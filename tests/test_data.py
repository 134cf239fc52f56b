import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jr_jax
from jr_jax import DatasetError, Prior, Protocol, load_dataset, make_dataset

# the module fixtures are built once: every test here runs on the same xdist worker
pytestmark = pytest.mark.xdist_group("data")

PROTOCOL = Protocol(burn_in=0.1, tmin=-0.05, tmax=0.15)
N, CHUNK = 48, 8
KEY = jax.random.key(5)


def _same_bytes(a, b):
    for name in ("theta", "erp", "valid"):
        x, y = np.asarray(getattr(a, name)[:]), np.asarray(getattr(b, name)[:])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run that the other paths must reproduce bit for bit."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    return make_dataset(Prior(), PROTOCOL, N, path, key=KEY, chunk_size=CHUNK, progress=False)


def test_dataset_contents_and_metadata(reference):
    ds = load_dataset(reference.path, verify=True)
    assert ds.complete and ds.n == N and ds.n_chunks == 6 and ds.n_valid() == N
    assert ds.theta.shape == (N, 9) and ds.erp.shape == (N, PROTOCOL.n_times) and ds.valid.shape == (N,)
    assert ds.names == jr_jax.STUDY_PARAMETERS and ds.units[0] == "mV"
    assert ds.protocol == PROTOCOL and ds.prior.to_dict() == Prior().to_dict()
    assert set(ds.versions) >= {"jr_jax", "jax", "diffrax"}
    theta = np.asarray(ds.theta[:])
    assert np.all((theta >= Prior().lows - 1e-6) & (theta <= Prior().highs + 1e-6))
    # chunk 2 equals the simulator called on those samples with the dataset's keys
    key_prior, key_sim = jax.random.fold_in(KEY, 0), jax.random.fold_in(KEY, 1)
    params = Prior().sample(key_prior, CHUNK, first_index=16)
    np.testing.assert_array_equal(np.asarray(Prior().to_array(params)), theta[16:24])
    erp = np.asarray(jr_jax.simulate(params, PROTOCOL, key=key_sim, chunk_size=CHUNK, first_index=16))
    np.testing.assert_array_equal(erp, np.asarray(ds.erp[16:24]))
    assert "48 in 6 chunks of 8; complete" in ds.summary()


def test_split_is_deterministic_disjoint_and_excludes_invalid(reference, tmp_path):
    ds = reference
    a, b = ds.split(), ds.split()
    for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test)):
        np.testing.assert_array_equal(x, y)
    everything = np.concatenate([a.train, a.val, a.test])
    assert len(everything) == len(np.unique(everything)) == N - a.n_invalid
    assert (len(a.train), len(a.val), len(a.test)) == (38, 5, 5)
    assert not np.array_equal(ds.split(seed=1).test, a.test)
    halves = ds.split((0.5, 0.5, 0.0))  # boundaries are rounded cumulatively: nothing leaks into test
    assert (len(halves.train), len(halves.val), len(halves.test)) == (24, 24, 0)
    with pytest.raises(ValueError, match="fractions"):
        ds.split((0.5, 0.5, 0.5))


def test_batches_stream_each_sample_once_in_a_seeded_order(reference):
    ds = reference
    idx = ds.split().train
    batches = list(ds.batches(idx, batch_size=5, seed=3, buffer_chunks=2))
    thetas = np.concatenate([t for t, _ in batches])
    assert [len(t) for t, _ in batches[:-1]] == [5] * (len(batches) - 1)
    all_theta = np.asarray(ds.theta[:])
    rows = [int(np.flatnonzero((all_theta == t).all(axis=1))[0]) for t in thetas]
    assert sorted(rows) == sorted(idx.tolist())  # each once
    erp0 = batches[0][1][0]
    np.testing.assert_array_equal(erp0, np.asarray(ds.erp[rows[0]]))  # theta and erp stay paired
    again = np.concatenate([t for t, _ in ds.batches(idx, batch_size=5, seed=3, buffer_chunks=2)])
    np.testing.assert_array_equal(thetas, again)
    other = np.concatenate([t for t, _ in ds.batches(idx, batch_size=5, seed=4, buffer_chunks=2)])
    assert not np.array_equal(thetas, other)


def test_existing_paths_are_never_overwritten_without_the_flag(reference, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a jr_jax dataset"):
        make_dataset(Prior(), PROTOCOL, N, other, key=KEY, chunk_size=CHUNK, progress=False)
    assert (other / "mine.txt").read_text() == "keep me"
    with pytest.raises(DatasetError, match=r"key.data: stored \[0, 5\], requested \[0, 6\]; protocol.n_trials: stored 60, requested 5"):
        make_dataset(Prior(), PROTOCOL.replace(n_trials=5), N, reference.path, key=jax.random.key(6),
                     chunk_size=CHUNK, progress=False)
    with pytest.raises(FileExistsError, match="not a jr_jax dataset"):  # not even with the flag
        make_dataset(Prior(), PROTOCOL, 8, other, key=KEY, chunk_size=CHUNK, overwrite=True, progress=False)
    assert (other / "mine.txt").read_text() == "keep me"


def test_resume_after_kill_9_gives_the_same_bytes(reference, tmp_path):
    path = tmp_path / "killed.zarr"
    code = f"""
import time, jax, jr_jax
pr = jr_jax.Protocol(burn_in=0.1, tmin=-0.05, tmax=0.15)
def slow(done, total):
    time.sleep(0.7)  # leave time to be killed between chunks
jr_jax.make_dataset(jr_jax.Prior(), pr, {N}, {str(path)!r}, key=jax.random.key(5), chunk_size={CHUNK}, progress=slow)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, JAX_PLATFORMS="cpu"))
    done = path / ".jr_jax" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and not (done.is_dir() and len(list(done.glob("*.json"))) >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(done.glob("*.json")))
    assert 2 <= n_done < 6, n_done
    assert not load_dataset(path).complete
    with pytest.raises(DatasetError, match="incomplete"):
        load_dataset(path).split()
    resumed = make_dataset(Prior(), PROTOCOL, N, path, key=KEY, chunk_size=CHUNK, progress=False)
    assert resumed.complete
    _same_bytes(resumed, reference)


def test_corrupt_chunk_is_named_and_recomputed(reference, tmp_path):
    import shutil

    path = tmp_path / "copy.zarr"
    shutil.copytree(reference.path, path)
    chunk_file = path / "erp" / "c" / "3" / "0"
    chunk_file.write_bytes(chunk_file.read_bytes()[: chunk_file.stat().st_size // 2])  # truncate
    with pytest.raises(DatasetError, match=r"chunk\(s\) \[3\]"):
        load_dataset(path, verify=True)
    with pytest.warns(UserWarning, match=r"chunk\(s\) \[3\]"):
        healed = make_dataset(Prior(), PROTOCOL, N, path, key=KEY, chunk_size=CHUNK, progress=False)
    _same_bytes(healed, reference)


def test_full_disk_gives_a_clear_error_and_keeps_finished_chunks(reference, tmp_path, monkeypatch):
    import errno

    from jr_jax import _data

    real = _data._write_chunk
    calls = []

    def failing(path, c, blocks, config):
        calls.append(c)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, c, blocks, config)

    monkeypatch.setattr(_data, "_write_chunk", failing)
    path = tmp_path / "full.zarr"
    with pytest.raises(OSError, match="no space left on the device while writing chunk 2.*2 finished chunks are kept"):
        make_dataset(Prior(), PROTOCOL, N, path, key=KEY, chunk_size=CHUNK, progress=False)
    assert load_dataset(path).missing_chunks == [2, 3, 4, 5]
    monkeypatch.setattr(_data, "_write_chunk", real)
    _same_bytes(make_dataset(Prior(), PROTOCOL, N, path, key=KEY, chunk_size=CHUNK, progress=False), reference)


def test_four_host_devices_give_the_same_data(reference, tmp_path):
    path = tmp_path / "four.zarr"
    code = f"""
import jax, jr_jax
assert len(jax.devices()) == 4
pr = jr_jax.Protocol(burn_in=0.1, tmin=-0.05, tmax=0.15)
jr_jax.make_dataset(jr_jax.Prior(), pr, {N}, {str(path)!r}, key=jax.random.key(5), chunk_size={CHUNK}, progress=False)
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    four = load_dataset(path)
    np.testing.assert_array_equal(np.asarray(four.theta[:]), np.asarray(reference.theta[:]))
    # sharding changes the shape of each device's program, hence float32 rounding of the ERPs
    ref = np.asarray(reference.erp[:])
    np.testing.assert_allclose(np.asarray(four.erp[:]), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_dask_local_cluster_gives_the_same_bytes_and_survives_a_dying_worker(reference, tmp_path):
    from dask.distributed import Client, LocalCluster

    same = make_dataset(Prior(), PROTOCOL, N, tmp_path / "dask.zarr", key=KEY, chunk_size=CHUNK, scheduler="local",
                        progress=False)
    _same_bytes(same, reference)

    # A worker killed mid-run: the scheduler gives its chunks to the other worker.
    path = tmp_path / "dying.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        errors = []

        def run():
            try:
                make_dataset(Prior(), PROTOCOL, N, path, key=KEY, chunk_size=CHUNK, client=client, progress=False)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        done = path / ".jr_jax" / "done"
        deadline = time.time() + 120
        while time.time() < deadline and not (done.is_dir() and any(done.glob("*.json"))):
            time.sleep(0.02)
        os.kill(pids[0], signal.SIGKILL)
        thread.join(timeout=300)
        assert not errors, errors
    _same_bytes(load_dataset(path), reference)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(protocol=PROTOCOL.replace(snr_db=10.0)), ValueError, "snr_db=None"),
        (dict(prior="uniform"), TypeError, "prior must be a jr_jax.Prior"),
        (dict(n=0), ValueError, "n must be an integer >= 1"),
        (dict(chunk_size=0), ValueError, "chunk_size must be"),
        (dict(scheduler="local", client=object()), ValueError, "either scheduler or client"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    args = dict(prior=Prior(), protocol=PROTOCOL, n=4, path=tmp_path / "x.zarr", key=KEY, chunk_size=CHUNK,
                progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        make_dataset(**args)
    assert not Path(args["path"]).exists()


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="not a jr_jax dataset"):
        load_dataset(tmp_path)
