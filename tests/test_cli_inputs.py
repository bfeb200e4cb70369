"""Every option of every command, fed bad values: exit code 2 and one line on stderr, never a
traceback (issue 18). Runs in-process against a model folder that does not exist, so a value
that slipped through would end in "model folder not found" instead of its own message."""

from __future__ import annotations

import sys

import pytest
import typer

from sdonnx.cli.app import app, main

BAD_VALUES = ("", "-5", "nan", "inf", "-inf", "1e400", "9" * 30, "abc", "1.5")
# Options whose every value above is a legitimate text (nothing to refuse), and flags.
FREE_TEXT = {"--negative", "--api-key", "--prompt", "--watermark-text"}
# Values of BAD_VALUES that are fine for an option (they end in the missing model's error).
VALID = {("--guidance", "1.5"), ("--default-guidance", "1.5"), ("--min-psnr", "1.5")}
# Any non-empty text names a folder here (a new output folder, or the missing model itself), or
# something looked up in the missing source (a weight variant).
PATHS = {"--model", "--out", "--variant", "--lora-dir", "--embeddings-dir", "--preview", "--tiny-vae"}
# What a run ends in when every option was accepted: the missing model (or source) folder.
FALLBACK = ("model folder not found", "source not found")


def base_args(command: str, tmp_path) -> list[str]:
    missing = str(tmp_path / "missing")
    return {
        "generate": ["generate", "a red circle", "--model", missing, "--out", str(tmp_path / "out")],
        "export": ["export", missing, str(tmp_path / "exported")],
        "quantize": ["quantize", missing, str(tmp_path / "quantized")],
        "bench": ["bench", missing],
        "serve": ["serve", "--model", missing, "--port", "0"],
        "info": ["info", missing],
        "upscale": ["upscale", str(tmp_path / "low.png"), "--model", missing, "--out", str(tmp_path / "big.png")],
        "batch": ["batch", str(jobs_file(tmp_path)), "--model", missing, "--out", str(tmp_path / "out")],
    }[command]


def jobs_file(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"prompt": "a red circle", "seed": 1}\n')
    return path


def options():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name == "option" and not param.is_flag and param.opts[0] not in FREE_TEXT:
                yield name, param.opts[0]


def run(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["sdonnx", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def test_the_walk_covers_every_command():
    commands = {name for name, _ in options()}
    assert commands == {"generate", "export", "quantize", "bench", "serve", "upscale", "batch"}  # info: no option
    assert sum(1 for _ in options()) >= 35


@pytest.mark.parametrize("command, option", list(options()))
def test_bad_values_get_one_line_and_exit_code_2(command, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # --out abc makes a folder abc
    for value in BAD_VALUES:
        code, err = run(monkeypatch, capsys, [*base_args(command, tmp_path), option, value])
        lines = err.strip().splitlines()
        assert code == 2, (option, value, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (option, value, err)
        assert "Traceback" not in err
        if (option, value) not in VALID and not (option in PATHS and value):
            assert not any(f in err for f in FALLBACK), f"{command} {option} {value!r} was not refused: {err}"


@pytest.mark.parametrize("command", ["generate", "info", "bench", "quantize", "export"])
def test_paths_that_are_empty_files_or_missing(command, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a model")
    for where in ("", str(a_file), str(tmp_path / "missing")):
        args = base_args(command, tmp_path)
        args = [where if a == str(tmp_path / "missing") else a for a in args]
        code, err = run(monkeypatch, capsys, args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (where, err)


def test_an_unknown_command_or_option_is_one_line(monkeypatch, capsys):
    for args in (["bogus"], ["generate", "x", "--bogus"], ["generate"], ["serve", "--port"]):
        code, err = run(monkeypatch, capsys, args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
