"""A model folder's recommended settings (sdonnx.json "defaults") fill what a generation does
not say, in the Python API, the command line and the server; bad ones are refused at load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdonnx.runtime import ModelFolderError, Pipeline, parts

RECOMMENDED = {"steps": 4, "guidance": 3.0, "sampler": "ddim"}


@pytest.fixture(scope="module")
def recommending(tiny_onnx, tmp_path_factory):
    folder = tmp_path_factory.mktemp("defaults") / "model"
    shutil.copytree(tiny_onnx, folder)
    record = json.loads((folder / parts.RECORD).read_text())
    (folder / parts.RECORD).write_text(json.dumps({**record, "defaults": RECOMMENDED}))
    return folder


def _load(folder):
    return Pipeline.load(folder, provider="cpu", precision="fp32", cache_dir=False)


def test_the_api_uses_the_models_settings_where_none_are_given(recommending, tiny_pipeline):
    pipe = _load(recommending)
    assert (pipe.defaults.steps, pipe.defaults.guidance, pipe.defaults.sampler) == (4, 3.0, "ddim")
    image = pipe.generate("a red circle", seed=5)[0]
    assert "Steps: 4, Sampler: DDIM, CFG scale: 3," in image.info["parameters"]
    explicit = tiny_pipeline.generate("a red circle", seed=5, steps=4, guidance=3.0, sampler="ddim")[0]
    assert np.array_equal(np.asarray(image), np.asarray(explicit))
    # What the caller says wins, guidance 0 included.
    assert "Steps: 2, Sampler: Euler, CFG scale: 0," in pipe.generate(
        "a red circle", steps=2, guidance=0.0, sampler="euler")[0].info["parameters"]
    # A folder without recommendations keeps SD's usual settings.
    assert "Steps: 20, Sampler: Euler, CFG scale: 7.5," in tiny_pipeline.generate("x")[0].info["parameters"]


@pytest.mark.parametrize("defaults, message", [
    ({"sampler": "foo"}, "unknown sampler 'foo'"),
    ({"steps": 0}, "steps"),
    ({"guidance": -2}, "guidance must be a finite number from 0 to 100"),
    ({"width": 64}, "unknown defaults width"),
])
def test_bad_recommendations_are_refused_naming_the_file(recommending, tmp_path, defaults, message):
    folder = tmp_path / "model"
    shutil.copytree(recommending, folder)
    record = json.loads((folder / parts.RECORD).read_text())
    (folder / parts.RECORD).write_text(json.dumps({**record, "defaults": defaults}))
    with pytest.raises(ModelFolderError, match=rf"sdonnx.json.*{message}"):
        _load(folder)


def test_the_command_line_uses_them_and_info_shows_them(recommending, tmp_path):
    def sdonnx(*args):
        return subprocess.run([sys.executable, "-m", "sdonnx.cli.app", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    done = sdonnx("generate", "a red circle", "--model", recommending, "--seed", 1, "--out", tmp_path / "a.png")
    assert done.returncode == 0, done.stderr
    assert "Steps: 4, Sampler: DDIM, CFG scale: 3," in Image.open(tmp_path / "a.png").text["parameters"]
    done = sdonnx("generate", "a red circle", "--model", recommending, "--seed", 1, "-g", 6, "--steps", 3,
                  "--out", tmp_path / "b.png")
    assert "Steps: 3, Sampler: DDIM, CFG scale: 6," in Image.open(tmp_path / "b.png").text["parameters"]
    info = sdonnx("info", recommending)
    assert "recommended: steps 4, guidance 3.0, sampler ddim" in info.stdout, info.stdout


def test_the_server_uses_them(recommending):
    from serving import Server

    server = Server("--model", str(recommending), "--provider", "cpu")
    try:
        assert server.get("/health").body["defaults"] == RECOMMENDED
        made = server.post("/sdapi/v1/txt2img", {"prompt": "a red circle", "seed": 2})
        assert made.status == 200, made.text
        info = json.loads(made.body["info"])
        assert (info["steps"], info["cfg_scale"], info["sampler_name"]) == (4, 3.0, "DDIM")
        made = server.post("/v1/images/generations", {"prompt": "a red circle", "seed": 2, "size": "64x64"})
        assert made.status == 200 and made.body["data"][0]["b64_json"]
    finally:
        server.stop()
