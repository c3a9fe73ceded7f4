"""``flare specs ls|cp|validate`` and shipped names in ``flare train NAME`` / ``flare tune NAME``, through
the main app with typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flare.platform.cli import app
from flare.platform.specs import job_specs, resolve_spec, search_specs

ROOT = Path(__file__).resolve().parents[1]


def flare(*args: str):
    return CliRunner().invoke(app, list(args))


def one_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_shipped_specs_are_the_package_data() -> None:
    assert job_specs() == {p.stem: p for p in sorted((ROOT / "jobs").glob("*.yaml"))}
    assert set(search_specs()) == {f"search/{p.stem}" for p in (ROOT / "jobs" / "search").glob("*.yaml")}


def test_ls_one_line_per_spec_with_model_size() -> None:
    res = flare("specs", "ls")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert set(rows) == set(job_specs()) | set(search_specs())
    assert rows["300w_star"].split()[1:] == ["300w68", "star", "4x256", "256px", "13.37M", "params"]
    assert rows["tiny"].split()[1:5] == ["300w68", "star", "1x64", "64px"]
    assert rows["wflw_rwsa"].split()[1:3] == ["wflw98", "rwsa"]
    assert "objective star " in rows["search/star"] and "objective.star.distance" in rows["search/star"]
    assert "objective star|rwsa " in rows["search/demo"]


def test_cp_writes_a_copy_and_refuses_to_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "mine.yaml"
    res = flare("specs", "cp", "300w_star", str(dest))
    assert res.exit_code == 0, res.output
    assert dest.read_bytes() == (ROOT / "jobs" / "300w_star.yaml").read_bytes()
    dest.write_text("edited\n")
    assert "already exists; pass --force" in one_error(flare("specs", "cp", "300w_star", str(dest)))
    assert dest.read_text() == "edited\n"
    assert flare("specs", "cp", "tiny", str(dest), "--force").exit_code == 0
    assert dest.read_bytes() == (ROOT / "jobs" / "tiny.yaml").read_bytes()
    assert flare("specs", "cp", "search/star", str(tmp_path)).exit_code == 0  # into a directory
    assert (tmp_path / "star.yaml").read_bytes() == (ROOT / "jobs" / "search" / "star.yaml").read_bytes()
    assert "shipped: 300w_rwsa" in one_error(flare("specs", "cp", "nope", str(tmp_path / "x.yaml")))
    assert "no such directory" in one_error(flare("specs", "cp", "tiny", str(tmp_path / "no" / "x.yaml")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml", "star.yaml"]  # no temp files left


def test_validate_ok_and_one_line_errors(small_300w: Path, tmp_path: Path) -> None:
    manifest = f"data.manifest={small_300w / 'manifest.json'}"
    res = flare("specs", "validate", "tiny", "--set", manifest)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"OK {ROOT / 'jobs' / 'tiny.yaml'}: 300w68 star 1x64 64px")
    assert str(small_300w / "manifest.json") in res.stdout
    assert "does not match the data's layout 300w68" in one_error(flare("specs", "validate", "wflw_star", "--set",
                                                                        manifest))
    missing = str(tmp_path / "none" / "manifest.json")
    assert missing in one_error(flare("specs", "validate", "tiny", "--set", f"data.manifest={missing}"))
    assert "objective.star.ww: unknown key" in one_error(flare("specs", "validate", "tiny", "--set", manifest,
                                                               "--set", "objective.star.ww=1"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {manifest: m.json}\nmodel: {stacks: 0}\n")
    assert one_error(flare("specs", "validate", str(bad))).startswith(f"error: {bad}: model.stacks: ")


def test_resolve_spec_path_wins_then_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_spec("300w_star") == ROOT / "jobs" / "300w_star.yaml"
    assert resolve_spec("star", search=True) == resolve_spec("search/star", search=True) == \
        ROOT / "jobs" / "search" / "star.yaml"
    (tmp_path / "300w_star").write_text("a local file named like a shipped spec\n")
    assert resolve_spec("300w_star") == Path("300w_star")


def test_train_and_tune_take_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The name resolves to the shipped file (its path is in the error of a bad override); nothing starts."""
    monkeypatch.chdir(tmp_path)
    tiny = ROOT / "jobs" / "tiny.yaml"
    msg = one_error(flare("train", "tiny", "--no-ray", "--set", "objective.star.ww=1"))
    assert msg == f"error: {tiny}: objective.star.ww: unknown key"
    msg = one_error(flare("tune", "tiny", "--search", "star", "--set", "objective.star.ww=1"))
    assert msg == f"error: {tiny}: objective.star.ww: unknown key"
    msg = one_error(flare("train", "no_such_spec"))
    assert msg.startswith("error: no_such_spec: no such file and no shipped job spec") and "300w_star" in msg
    msg = one_error(flare("tune", "tiny", "--search", "nope"))
    assert "no shipped search space" in msg and "search/star" in msg
