"""``flare predict`` on many files: unique mirrored output names, one JSONL, bad images and boxes reported
while the others are still processed, bad --box values refused before anything runs."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flare.models.layouts import get_layout
from flare.platform.builders import build_model
from flare.platform.config import load_job
from flare.platform.predict_files import collect_images, predict_files
from flare.platform.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, untrained tiny model saved as flare saves a pulled model (state.pt + job.json)."""
    job = load_job(ROOT / "jobs" / "tiny.yaml", ["data.manifest=/nonexistent/manifest.json"])
    torch.manual_seed(0)
    model = build_model(job, get_layout("300w68"))
    d = tmp_path_factory.mktemp("model")
    torch.save(model.state_dict(), d / "state.pt")
    (d / "job.json").write_text(json.dumps({"job": job.model_dump(mode="json"), "layout": "300w68",
                                            "info": {"decoder": "softargmax"}}))
    return d


def face(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (96, 80, 3), dtype=np.uint8)
    cv2.imwrite(str(path), img)
    return path


def claim_size(png: Path, width: int, height: int) -> None:
    """Rewrite a PNG's IHDR size (and CRC): a tiny file whose header claims a huge image."""
    data = bytearray(png.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    png.write_bytes(bytes(data))


def test_output_names_mirror_inputs_and_never_collide(tmp_path: Path) -> None:
    a, b = face(tmp_path / "a" / "face.jpg", 0), face(tmp_path / "b" / "face.jpg", 1)
    face(tmp_path / "dir" / "x" / "one.png", 2)
    (tmp_path / "dir" / "notes.txt").write_text("not an image")
    pairs = collect_images([a, b, tmp_path / "dir", a])  # `a` twice: predicted once
    assert [(p.name, str(s)) for p, s in pairs] == [("face.jpg", "a/face"), ("face.jpg", "b/face"),
                                                    ("one.png", "x/one")]
    c = face(tmp_path / "c" / "face.jpg", 3)
    pairs = collect_images([tmp_path / "a", tmp_path / "c"])  # two folders, same relative name
    assert [str(s) for _, s in pairs] == ["face", "face-2"] and pairs[1][0] == c


def test_bad_images_and_boxes_are_reported_and_the_rest_predicted(model_dir: Path, tmp_path: Path) -> None:
    predictor = Predictor.from_dir(model_dir, device="cpu")
    good = [face(tmp_path / "in" / "a" / "face.jpg", 0), face(tmp_path / "in" / "b" / "face.jpg", 1)]
    fifo = tmp_path / "in" / "pipe.png"
    os.mkfifo(fifo)
    huge = face(tmp_path / "in" / "huge.png", 4)
    claim_size(huge, 20000, 20000)
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    failures = dict(predict_files(predictor, [*good, fifo, huge, broken], out, [[10, 10, 50, 60]], log=lambda s: None))
    assert set(failures) == {str(fifo), str(huge), str(broken)}
    assert "not a regular file" in failures[str(fifo)] and "MP" in failures[str(huge)]
    for stem in ("a/face", "b/face"):
        rec = json.loads((out / f"{stem}.json").read_text())
        assert np.asarray(rec["faces"]).shape == (1, 68, 2) and (out / f"{stem}_overlay.png").stat().st_size > 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(ln)["output"] for ln in lines] == ["a/face", "b/face"]
    # a box outside one image fails that image only
    failures = predict_files(predictor, good, tmp_path / "out2", [[500, 500, 20, 20]], log=lambda s: None)
    assert len(failures) == 2 and all("outside the 80x96 image" in r for _, r in failures)


@pytest.mark.parametrize("box", ["nan,1,20,20", "1,2,0,20", "1,2,3", "a,b,c,d", "1,2,inf,4"])
def test_bad_box_is_one_line_before_anything_runs(model_dir: Path, tmp_path: Path, box: str) -> None:
    from flare.platform.cli import app

    img = face(tmp_path / "face.jpg", 0)
    res = CliRunner().invoke(app, ["predict", str(img), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                                   "--box", box])
    assert res.exit_code == 2 and res.output.strip().startswith(f"error: --box {box!r}"), res.output
    assert not (tmp_path / "o").exists()


def test_ray_batch_inference_writes_what_flare_predict_writes(ray_cluster, model_dir: Path, tmp_path: Path) -> None:
    """``flare predict --ray``: 5 images and a broken one in batches of 2 on 2 Ray Data actors (each loads
    the model once, so 3 batches reuse an actor); the same JSON records and JSONL order as one process, the
    broken image reported and the others predicted."""
    from flare.platform.predict_ray import PredictJob, predict_on_ray

    for i, d in enumerate("abcde"):
        face(tmp_path / "in" / d / "face.jpg", i)
    broken = face(tmp_path / "in" / "f" / "face.jpg", 5)
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    lines: list[str] = []
    job = PredictJob(str(model_dir), detect=False)
    failures = predict_on_ray(job, [tmp_path / "in"], tmp_path / "ray", actors=2, batch_size=2, log=lines.append)
    assert failures == [(str(broken), failures[0][1])] and "corrupt" in failures[0][1]
    local = predict_files(Predictor.from_dir(model_dir, device="cpu"), [tmp_path / "in"], tmp_path / "one",
                          detect=False, log=lambda s: None)
    assert [p for p, _ in local] == [str(broken)]
    ray_rows = [json.loads(ln) for ln in (tmp_path / "ray" / "predictions.jsonl").read_text().splitlines()]
    one_rows = [json.loads(ln) for ln in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    assert [r["output"] for r in ray_rows] == [r["output"] for r in one_rows] == [f"{d}/face" for d in "abcde"]
    for a, b in zip(ray_rows, one_rows, strict=True):
        np.testing.assert_allclose(a["faces"], b["faces"], atol=1e-3)
        assert a["image"] == str(Path(b["image"]).resolve())
        assert (tmp_path / "ray" / f"{a['output']}_overlay.png").stat().st_size > 0
    summary = lines[-1]
    assert summary.startswith("6 image(s) on ") and "1 failed" in summary
    actors = int(summary.split(" on ")[1].split()[0])
    assert 1 <= actors <= 2 and f"{actors} actor(s), {actors} model load(s);" in summary  # 3 batches, 1 load each


def test_ray_batch_inference_refuses_a_bad_model_before_ray_starts(tmp_path: Path) -> None:
    from flare.platform.cli import app

    face(tmp_path / "in" / "a.jpg", 0)
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "in"), "--ray", "--model", str(tmp_path / "in"),
                                   "--out", str(tmp_path / "o")])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "no state.pt found (not a flare model" in lines[0], res.output
    assert not (tmp_path / "o").exists()


def test_eval_refuses_an_unknown_decoder(model_dir: Path, tmp_path: Path) -> None:
    """``flare eval --decoder bogus`` used to run plain argmax and label the metrics "bogus"."""
    from flare.platform.cli import app

    res = CliRunner().invoke(app, ["eval", str(model_dir), "--data", str(tmp_path / "nodata"), "--decoder", "bogus"])
    assert res.exit_code == 2 and "unknown decoder 'bogus'; known: softargmax, argmax, argmax_refine" in res.output
