"""The parallel single-process data path (platform/local_loader.py) on a small synthetic dataset:
the same batches whatever the number of workers, and ``data_wait`` reported by every epoch."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from flare.datasets.ingest import BatchBuilder, Manifest, iter_local_rows, load_manifest
from flare.datasets.prepare import PrepareOptions, prepare
from flare.platform.config import load_job
from flare.platform.local_loader import LocalLoader, ShardBatches
from flare.platform.train_loop import train_local

ROOT = Path(__file__).resolve().parents[1]
SIZE, BATCH, SEED = 64, 8, 3


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """24 synthetic faces (train and val splits), prepared without Ray."""
    out = tmp_path_factory.mktemp("loader") / "synthetic"
    prepare("synthetic", Path("."), out, PrepareOptions(val_fraction=0.25, seed=0), engine="local",
            synthetic_count=24)
    return load_manifest(out)


def _epochs(manifest: Manifest, workers: int, epochs: list[int]) -> list[list[dict[str, torch.Tensor]]]:
    builder = BatchBuilder(manifest.layout, SIZE, augment=True, seed=SEED)
    with LocalLoader(manifest, "train", BATCH, builder, workers=workers, shuffle_base=SEED * 100003) as loader:
        return [list(loader.epoch(e)) for e in epochs]


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b, strict=True))


def test_batches_do_not_depend_on_the_number_of_workers(synth: Manifest) -> None:
    in_process = _epochs(synth, 0, [0, 1])
    two = _epochs(synth, 2, [0, 1])  # persistent workers serve both epochs
    assert _same(in_process[0], two[0]) and _same(in_process[1], two[1])
    assert not _same(two[0], two[1])  # a new epoch: new order and new augmentation
    # and they are exactly the batches of the in-process path (rows shuffled as iter_local_rows does)
    builder = BatchBuilder(synth.layout, SIZE, augment=True, seed=SEED)
    for epoch in (0, 1):
        rows = iter_local_rows(synth, "train", BATCH, shuffle_seed=SEED * 100003 + epoch)
        assert _same([builder(r, epoch) for r in rows], two[epoch])
    assert sum(len(b["image"]) for b in two[0]) == synth.count("train") or synth.count("train") == 0


def test_one_stream_across_epochs_and_a_restart_when_an_epoch_is_left(synth: Manifest) -> None:
    builder = BatchBuilder(synth.layout, SIZE, augment=True, seed=SEED)
    expected = _epochs(synth, 0, [0, 1, 2, 3])
    with LocalLoader(synth, "train", BATCH, builder, workers=2, shuffle_base=SEED * 100003) as loader:
        assert _same(list(loader.epoch(0)), expected[0]) and _same(list(loader.epoch(1)), expected[1])
        assert loader.restarts == 1  # epoch 1's batches came from the stream epoch 0 started (prefetched)
        left = loader.epoch(2)
        next(left)  # epoch 2 left after one batch: epoch 3 must still be epoch 3's batches
        assert _same(list(loader.epoch(3)), expected[3]) and loader.restarts == 2
        with pytest.raises(RuntimeError, match="abandoned"):
            next(left)


def test_closed_loader_refuses_new_epochs(synth: Manifest) -> None:
    loader = LocalLoader(synth, "train", BATCH, BatchBuilder(synth.layout, SIZE, augment=False), workers=1)
    running = loader.epoch(0)
    assert len(next(running)["image"]) == BATCH
    loader.close()
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        loader.epoch(1)
    with pytest.raises(RuntimeError, match="closed"):  # an epoch being read when the loader closed
        next(running)


def test_local_training_with_workers_reports_data_wait(synth: Manifest, tmp_path: Path) -> None:
    job = load_job(ROOT / "jobs" / "tiny.yaml", [f"data.manifest={synth.path}", "data.loader_workers=2",
                                                 "data.max_train_samples=8", "data.max_val_samples=4",
                                                 "optimizer.epochs=2", "optimizer.batch_size=4"])
    session = train_local(job, tmp_path / "run", device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert 0.0 <= r["data_wait"] <= 1.0 and r["images_per_s"] > 0
        assert 0.0 <= r["first_batch_s"] <= r["data_wait"] * r["epoch_time_s"] + 1e-6
    # epoch 0 waits for the workers to start; epoch 1's batches were built while epoch 0 trained
    assert rows[0]["first_batch_s"] > rows[1]["first_batch_s"]
    assert session.loader is not None and session.loader.loader is None  # workers stopped at the end


def _other_file_system(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's tmp dir")
    return Path(tempfile.mkdtemp(prefix="flare-test-scratch-", dir=shm))


def test_checkpoints_cross_file_systems(synth: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tmpfs /tmp (or TMPDIR) on another file system than the run dir: the epoch checkpoint written in
    scratch space used to fail its rename (EXDEV) after the first epoch."""
    scratch = _other_file_system(tmp_path)
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        job = load_job(ROOT / "jobs" / "tiny.yaml", [f"data.manifest={synth.path}", "data.max_train_samples=8",
                                                     "data.max_val_samples=4", "optimizer.epochs=2",
                                                     "optimizer.batch_size=4"])
        train_local(job, tmp_path / "run", device="cpu")
        kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
        assert kept and all((tmp_path / "run" / "checkpoints" / k / "state.pt").is_file() for k in kept)
        assert list(scratch.iterdir()) == []  # the scratch copies are gone
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _sample_ids(manifest: Manifest, epoch: int, drop_last: bool) -> set[str]:
    """The faces one epoch trains on."""
    batches = ShardBatches(manifest, "train", BATCH, BatchBuilder(manifest.layout, SIZE, augment=False),
                           shuffle_base=SEED * 100003, drop_last=drop_last)
    return {r["sample_id"] for i in range(len(batches)) for r in batches.rows((epoch, i))}


