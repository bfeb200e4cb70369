"""`sdonnx batch` in one process: jobs checked before anything runs, each image what
`sdonnx generate` draws with its settings, and resumable output that is never lost, doubled
or overwritten (issue 25). The same on a Ray cluster: tests/test_cluster.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdonnx.cli.batch import derived_seed, parse_job, read_jobs
from sdonnx.runtime.errors import InputError


def sdonnx(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdonnx.cli.app", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def write_jobs(path: Path, jobs: list) -> Path:
    path.write_text("".join((job if isinstance(job, str) else json.dumps(job)) + "\n" for job in jobs))
    return path


def results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def generate_reference(record: dict, out: Path) -> Path:
    """The image `sdonnx generate` draws for a results line's job, with the CLI's options."""
    job = record["job"]
    args = ["generate", job["prompt"], "--seed", job["seed"], "--provider", "cpu", "-o", out]
    for key, option in (("negative_prompt", "--negative"), ("steps", "--steps"), ("guidance", "--guidance"),
                        ("sampler", "--sampler"), ("schedule", "--schedule"), ("eta", "--eta")):
        if job[key] not in (None, ""):
            args += [option, job[key]]
    if job["width"] is not None:
        args += ["--size", f"{job['width']}x{job['height']}"]
    done = sdonnx(*args)
    assert done.returncode == 0, done.stderr
    return out


JOBS = [
    {"prompt": "a red circle on a white background", "seed": 11, "steps": 6},
    {"prompt": "a blue square", "negative": "red", "steps": 6, "n": 2, "cfg_scale": 4},
    {"prompt": "a green triangle", "name": "triangle", "sampler_name": "DPM++ 2M Karras", "steps": 6,
     "size": "96x64"},
    {"prompt": "a yellow star", "seed": 5, "steps": 6, "sampler": "euler_a", "eta": 0.5},
]


def test_images_equal_generate_and_a_rerun_draws_nothing(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    out = tmp_path / "out"
    done = sdonnx("batch", jobs, "--out", out, "--provider", "cpu")
    assert done.returncode == 0, done.stderr
    assert "drew 5 images" in done.stdout
    records = results(out)
    files = sorted(r["file"] for r in records)
    assert files == sorted(p.name for p in out.glob("*.png")) and len(files) == 5
    assert {"00001-11.png", "triangle.png", "00004-5.png"} <= set(files)
    for record in records:
        reference = generate_reference(record, tmp_path / f"ref-{record['file']}")
        assert np.array_equal(pixels(out / record["file"]), pixels(reference)), record["file"]
        assert Image.open(out / record["file"]).info["parameters"] == Image.open(reference).info["parameters"]
    triangle = next(r for r in records if r["file"] == "triangle.png")
    assert (triangle["width"], triangle["height"]) == (96, 64)
    assert "Sampler: DPM++ 2M," in triangle["parameters"] and "Schedule type: Karras" in triangle["parameters"]
    # Negative control: another seed is another picture, so the equality above can fail.
    other = dict(records[0], job={**records[0]["job"], "seed": 12})
    assert not np.array_equal(pixels(out / records[0]["file"]),
                              pixels(generate_reference(other, tmp_path / "other.png")))

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = sdonnx("batch", jobs, "--out", out, "--provider", "cpu")
    assert again.returncode == 0, again.stderr
    assert "nothing to draw" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_resuming_after_losses_never_doubles_or_overwrites(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:2])
    out = tmp_path / "out"
    assert sdonnx("batch", jobs, "--out", out, "--provider", "cpu").returncode == 0
    first = results(out)
    kept = {r["file"]: (out / r["file"]).read_bytes() for r in first}
    # A crash between placing an image and writing its line, a torn last line, and an image
    # deleted by hand.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + '{"file": "000')
    (out / first[0]["file"]).unlink()
    done = sdonnx("batch", jobs, "--out", out, "--provider", "cpu")
    assert done.returncode == 0, done.stderr
    assert "drew 1 image " in done.stdout and "2 images there already" in done.stdout
    assert "1 image listed" in done.stderr
    now = results(out)
    assert sorted(r["file"] for r in now) == sorted(kept) and len(now) == 3
    assert {f: (out / f).read_bytes() for f in kept} == kept  # redrawn identically
    unrecorded = json.loads(lines[-1])["file"]
    assert [r["file"] for r in now if r.get("recovered")] == [unrecorded]  # its line back, not redrawn

    # A job whose settings changed under the same file name: refused, nothing overwritten.
    changed = write_jobs(tmp_path / "changed.jsonl", [{**JOBS[0], "prompt": "a black circle"}])
    refused = sdonnx("batch", changed, "--out", out, "--provider", "cpu")
    assert refused.returncode == 2
    assert "was drawn from other settings than line 1" in refused.stderr
    assert {f: (out / f).read_bytes() for f in kept} == kept
    # A file that sdonnx batch did not write, where a job's image would go.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    Image.new("RGB", (8, 8)).save(foreign / "00001-11.png")
    refused = sdonnx("batch", jobs, "--out", foreign, "--provider", "cpu")
    assert refused.returncode == 2 and "is not line 1's image" in refused.stderr


def test_bad_lines_are_reported_with_their_numbers_before_anything_runs(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        JOBS[0],
        "{not json",
        {"prompt": "x", "colour": "red"},
        {"seed": 3},
        "",
        {"prompt": "x", "size": "96x80"},
        {"prompt": "x", "sampler": "nope"},
        {"prompt": "x", "steps": 0},
        {"prompt": "x", "name": "../escape"},
        {"prompt": "x", "name": "same"},
        {"prompt": "y", "name": "same"},
        {"prompt": "x", "steps": "20"},
        ["a list"],
    ])
    out = tmp_path / "out"
    done = sdonnx("batch", jobs, "--out", out)
    assert done.returncode == 2
    err = done.stderr
    for line, words in [(2, "not JSON"), (3, "unknown field 'colour'"), (4, '"prompt" is required'),
                        (6, "multiples of 32"), (7, "unknown sampler 'nope'"), (8, "steps"), (9, '"name"'),
                        (11, "also line 10's image"), (12, "'steps' must be a whole number"), (13, "JSON object")]:
        assert f"jobs.jsonl: line {line}: " in err and words in err, (line, words, err)
    assert "line 1:" not in err and "line 5:" not in err and "line 10:" not in err
    assert err.strip().splitlines()[-1].startswith("error: 10 bad lines")
    assert not out.exists()


def test_a_job_the_model_refuses_fails_alone(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [JOBS[0], {"prompt": "x <lora:missing:1>", "seed": 2, "steps": 6}])
    out = tmp_path / "out"
    done = sdonnx("batch", jobs, "--out", out, "--provider", "cpu", "--lora-dir", tmp_path / "loras")
    assert done.returncode == 2
    assert "line 2 (00002-2.png)" in done.stderr and "missing" in done.stderr
    assert [r["file"] for r in results(out)] == ["00001-11.png"]


def test_seeds_drawn_for_jobs_without_one_are_stable():
    [a] = parse_job('{"prompt": "a red circle"}', 3)
    [b] = parse_job('{"prompt": "a red circle"}', 3)
    [c] = parse_job('{"prompt": "a red circle"}', 4)
    [d] = parse_job('{"prompt": "a red circle", "seed": -1}', 3)
    assert a.request["seed"] == b.request["seed"] == d.request["seed"] != c.request["seed"]
    assert a.file == f"00003-{a.request['seed']}.png"
    assert 0 <= derived_seed("x", {}) < 2**32 - 1
    many = parse_job('{"prompt": "p", "seed": 7, "n": 3, "name": "p"}', 1)
    assert [t.file for t in many] == ["p-0.png", "p-1.png", "p-2.png"]
    assert [t.settings["seed"] for t in many] == [7, 8, 9]
    with pytest.raises(InputError, match="given twice"):
        parse_job('{"prompt": "p", "negative": "a", "negative_prompt": "b"}', 1)


def test_jobs_file_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_jobs(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="holds no jobs"):
        read_jobs(tmp_path / "empty.jsonl")
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:1])
    for args, message in [(["--out", tmp_path / "x.png"], "give a folder"),
                          (["--out", tmp_path / "o", "--workers", 2], "--workers needs --ray"),
                          (["--out", tmp_path / "o", "--ship-model"], "--ship-model needs --ray"),
                          (["--out", tmp_path / "o", "--ray", "nowhere"], "--ray takes auto, local"),
                          (["--out", tmp_path / "o", "--ray", "127.0.0.1:1"], "nothing answers there")]:
        done = sdonnx("batch", jobs, *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1


def test_one_batch_at_a_time_writes_into_a_folder(tmp_path):
    from sdonnx.cli.batch import Results

    first = Results(tmp_path)
    with pytest.raises(InputError, match="another sdonnx batch is writing into"):
        Results(tmp_path)
    del first  # its lock goes with it
    Results(tmp_path)
