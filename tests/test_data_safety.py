"""Data safety: ``--overwrite`` deletes only what flare wrote, readers and the shard writer refuse
out-of-range numbers, images are checked from their header (pixel cap, regular files only) and a data
task that crashes under Ray fails after a bounded number of retries.

Everything runs on real files: synthetic 300W folders written to disk, real 300W samples from
FLARE_TEST_DATA, real PNGs, a real FIFO, a real crashing Ray worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import sys
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flare.datasets.prepare import TASK_RETRIES, PrepareError, PrepareOptions, write_dataset
from flare.datasets.readers import read_300w, read_adnet, read_cofw_csv, read_wflw
from flare.datasets.records import DataError, FaceRecord, FileImage, check_image_file
from flare.datasets.synthetic import generate_synthetic, write_synthetic_folder
from flare.files import MARKER, check_replaceable
from flare.models.layouts import get_layout
from flare.platform.cli import app


def run_cli(*args: object, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return res.exit_code, res.stdout, res.stderr


def tree(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``directory``."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture()
def synth_root(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write_synthetic_folder(root, 3, size=128, seed=5)
    return root


def prepare_cli(root: Path, out: Path, *extra: object) -> tuple[int, str, str]:
    return run_cli("data", "prepare", "--format", "300w", "--root", root, "--out", out, "--no-ray",
                   "--val-fraction", "0", *extra)


# ------------------------------------------------------------------------------------------------
# --overwrite
# ------------------------------------------------------------------------------------------------


def test_overwrite_keeps_a_folder_flare_did_not_write(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "a.txt").write_text("also mine")
    before = tree(out)
    code, _, err = prepare_cli(synth_root, out, "--overwrite")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{out} was not written by flare" in err
    assert tree(out) == before and hidden_leftovers(tmp_path) == []


def test_overwrite_never_touches_the_input_or_a_folder_above_it(synth_root: Path, tmp_path: Path) -> None:
    before = tree(tmp_path)
    n_images = len(list(synth_root.rglob("*.png")))
    assert n_images == 3
    (tmp_path / MARKER).write_text(json.dumps({"written_by": "flare data prepare"}))  # even a marked parent
    for out, word in ((tmp_path, "contains"), (synth_root, "is")):
        code, _, err = prepare_cli(synth_root, out, "--overwrite")
        assert code == 2 and f"{out} {word} the input {synth_root}" in err
    (tmp_path / MARKER).unlink()
    assert tree(tmp_path) == before and len(list(synth_root.rglob("*.png"))) == n_images


def test_overwrite_never_replaces_cwd_home_or_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work, home = tmp_path / "work" / "inner", tmp_path / "home"
    for d in (work, home):
        d.mkdir(parents=True)
        (d / MARKER).write_text(json.dumps({"written_by": "flare models pull"}))
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    for out, what in ((work, "is the working directory"), (work.parent, "contains the working directory"),
                      (home, "is the home directory"), (Path("/"), "/ is the file-system root")):
        with pytest.raises(ValueError, match=what):
            check_replaceable(out, (), overwrite=True)
    check_replaceable(tmp_path / "fresh", (), overwrite=False)  # absent: fine without --overwrite
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_replaceable(home, (), overwrite=False)


def test_overwrite_fills_an_empty_folder_and_marks_the_output(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = prepare_cli(synth_root, out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / MARKER).read_text()) == {"written_by": "flare data prepare"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"]["all"] + manifest["counts"]["test"]["all"] == 3
    assert hidden_leftovers(tmp_path) == []


def test_models_pull_overwrite_keeps_a_folder_flare_did_not_write(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "weights"
    out.mkdir()
    (out / "precious.bin").write_bytes(b"\x00" * 64)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    code, _, err = run_cli("models", "pull", "nothing/1", "--out", out, "--overwrite", env=env)
    assert code == 2 and f"{out} was not written by flare" in err
    assert (out / "precious.bin").read_bytes() == b"\x00" * 64
    monkeypatch.chdir(out)
    (out / "precious.bin").unlink()  # empty now, but it is the working directory
    code, _, err = run_cli("models", "pull", "nothing/1", "--out", out, "--overwrite", env=env)
    assert code == 2 and "is the working directory" in err and out.is_dir()


# ------------------------------------------------------------------------------------------------
# numbers in readers and in the shard writer
# ------------------------------------------------------------------------------------------------


def _adnet_root(test_data: Path, tmp_path: Path, scale: str, cx: str) -> Path:
    """An ADNet train.tsv over one real 300W face, with the given scale and centre x."""
    src = test_data / "300W" / "afw"
    pts_path = min(src.glob("*.pts"))
    root = tmp_path / "adnet"
    (root / "300W" / "afw").mkdir(parents=True)
    shutil.copy(pts_path.with_suffix(".jpg"), root / "300W" / "afw")
    lines = [s.strip() for s in pts_path.read_text().splitlines()]
    pts = [v for s in lines[lines.index("{") + 1 : lines.index("}")] for v in s.split()]
    row = ["afw/" + pts_path.with_suffix(".jpg").name, ",".join(pts[:10]), ",".join(pts), scale, cx, "150"]
    (root / "train.tsv").write_text("\t".join(row) + "\n")
    return root


@pytest.mark.parametrize(("scale", "cx", "reason"), [
    ("1e-300", "150", "scale 1e-300 gives a 2e-298 px face box"),
    ("1.2", "1e300", "center 0 at (1e+300"),
    ("1.2", "nan", "center 'nan' is not finite"),
])
def test_adnet_out_of_range_numbers_fail_with_file_and_line(test_data: Path, tmp_path: Path, scale: str, cx: str,
                                                            reason: str) -> None:
    root = _adnet_root(test_data, tmp_path, scale, cx)
    with pytest.raises(DataError, match="train.tsv:1: ") as err:
        read_adnet(root)
    assert reason in str(err.value)
    out = tmp_path / "ds"
    code, _, msg = run_cli("data", "prepare", "--format", "adnet", "--root", root, "--out", out, "--no-ray")
    assert code == 2 and len(msg.strip().splitlines()) == 1 and f"{root / 'train.tsv'}:1: " in msg
    assert not out.exists() and hidden_leftovers(tmp_path) == []


def test_wflw_and_cofw_csv_boxes_are_range_checked(tmp_path: Path) -> None:
    (tmp_path / "WFLW_images").mkdir()
    cv2.imwrite(str(tmp_path / "WFLW_images" / "a.jpg"), np.zeros((100, 100, 3), np.uint8))
    ann = tmp_path / "WFLW_annotations" / "list_98pt_rect_attr_train_test"
    ann.mkdir(parents=True)
    pts = " ".join(["50"] * 196)
    (ann / "list_98pt_rect_attr_train.txt").write_text(f"{pts} 10 10 1e300 90 0 0 0 0 0 0 a.jpg\n")
    with pytest.raises(DataError, match=r"list_98pt_rect_attr_train.txt:1: box corner 1 at \(1e\+300"):
        read_wflw(tmp_path)
    cv2.imwrite(str(tmp_path / "face.png"), np.zeros((100, 100, 3), np.uint8))
    head = ["image", *(f"x{k}" for k in range(29)), *(f"y{k}" for k in range(29)), "x_min", "y_min", "x_max", "y_max"]
    row = ["face.png", *(["50"] * 58), "90", "10", "10", "90"]  # x_max < x_min
    (tmp_path / "cofw_samples.csv").write_text(",".join(head) + "\n" + ",".join(row) + "\n")
    with pytest.raises(DataError, match="cofw_samples.csv:2: box .* negative width"):
        read_cofw_csv(tmp_path)


def _record(i: int, **changes: object) -> FaceRecord:
    rec = generate_synthetic(1, layout_points=68, size=128, seed=9, split="train", start=i)[0]
    for key, value in changes.items():
        setattr(rec, key, np.asarray(value, np.float64) if key != "scale" else value)
    return rec


def test_shard_writer_refuses_non_finite_rows_whatever_the_reader(tmp_path: Path) -> None:
    good = _record(0)
    huge_box = _record(1, box=[0.0, 0.0, 1e300, 90.0])  # finite in float64, inf once stored as float32
    far_centre = _record(2, center=[1e300, 50.0], scale=1.0)
    tiny_scale = _record(3, center=[64.0, 64.0], scale=1e-300)
    layout, opts = get_layout(68), PrepareOptions(val_fraction=0.0)
    for bad, fragment in ((huge_box, f"{huge_box.sample_id}: non-finite box in the shard row"),
                          (far_centre, "the face centre/scale do not fit"), (tiny_scale, "degenerate face box")):
        out = tmp_path / "ds"
        with pytest.raises((DataError, PrepareError), match="^[^\n]*" + fragment.replace("(", r"\(")):
            write_dataset([good, bad], out, layout, opts, {"format": "test"}, engine="local")
        assert not out.exists() and hidden_leftovers(tmp_path) == []
    skip = PrepareOptions(val_fraction=0.0, on_error="skip")
    manifest = write_dataset([good, huge_box, far_centre, tiny_scale], tmp_path / "ds", layout, skip,
                             {"format": "test"}, engine="local")
    assert [s["item"] for s in manifest["skipped"]] == [r.sample_id for r in (huge_box, far_centre, tiny_scale)]
    table = pq.read_table(tmp_path / "ds" / manifest["shards"][0]["path"]).to_pydict()
    assert table["sample_id"] == [good.sample_id]
    for col in ("landmarks", "cov", "matrix", "box"):
        assert np.all(np.isfinite(np.asarray(table[col][0], np.float64)))


class CrashingImage:
    """An image source whose worker process dies (SIGSEGV) on load, logging each attempt to a file."""

    def __init__(self, log: str) -> None:
        self.log = log

    def load(self) -> np.ndarray:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGSEGV)
        raise AssertionError("unreachable")


def test_a_crashing_ray_task_is_retried_a_bounded_number_of_times(ray_cluster, tmp_path: Path) -> None:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file
    attempts = tmp_path / "attempts.log"
    rec = _record(0)
    rec.image = CrashingImage(str(attempts))
    out = tmp_path / "ds"
    with pytest.raises(PrepareError) as err:
        write_dataset([rec], out, get_layout(68), PrepareOptions(val_fraction=0.0), {"format": "test"},
                      engine="ray")
    assert len(str(err.value).splitlines()) == 1 and f"failed {TASK_RETRIES + 1} times" in str(err.value)
    assert len(attempts.read_text().split()) == TASK_RETRIES + 1
    assert not out.exists() and hidden_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# images: pixel cap from the header, regular files only
# ------------------------------------------------------------------------------------------------


def claim_size(png: Path, width: int, height: int) -> None:
    """Rewrite the IHDR width/height of a PNG (and its CRC): a tiny file whose header claims a big image."""
    data = bytearray(png.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    png.write_bytes(bytes(data))


def test_pixel_cap_is_checked_from_the_header(tmp_path: Path) -> None:
    png = tmp_path / "big.png"
    cv2.imwrite(str(png), np.zeros((16, 16, 3), np.uint8))
    claim_size(png, 20000, 20000)
    assert png.stat().st_size < 200
    assert check_image_file(png, None) == (20000, 20000)
    with pytest.raises(DataError, match=r"big.png: image is 20000x20000 \(400 MP\), over the 50 MP cap"):
        check_image_file(png)
    with pytest.raises(DataError, match="over the 50 MP cap"):
        FileImage(str(png)).load()
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((30, 40, 3), np.uint8))
    assert check_image_file(small, 1200) == (40, 30)
    with pytest.raises(DataError, match=r"small.png: image is 40x30 \(0.0012 MP\), over the 0.0012 MP cap"):
        check_image_file(small, 1199)


def test_prepare_refuses_images_over_the_cap(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    code, _, err = prepare_cli(synth_root, out, "--max-pixels", 128 * 128 - 1)
    assert code == 2 and "over the 0.0164 MP cap" in err and ".png" in err and not out.exists()
    big = min((synth_root / "synthetic" / "trainset").glob("*.png"))
    claim_size(big, 20000, 20000)  # the .pts points stay inside the (claimed) image
    code, _, err = prepare_cli(synth_root, out, "--on-error", "skip")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    reason = f"{big}: image is 20000x20000 (400 MP), over the 50 MP cap (--max-pixels)"
    assert [s["reason"] for s in manifest["skipped"]] == [reason]
    assert sum(c["all"] for c in manifest["counts"].values()) == 2


def test_fifos_directories_and_devices_are_not_images(tmp_path: Path) -> None:
    folder = tmp_path / "afw"
    folder.mkdir()
    (folder / "face.pts").write_text("version: 1\nn_points: 68\n{\n" + "10 10\n" * 68 + "}\n")
    os.mkfifo(folder / "face.png")
    done: list[BaseException] = []

    def read() -> None:
        try:
            read_300w(tmp_path)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            done.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(20)
    if reader.is_alive():  # it blocked in open(): release it with a writer, then fail
        os.close(os.open(folder / "face.png", os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
        pytest.fail("reading a FIFO as an image blocked")
    assert isinstance(done[0], DataError) and str(done[0]).endswith("face.png: is a FIFO, not a regular file")
    with pytest.raises(DataError, match="is a FIFO"):
        check_image_file(folder / "face.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match="dir.png: is a directory, not a regular file"):
        check_image_file(tmp_path / "dir.png")
    (tmp_path / "null.png").symlink_to("/dev/null")
    with pytest.raises(DataError, match="null.png: is a device file, not a regular file"):
        check_image_file(tmp_path / "null.png")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_open_would_give(tmp_path: Path, umask: int) -> None:
    """An atomically written file (an exported model, metrics) is not left with the temp file's 0600: it gets
    0666 less the umask, as a plain open() would, and no temp file is left beside it."""
    from flare.files import atomic_write_bytes

    before = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "model.onnx", b"graph")
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(before)
    mode = (tmp_path / "model.onnx").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "plain"]