def test_drop_last_trains_full_batches_only(synth: Manifest) -> None:
    """``data.drop_last``: every batch is full and the same whoever builds it (this process or worker
    processes); they are the epoch's batches without its remainder, and which faces are left out changes with
    the epoch."""
    n = synth.count("train")
    assert n % BATCH, "the fixture needs a remainder to drop"
    builder = BatchBuilder(synth.layout, SIZE, augment=True, seed=SEED)
    with (LocalLoader(synth, "train", BATCH, builder, workers=0, shuffle_base=SEED * 100003, drop_last=True) as l0,
          LocalLoader(synth, "train", BATCH, builder, workers=2, shuffle_base=SEED * 100003, drop_last=True) as l2):
        assert len(l0) == len(l2) == n // BATCH
        dropped = {e: [list(l0.epoch(e)), list(l2.epoch(e))] for e in (0, 1)}
    kept = _epochs(synth, 0, [0, 1])
    for epoch, (in_process, workers) in dropped.items():
        assert len(in_process) == n // BATCH and all(len(b["image"]) == BATCH for b in in_process)
        assert _same(in_process, workers) and _same(in_process, kept[epoch][: n // BATCH])
    left_out = {e: _sample_ids(synth, e, False) - _sample_ids(synth, e, True) for e in (0, 1)}
    assert len(left_out[0]) == len(left_out[1]) == n % BATCH and left_out[0] != left_out[1]


def test_drop_last_refuses_a_split_smaller_than_one_batch(synth: Manifest) -> None:
    from flare.platform.config import ConfigError
    from flare.platform.ray_train import check_job

    builder = BatchBuilder(synth.layout, SIZE, augment=False)
    with pytest.raises(ValueError, match=r"data.drop_last: split 'train' .* fewer than one batch"):
        LocalLoader(synth, "train", synth.count("train") + 1, builder, drop_last=True)
    base = [f"data.manifest={synth.path}", "data.drop_last=true", "optimizer.batch_size=8"]
    with pytest.raises(ConfigError, match=r"data.drop_last: the 'train' split .* has 5 faces, fewer than one batch"):
        check_job(load_job(ROOT / "jobs" / "tiny.yaml", [*base, "data.max_train_samples=5"]))
    check_job(load_job(ROOT / "jobs" / "tiny.yaml", [*base, "data.max_train_samples=8"]))  # one full batch: fine



def test_flare_train_refuses_drop_last_on_a_split_smaller_than_a_batch(synth: Manifest, tmp_path: Path) -> None:
    """The command line: one line naming the key, exit code 2, and no run folder written."""
    from typer.testing import CliRunner

    from flare.platform.cli import app

    run_dir = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "tiny", "--no-ray", "--run-dir", str(run_dir),
                                   "--set", f"data.manifest={synth.path}", "--set", "data.drop_last=true",
                                   "--set", "data.max_train_samples=5", "--set", "optimizer.batch_size=8"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().startswith("error: data.drop_last:") and len(res.output.strip().splitlines()) == 1
    assert not run_dir.exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_local_training_drops_the_remainder_only_when_asked(synth: Manifest, tmp_path: Path, workers: int) -> None:
    trained = {}
    for drop in (False, True):
        job = load_job(ROOT / "jobs" / "tiny.yaml", [f"data.manifest={synth.path}", f"data.loader_workers={workers}",
                                                     "data.max_train_samples=10", "data.max_val_samples=4",
                                                     "optimizer.epochs=1", "optimizer.batch_size=4",
                                                     f"data.drop_last={str(drop).lower()}"])
        session = train_local(job, tmp_path / f"run_{drop}", device="cpu")
        trained[drop] = session.reports[0]["train_images"]
    assert trained == {False: 10, True: 8}


def test_starting_the_loader_leaves_the_global_random_state_alone(synth: Manifest) -> None:
    """The training loop starts the loader before it builds the model: the model's initial weights must not
    depend on it (a DataLoader draws its workers' base seed from torch's global generator unless given one)."""
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    with LocalLoader(synth, "train", BATCH, BatchBuilder(synth.layout, SIZE, augment=False), workers=1) as loader:
        next(loader.epoch(0))
        assert torch.equal(torch.rand(4), expected)


def test_loader_workers_start_while_the_model_is_built(synth: Manifest, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The first epoch's batches are asked for before the model is built, so the workers' start-up (a few
    seconds on a GPU host: processes, imports, the shards) overlaps the model build and device set-up."""
    import multiprocessing

    from flare.platform import train_loop

    real, alive = train_loop.build_model, []

    def build_model(*args: object, **kwargs: object) -> torch.nn.Module:
        alive.append(len(multiprocessing.active_children()))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_loop, "build_model", build_model)
    job = load_job(ROOT / "jobs" / "tiny.yaml", [f"data.manifest={synth.path}", "data.loader_workers=2",
                                                 "data.max_train_samples=8", "data.max_val_samples=4",
                                                 "optimizer.epochs=1", "optimizer.batch_size=4"])
    train_local(job, tmp_path / "run", device="cpu")
    assert alive == [2]


def test_training_batches_carry_only_what_a_step_reads(synth: Manifest) -> None:
    """``keys=TRAIN_KEYS``: the same tensors as the full compact batch, without validation's ``to_original`` and
    ``landmarks_original`` (fewer tensors handed between processes and copied to the device every step)."""
    from flare.datasets.ingest import TRAIN_KEYS

    rows = next(iter_local_rows(synth, "train", BATCH))
    full = BatchBuilder(synth.layout, SIZE, augment=True, seed=SEED, compact=True)(rows, 1)
    train = BatchBuilder(synth.layout, SIZE, augment=True, seed=SEED, compact=True, keys=TRAIN_KEYS)(rows, 1)
    assert set(train) == set(TRAIN_KEYS) and {"to_original", "landmarks_original"} <= set(full) - set(train)
    assert all(torch.equal(train[k], full[k]) for k in train)
