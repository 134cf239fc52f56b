"""Simulation datasets on disk (zarr): written chunk by chunk, resumable, loaded lazily.

Layout of a dataset folder (a zarr v3 group):

- ``theta`` ``(n, n_params)`` float32: the prior draws, in the order of ``attrs["prior"]["names"]``;
- ``erp`` ``(n, n_times[, n_channels])`` float32: clean ERPs in mV (no measurement noise);
- ``valid`` ``(n,)`` bool: False where the trajectory diverged (its ERP row is NaN);
- ``attrs["jr_jax"]``: the configuration (prior, protocol, key, n, chunk size, split seed) and the
  versions that wrote it;
- ``.jr_jax/done/<chunk>.json``: one file per finished chunk with SHA-256 digests of its three
  blocks, written atomically after the blocks. A chunk without it is (re)computed on resume.

Sample i depends only on the key and i, so a resumed, sharded or distributed run gives the same
bytes as one uninterrupted run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from ._params import Prior
from ._simulate import Protocol, simulate
from ._solve import as_typed_key

FORMAT_VERSION = 1
_DONE = Path(".jr_jax") / "done"


class DatasetError(RuntimeError):
    """A dataset on disk is inconsistent (corrupt chunk, mismatched resume, not a jr_jax dataset)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset path does not exist (both a :class:`DatasetError` and a ``FileNotFoundError``)."""


# what _create and _write_chunk put in a dataset folder, and nothing else
_DATASET_ENTRIES = frozenset({"zarr.json", ".jr_jax", "theta", "erp", "valid"})


def _versions() -> dict:
    import diffrax

    from . import __version__

    return dict(jr_jax=__version__, jax=jax.__version__, diffrax=diffrax.__version__, numpy=np.__version__)


def _key_to_json(key) -> dict:
    key = as_typed_key(key)
    if key.shape != ():
        raise ValueError(f"key must be a single key, got shape {key.shape}")
    return dict(impl=str(jax.random.key_impl(key)), data=np.asarray(jax.random.key_data(key)).tolist())


def _key_from_json(d: dict):
    return jax.random.wrap_key_data(np.asarray(d["data"], dtype=np.uint32), impl=d["impl"])


def _config(prior: Prior, protocol: Protocol, n: int, key, chunk_size: int, split_seed: int) -> dict:
    return dict(
        format=FORMAT_VERSION,
        prior=prior.to_dict(),
        protocol=protocol.to_dict(),
        key=_key_to_json(key),
        n=int(n),
        chunk_size=int(chunk_size),
        split_seed=int(split_seed),
    )


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: stored {a!r}, requested {b!r}")
    return out


def _digest(block: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(block).tobytes()).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _chunk_bounds(c: int, n: int, chunk_size: int) -> tuple[int, int]:
    return c * chunk_size, min((c + 1) * chunk_size, n)


def _start_chunk(config: dict, c: int, prior: Prior, protocol: Protocol):
    """Dispatch chunk ``c`` (JAX runs it asynchronously): its parameters and its ERPs.

    A pure function of the configuration and c: sample i uses draw i of the prior and
    ``fold_in(key_sim, i)``, whatever the chunk, process or machine that computes it.
    """
    size = config["chunk_size"]
    lo, hi = _chunk_bounds(c, config["n"], size)
    key = _key_from_json(config["key"])
    # A short last chunk is simulated at full size (the extra samples are dropped), so that one
    # compilation serves every chunk.
    params = prior.sample(jax.random.fold_in(key, 0), size, first_index=lo)
    erp = simulate(params, protocol, key=jax.random.fold_in(key, 1), chunk_size=size, first_index=lo)
    return params[: hi - lo], erp[: hi - lo]


def _blocks(prior: Prior, params, erp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """theta, erp and valid as the arrays that are stored (waits for the computation)."""
    theta = np.asarray(prior.to_array(params), dtype=np.float32)
    erp = np.asarray(erp, dtype=np.float32)
    valid = np.isfinite(erp).reshape(len(erp), -1).all(axis=1)
    return theta, erp, valid


def _write_chunk(path: Path, c: int, blocks: tuple[np.ndarray, ...], config: dict) -> None:
    """Write chunk ``c``'s blocks, then its done-marker (atomically). Raises on a full disk."""
    import zarr

    lo, hi = _chunk_bounds(c, config["n"], config["chunk_size"])
    theta, erp, valid = blocks
    group = zarr.open_group(str(path), mode="r+")
    group["theta"][lo:hi] = theta
    group["erp"][lo:hi] = erp
    group["valid"][lo:hi] = valid
    marker = dict(chunk=c, start=lo, stop=hi, n_valid=int(valid.sum()),
                  sha256=dict(theta=_digest(theta), erp=_digest(erp), valid=_digest(valid)))
    (path / _DONE).mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path / _DONE / f"{c}.json", json.dumps(marker))


def _simulate_and_write(path: str, c: int, config: dict) -> int:
    """One chunk from the configuration alone (what a Dask task runs). Returns its valid count."""
    prior, protocol = Prior.from_dict(config["prior"]), Protocol.from_dict(config["protocol"])
    blocks = _blocks(prior, *_start_chunk(config, c, prior, protocol))
    _write_chunk(Path(path), c, blocks, config)
    return int(blocks[2].sum())


def _done_chunks(path: Path) -> set[int]:
    folder = path / _DONE
    if not folder.is_dir():
        return set()
    return {int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()}


def _create(path: Path, config: dict, prior: Prior, protocol: Protocol) -> None:
    import zarr

    n, size = config["n"], config["chunk_size"]
    (path / _DONE).mkdir(parents=True, exist_ok=True)  # before the attributes mark it a dataset
    group = zarr.open_group(str(path), mode="w-")  # "w" would empty the folder; "w-" refuses foreign data
    group.create_array("theta", shape=(n, len(prior.names)), chunks=(size, len(prior.names)), dtype="float32",
                       fill_value=np.nan)
    group.create_array("erp", shape=(n, *protocol.output_shape), chunks=(size, *protocol.output_shape),
                       dtype="float32", fill_value=np.nan)
    group.create_array("valid", shape=(n,), chunks=(size,), dtype="bool", fill_value=False)
    group.attrs["jr_jax"] = dict(config=config, versions=_versions(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _read_json(path: Path, what: str, remedy: str):
    """``path`` parsed as JSON; a DatasetError naming the file if it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is corrupt ({what} is not valid JSON: {e}); {remedy}") from None


def _stored_config(path: Path) -> dict | None:
    """The configuration stored in the dataset at ``path``, or None if it is not a jr_jax dataset
    (no zarr group whose attributes hold jr_jax's configuration). Raises a DatasetError naming
    ``zarr.json`` when that file is not valid JSON."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    doc = _read_json(meta, "the zarr group's metadata", "if the folder is a jr_jax dataset, make it again "
                     "(make_dataset with overwrite=True, or jr-jax simulate --force)")
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    ours = attrs.get("jr_jax") if isinstance(attrs, dict) else None
    config = ours.get("config") if isinstance(ours, dict) else None
    return config if isinstance(config, dict) else None


def _is_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder that jr_jax wrote as a dataset, and so may be deleted to overwrite it.

    True for a zarr group carrying jr_jax's configuration attribute, and for the remains of a
    creation interrupted before that attribute was written (a folder holding jr_jax's ``.jr_jax``
    marker folder and nothing but a dataset's own entries). Anything else is the user's.
    """
    if not path.is_dir():
        return False
    try:
        if _stored_config(path) is not None:
            return True
    except DatasetError:  # a corrupt zarr.json: judged by the folder's entries below
        pass
    entries = {p.name for p in path.iterdir()}
    return (path / ".jr_jax").is_dir() and entries <= _DATASET_ENTRIES


def _not_a_dataset(path: Path) -> str:
    what = "a file" if path.is_file() else "a folder" if path.is_dir() else "something"
    return (f"{path} exists and is not a jr_jax dataset ({what} without jr_jax's dataset marker, a zarr.json "
            "with jr_jax's configuration), so it will not be deleted or overwritten; choose another path "
            "(a new or an empty folder), or move it away yourself")


def make_dataset(
    prior: Prior,
    protocol: Protocol,
    n: int,
    path: str | os.PathLike,
    *,
    key,
    chunk_size: int = 1024,
    split_seed: int = 0,
    overwrite: bool = False,
    scheduler: str | None = None,
    client=None,
    progress: bool | Callable[[int, int], None] = True,
) -> "Dataset":
    """Simulate ``n`` clean ERPs with parameters drawn from ``prior`` into a zarr store at ``path``.

    - Chunks of ``chunk_size`` samples are computed and written one by one (memory is bounded by
      the chunk size, not by ``n``); each finished chunk gets a done-marker, written atomically.
    - **Resume**: calling again with the same arguments finishes an interrupted dataset (even one
      killed with ``kill -9``); the result equals an uninterrupted run bit for bit. Different
      arguments are refused with the list of what differs. ``overwrite=True`` deletes ``path`` first
      if it is a jr_jax dataset; any other existing path (a folder that is not a dataset, a file)
      is refused whatever ``overwrite`` says (nothing of the user's is deleted). An empty folder
      is used.
    - The protocol must have ``snr_db=None``: measurement noise is added at training time.
    - ``scheduler``: ``None`` (this process, chunks sharded over ``jax.local_devices()``),
      ``"local"`` (a Dask ``LocalCluster`` of 2 worker processes) or a Dask scheduler address;
      ``client``: an existing ``dask.distributed.Client``. Workers must see ``path`` (shared storage).
    - ``progress``: a tqdm bar (True), none (False), or a callable ``(chunks_done, chunks_total)``.

    Returns the :class:`Dataset`.
    """
    if not isinstance(prior, Prior):
        raise TypeError(f"prior must be a jr_jax.Prior, got {type(prior).__name__}")
    if not isinstance(protocol, Protocol):
        raise TypeError(f"protocol must be a jr_jax.Protocol, got {type(protocol).__name__}")
    if protocol.snr_db is not None:
        raise ValueError("make_dataset stores clean ERPs: pass a protocol with snr_db=None "
                         "(measurement noise is drawn fresh at training time)")
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not (isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if scheduler is not None and client is not None:
        raise ValueError("pass either scheduler or client, not both")
    path = Path(path)
    config = _config(prior, protocol, n, key, chunk_size, split_seed)

    # Only a jr_jax dataset is ever deleted (overwrite=True) or resumed; an empty folder is used as
    # it is; anything else at path (a user's folder or file) is refused, whatever overwrite says.
    empty_dir = path.is_dir() and not any(path.iterdir())
    if (path.exists() or path.is_symlink()) and not empty_dir and not _is_dataset(path):
        raise FileExistsError(_not_a_dataset(path))
    if path.exists() and not empty_dir and overwrite:
        if path.is_symlink():
            raise FileExistsError(f"{path} is a symbolic link to a jr_jax dataset; it is not deleted through the "
                                  f"link: pass the dataset's own path ({path.resolve()}) to overwrite it")
        shutil.rmtree(path)  # a jr_jax dataset (checked just above)
    if path.exists() and not empty_dir:
        stored = _stored_config(path)
        if stored is None:
            raise DatasetError(f"{path} holds an unfinished jr_jax dataset whose creation was interrupted before "
                               "its configuration was written; pass overwrite=True (--force) to start it again")
        diff = _differences(stored, config)
        if diff:
            raise DatasetError(f"{path} holds a dataset made with other arguments; refusing to resume. "
                               "Differences: " + "; ".join(diff) + ". Use another path or overwrite=True "
                               "(--force) to replace it.")
    else:
        _create(path, config, prior, protocol)

    n_chunks = math.ceil(n / chunk_size)
    dataset = Dataset(path)
    done = _done_chunks(path)
    bad = dataset.verify(chunks=sorted(done))
    if bad:
        warnings.warn(f"{path}: chunk(s) {bad} do not match their digests (corrupt or truncated); recomputing them")
    for c in bad:
        (path / _DONE / f"{c}.json").unlink()
    todo = [c for c in range(n_chunks) if c not in done or c in bad]

    report = _progress_reporter(progress, n_chunks, n_chunks - len(todo), chunk_size, n,
                                n - sum(hi - lo for lo, hi in (_chunk_bounds(c, n, chunk_size) for c in todo)))
    t0 = time.perf_counter()
    try:
        if scheduler is None and client is None:
            _run_local(path, config, prior, protocol, todo, report)
        else:
            _run_dask(path, config, todo, report, scheduler, client)
    finally:
        report(None)
    dataset = Dataset(path)
    dataset.last_run = dict(
        chunks=len(todo),
        samples=sum(hi - lo for lo, hi in (_chunk_bounds(c, n, chunk_size) for c in todo)),
        seconds=time.perf_counter() - t0,
    )
    return dataset


def _progress_reporter(progress, n_chunks, already, chunk_size, n, samples_done):
    if callable(progress):
        state = dict(done=already)

        def report(c):
            if c is not None:
                state["done"] += 1
                progress(state["done"], n_chunks)

        return report
    if not progress:
        return lambda c: None
    from tqdm.auto import tqdm

    bar = tqdm(total=n, initial=samples_done, unit="ERP", unit_scale=True, desc="simulating",
               dynamic_ncols=True)

    def report(c):
        if c is None:
            bar.close()
        else:
            lo, hi = _chunk_bounds(c, n, chunk_size)
            bar.update(hi - lo)

    return report


def _write_or_explain(path: Path, c: int, blocks, config: dict, n_done: int) -> None:
    try:
        _write_chunk(path, c, blocks, config)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left on the device while writing chunk {c} of {path}; the "
                          f"{n_done} finished chunks are kept: free space and run the same call again to "
                          "resume") from e
        raise


def _run_local(path: Path, config, prior, protocol, todo, report) -> None:
    # A writer thread stores chunk c while this thread simulates chunk c+1 (JAX on the CPU runs a
    # computation in the calling thread; compression, digests and file writes release the GIL).
    # At most one chunk waits to be written, so memory stays at about two chunks.
    from concurrent.futures import ThreadPoolExecutor

    n_done = len(_done_chunks(path))
    pending = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jr-jax-writer") as writer:
        for c in todo:
            params, erp = _start_chunk(config, c, prior, protocol)
            blocks = _blocks(prior, params, erp)
            if pending is not None:
                pending.result()
                n_done += 1
            pending = writer.submit(_write_and_report, path, c, blocks, config, n_done, report)
        if pending is not None:
            pending.result()


def _write_and_report(path, c, blocks, config, n_done, report) -> None:
    _write_or_explain(path, c, blocks, config, n_done)
    report(c)


def _run_dask(path: Path, config, todo, report, scheduler, client) -> None:
    from dask.distributed import Client, LocalCluster, as_completed

    own = []
    if client is None:
        if scheduler == "local":
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
            own.append(cluster)
            client = Client(cluster)
        else:
            client = Client(scheduler)
        own.insert(0, client)
    try:
        futures = {client.submit(_simulate_and_write, str(path), c, config, pure=False): c for c in todo}
        for future in as_completed(futures):
            future.result()
            report(futures[future])
    finally:
        for thing in own:
            thing.close()


@dataclass
class Split:
    """Sample indices (sorted) of the train, validation and test sets; invalid samples excluded."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    n_invalid: int


class Dataset:
    """A dataset written by :func:`make_dataset`, opened lazily (nothing is read until asked).

    ``theta``, ``erp`` and ``valid`` are zarr arrays; index them to read (``ds.erp[:100]``).
    """

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise DatasetNotFoundError(f"{self.path} does not exist (no file or folder there, so no jr_jax dataset)")
        config = _stored_config(self.path)
        if config is None:
            raise DatasetError(f"{self.path} is not a jr_jax dataset (no zarr group with jr_jax attributes)")
        self.config = config
        group = zarr.open_group(str(self.path), mode="r")
        self.theta, self.erp, self.valid = group["theta"], group["erp"], group["valid"]
        self.prior = Prior.from_dict(config["prior"])
        self.protocol = Protocol.from_dict(config["protocol"])
        self.versions = group.attrs["jr_jax"].get("versions", {})
        #: set by make_dataset: chunks and samples computed by that call, and its wall time (s)
        self.last_run: dict | None = None

    # --- what it holds -----------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.config["n"]

    @property
    def chunk_size(self) -> int:
        return self.config["chunk_size"]

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n / self.chunk_size)

    @property
    def names(self) -> tuple[str, ...]:
        return self.prior.names

    @property
    def units(self) -> tuple[str, ...]:
        return self.prior.units

    @property
    def times(self) -> np.ndarray:
        return self.protocol.times

    @property
    def missing_chunks(self) -> list[int]:
        done = _done_chunks(self.path)
        return [c for c in range(self.n_chunks) if c not in done]

    @property
    def complete(self) -> bool:
        return not self.missing_chunks

    def n_valid(self) -> int:
        """Valid samples among the finished chunks (read from the done-markers)."""
        total = 0
        for c in _done_chunks(self.path):
            marker = _read_json(self.path / _DONE / f"{c}.json", f"the done-marker of chunk {c}",
                                "run make_dataset with the same arguments to recompute that chunk")
            if not (isinstance(marker, dict) and isinstance(marker.get("n_valid"), int)):
                raise DatasetError(f"{self.path / _DONE / f'{c}.json'} is corrupt (the done-marker of chunk {c} "
                                   "has no n_valid); run make_dataset with the same arguments to recompute it")
            total += marker["n_valid"]
        return total

    def verify(self, chunks: list[int] | None = None) -> list[int]:
        """Chunks (of the finished ones, or of ``chunks``) whose bytes do not match their digests.

        A chunk file that is truncated or corrupt fails to decode or to match; it is named here, and
        so is a chunk whose done-marker is unreadable (make_dataset recomputes both).
        """
        bad = []
        for c in sorted(_done_chunks(self.path)) if chunks is None else chunks:
            try:
                marker = json.loads((self.path / _DONE / f"{c}.json").read_text())
                lo, hi = marker["start"], marker["stop"]
            except (OSError, ValueError, KeyError, TypeError):  # a corrupt marker: the chunk is unverified
                bad.append(c)
                continue
            try:
                blocks = dict(theta=self.theta[lo:hi], erp=self.erp[lo:hi], valid=self.valid[lo:hi])
                ok = all(_digest(np.asarray(blocks[k])) == marker["sha256"][k] for k in blocks)
            except Exception:
                ok = False
            if not ok:
                bad.append(c)
        return bad

    def require_complete(self) -> None:
        missing = self.missing_chunks
        if missing:
            raise DatasetError(f"{self.path} is incomplete: {len(missing)} of {self.n_chunks} chunks missing "
                               f"(first: {missing[:5]}); run make_dataset with the same arguments to finish it")

    def summary(self) -> str:
        """A short human-readable description."""
        p = self.protocol
        lines = [
            f"jr_jax dataset {self.path}",
            f"  samples: {self.n} in {self.n_chunks} chunks of {self.chunk_size}; "
            + ("complete" if self.complete else f"{len(self.missing_chunks)} chunks missing")
            + f"; valid: {self.n_valid()}",
            f"  erp: {self.erp.shape} float32 (mV), {p.n_times} samples at {p.fs:g} Hz from {p.tmin:g} to {p.tmax:g} s",
            f"  protocol: {p.n_trials} trials, burn-in {p.burn_in:g} s, solver {p.solver} dt {p.dt:g} s, "
            f"stimulus {p.stimulus.amplitude:g}/s for {p.stimulus.duration:g} s gains {tuple(p.stimulus.gains)}",
            f"  prior ({self.prior.kind}):",
        ]
        for name, unit, lo, hi in zip(self.names, self.units, self.prior.lows, self.prior.highs):
            lines.append(f"    {name:6s} [{unit}] {lo:g} .. {hi:g}")
        sigma = self.config["prior"]["base"]["sigma"]
        lines.append(f"  sigma: {sigma:g}; split seed: {self.config['split_seed']}; written by {self.versions}")
        return "\n".join(lines)

    # --- splits and batches ------------------------------------------------------------------
    def split(self, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int | None = None) -> Split:
        """Deterministic train/validation/test split of the valid samples.

        ``seed`` defaults to the split seed stored with the dataset, so every reader gets the same split.
        """
        if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
            raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
        self.require_complete()
        valid = np.asarray(self.valid[:])
        index = np.flatnonzero(valid)
        rng = np.random.default_rng(self.config["split_seed"] if seed is None else seed)
        index = index[rng.permutation(len(index))]
        n_train = int(round(fractions[0] * len(index)))  # cumulative boundaries: parts sum to the total
        n_train_val = int(round((fractions[0] + fractions[1]) * len(index)))
        parts = index[:n_train], index[n_train:n_train_val], index[n_train_val:]
        return Split(*(np.sort(p) for p in parts), n_invalid=int((~valid).sum()))

    def batches(
        self,
        indices: np.ndarray,
        batch_size: int = 32,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        buffer_chunks: int = 4,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches ``(theta (b, n_params), erp (b, n_times[, n_channels]))`` of the given samples.

        Streams from disk: chunks are visited in a random order and ``buffer_chunks`` of them are
        held and shuffled at a time, so memory stays near ``buffer_chunks * chunk_size`` samples
        whatever the dataset size. With the same ``seed`` the order is the same.
        """
        if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not (isinstance(buffer_chunks, (int, np.integer)) and buffer_chunks >= 1):
            raise ValueError(f"buffer_chunks must be an integer >= 1, got {buffer_chunks!r}")
        indices = np.sort(np.asarray(indices, dtype=np.int64))
        if len(indices) and (indices[0] < 0 or indices[-1] >= self.n):
            raise ValueError(f"indices must lie in [0, {self.n})")
        rng = np.random.default_rng(seed)
        by_chunk = np.split(indices, np.searchsorted(indices, np.arange(1, self.n_chunks) * self.chunk_size))
        order = [c for c in (rng.permutation(self.n_chunks) if shuffle else range(self.n_chunks)) if len(by_chunk[c])]
        carry_theta, carry_erp = None, None
        for start in range(0, len(order), buffer_chunks):
            thetas, erps = [], []
            for c in order[start:start + buffer_chunks]:
                lo, hi = _chunk_bounds(c, self.n, self.chunk_size)
                rows = by_chunk[c] - lo
                thetas.append(np.asarray(self.theta[lo:hi])[rows])
                erps.append(np.asarray(self.erp[lo:hi])[rows])
            theta, erp = np.concatenate(thetas), np.concatenate(erps)
            if carry_theta is not None:
                theta, erp = np.concatenate([carry_theta, theta]), np.concatenate([carry_erp, erp])
            if shuffle:
                perm = rng.permutation(len(theta))
                theta, erp = theta[perm], erp[perm]
            n_full = len(theta) // batch_size * batch_size
            for b in range(0, n_full, batch_size):
                yield theta[b:b + batch_size], erp[b:b + batch_size]
            carry_theta, carry_erp = theta[n_full:], erp[n_full:]
        if carry_theta is not None and len(carry_theta) and not drop_last:
            yield carry_theta, carry_erp


def load_dataset(path: str | os.PathLike, *, verify: bool = False) -> Dataset:
    """Open a dataset lazily. ``verify=True`` checks every chunk against its digest and raises a
    :class:`DatasetError` naming the corrupt ones."""
    ds = Dataset(path)
    if verify:
        bad = ds.verify()
        if bad:
            lo = [_chunk_bounds(c, ds.n, ds.chunk_size) for c in bad]
            raise DatasetError(f"{ds.path}: chunk(s) {bad} (samples {lo}) are corrupt or truncated; "
                               "run make_dataset with the same arguments to recompute them")
    return ds
