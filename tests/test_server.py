"""`sdonnx serve` on loopback: OpenAI's images API, AUTOMATIC1111's /sdapi/v1, the page, limits.

Each server is a real `sdonnx serve` process on the embedded default model (128 px, ONNX
Runtime CPU), driven over HTTP; after every error case the server must still be healthy.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from serving import Server, b64_png, load, multipart, png
from sdonnx.models import shapes

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def server():
    s = Server("--provider", "cpu", "--queue", "2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed():
    s = Server("--provider", "cpu", "--api-key", "s3cret")
    yield s
    s.stop()


def healthy(server: Server) -> bool:
    reply = server.get("/health")
    return reply.status == 200 and reply.body["status"] == "ok"


def test_read_only_endpoints(server):
    models = server.get("/v1/models")
    assert models.status == 200 and models.body["data"][0]["id"] == "default"
    samplers = server.get("/sdapi/v1/samplers")
    names = [s["name"] for s in samplers.body]
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    sd_models = server.get("/sdapi/v1/sd-models").body
    assert sd_models[0]["model_name"] == "default"
    assert "/" not in json.dumps(sd_models)  # no file-system path leaves the server
    page = server.request("GET", "/")
    assert page.status == 200 and "<title>sdonnx</title>" in page.text and "Generate" in page.text
    progress = server.get("/sdapi/v1/progress").body
    assert progress["progress"] == 0 and progress["current_image"] is None


def test_openai_image_equals_sdonnx_generate_pixel_for_pixel(server, tmp_path):
    reply = server.post("/v1/images/generations", {"prompt": PROMPT, "size": "64x64", "seed": 7, "steps": 12,
                                                   "negative_prompt": "blue", "response_format": "b64_json"})
    assert reply.status == 200, reply.message
    served = png(reply.body["data"][0]["b64_json"])
    assert reply.body["data"][0]["seed"] == 7
    out = tmp_path / "cli.png"
    subprocess.run([sys.executable, "-c", "from sdonnx.cli.app import main; main()", "generate", PROMPT,
                    "--negative", "blue", "--seed", "7", "--steps", "12", "--size", "64x64",
                    "--provider", "cpu", "--out", str(out)], check=True, capture_output=True)
    with Image.open(out) as cli:
        assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(cli.convert("RGB")))
        assert served.info["parameters"] == cli.info["parameters"]


def test_txt2img_batch_info_and_seeds(server):
    reply = server.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "negative_prompt": "noise", "steps": 6,
                                             "cfg_scale": 5, "sampler_name": "DPM++ 2M Karras",
                                             "seed": 40, "batch_size": 2, "width": 64, "height": 64})
    assert reply.status == 200, reply.message
    info = json.loads(reply.body["info"])
    assert info["all_seeds"] == [40, 41] and info["seed"] == 40
    assert info["sampler_name"] == "DPM++ 2M" and info["steps"] == 6 and info["cfg_scale"] == 5
    assert "Karras" in info["infotexts"][0]
    images = [png(b) for b in reply.body["images"]]
    assert [im.size for im in images] == [(64, 64)] * 2
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    assert reply.body["parameters"]["prompt"] == PROMPT


def test_random_seed_is_reported(server):
    reply = server.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2, "seed": -1})
    seed = json.loads(reply.body["info"])["seed"]
    again = server.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2, "seed": seed})
    assert reply.body["images"] == again.body["images"]


def test_img2img_keeps_the_init_image_at_low_strength(server):
    first = server.post("/sdapi/v1/txt2img", {"prompt": "a blue square on a yellow background", "steps": 10,
                                             "seed": 5})
    init = first.body["images"][0]
    reply = server.post("/sdapi/v1/img2img", {"prompt": "a blue square on a yellow background", "steps": 10,
                                             "seed": 1, "denoising_strength": 0.3,
                                             "init_images": ["data:image/png;base64," + init]})
    assert reply.status == 200, reply.message
    out = np.asarray(png(reply.body["images"][0]).convert("RGB"), dtype=np.float32)
    before = np.asarray(png(init).convert("RGB"), dtype=np.float32)
    assert out.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)  # the model's native size
    assert 0 < np.abs(out - before).mean() < 20
    assert json.loads(reply.body["info"])["denoising_strength"] == 0.3


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/images/generations", {"prompt": PROMPT, "size": "64x65"}, 400, "multiples of 32"),
    ("/v1/images/generations", {"prompt": PROMPT, "size": "large"}, 400, "WIDTHxHEIGHT"),
    ("/v1/images/generations", {"prompt": PROMPT, "size": "9000x64"}, 400, "outside 8..2048"),
    ("/v1/images/generations", {"prompt": PROMPT, "response_format": "url"}, 400, "only b64_json"),
    ("/v1/images/generations", {"size": "64x64"}, 400, "prompt: required"),
    ("/v1/images/generations", {"prompt": PROMPT, "n": 0}, 400, "n: Input should be greater than or equal to 1"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "sampler_name": "Euler z"}, 400, "sampler_name: unknown sampler 'Euler z'"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "width": 100}, 400, "multiples of 32"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 0}, 400, "steps: Input should be greater than or equal to 1"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": "ten"}, 400, "steps: Input should be a valid integer"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "cfg_scale": -1}, 400, "cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": 3}, 400, "prompt: Input should be a valid string"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT}, 400, "init_images: required"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": []}, 400, "init_images: List should have at least 1"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": ["/etc/passwd"]}, 400, "init_images[0]: not valid base64"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": [base64.b64encode(b"not an image").decode()]},
     400, "init_images[0] data cannot be read as an image"),
])
def test_bad_requests_get_400_with_a_message(server, path, body, status, message):
    reply = server.post(path, body)
    assert reply.status == status and message in reply.message, (reply.status, reply.message)
    assert reply.body["error"]["message"] == reply.message  # OpenAI's error shape too
    assert healthy(server)


@pytest.mark.parametrize("raw, message", [(b"{bad", "malformed JSON"), (b"[1, 2]", "must be a JSON object"),
                                          (b"\xff\xfe", "malformed JSON")])
def test_malformed_json(server, raw, message):
    reply = server.request("POST", "/sdapi/v1/txt2img", raw=raw)
    assert reply.status == 400 and message in reply.message
    assert healthy(server)


def _send_raw(server: Server, head: str, chunks, path: str = "/sdapi/v1/txt2img") -> tuple[int, str]:
    """Send a request by hand (oversized or chunked bodies); the server may answer early."""
    url = urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.putrequest("POST", path)
    for line in head:
        connection.putheader(*line)
    connection.endheaders()
    try:
        for chunk in chunks:
            connection.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # answered before the whole body went out: read that answer
    response = connection.getresponse()
    status, text = response.status, response.read().decode()
    connection.close()
    return status, text


# A JSON body of spaces, and an OpenAI edit whose image file goes on and on.
OVERSIZED = [("/sdapi/v1/txt2img", "application/json", b""),
             ("/v1/images/edits", "multipart/form-data; boundary=xyz",
              b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="image.png"\r\n'
              b"Content-Type: image/png\r\n\r\n")]


@pytest.mark.parametrize("path, content_type, start", OVERSIZED)
def test_oversized_bodies_get_413(server, path, content_type, start):
    size = 17 * 2**20
    status, text = _send_raw(server, [("Content-Type", content_type), ("Content-Length", str(size))],
                             [start] + [b" " * 2**20] * 17, path)
    assert status == 413 and "request body over 16 MB" in text
    # Without a Content-Length (chunked), the limit is enforced while FastAPI reads the body.
    chunk = b" " * 2**20
    framed = [f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in [start] * bool(start) + [chunk] * 17]
    status, text = _send_raw(server, [("Content-Type", content_type), ("Transfer-Encoding", "chunked")],
                             framed + [b"0\r\n\r\n"], path)
    assert status == 413 and "request body over 16 MB" in text, (status, text)
    assert healthy(server)


def test_a_chunked_body_under_the_limit_is_read(server):
    body = json.dumps({"prompt": PROMPT, "steps": 1, "width": 64, "height": 64}).encode()
    framed = [f"{len(body):x}\r\n".encode() + body + b"\r\n", b"0\r\n\r\n"]
    status, text = _send_raw(server, [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
                             framed)
    assert status == 200 and json.loads(text)["images"], text


def test_interrupt_stops_within_one_step_and_progress_has_a_preview(server):
    body = {"prompt": PROMPT, "steps": 150, "seed": 3, "width": 256, "height": 256, "batch_size": 4}
    replies = []
    worker = threading.Thread(target=lambda: replies.append(server.post("/sdapi/v1/txt2img", body)))
    worker.start()
    deadline = time.monotonic() + 60
    progress = server.get("/sdapi/v1/progress").body
    while progress["state"]["sampling_step"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
        progress = server.get("/sdapi/v1/progress").body
    while progress["current_image"] is None and time.monotonic() < deadline:
        progress = server.get("/sdapi/v1/progress").body
    preview = png(progress["current_image"])
    assert preview.size == (256, 256)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    before = server.get("/sdapi/v1/progress", body=None).body["state"]["sampling_step"]
    assert server.post("/sdapi/v1/interrupt").body == {"interrupted": True}
    worker.join(60)
    reply = replies[0]
    assert reply.status == 409, reply.message
    stopped = int(reply.message.split("after step ")[1].split(" ")[0])
    assert before <= stopped <= before + 2 < 150  # the step that was running, at most one more
    assert healthy(server)
    assert server.post("/sdapi/v1/interrupt").body == {"interrupted": False}  # nothing runs
    assert server.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2}).status == 200


def test_a_full_queue_answers_503_and_loses_nothing(server):
    """20 clients at once against one generation slot and a queue of 2."""
    result = load(server, 20, {"prompt": PROMPT, "size": "64x64", "steps": 20}, 64)
    assert not result.other, result.other
    assert result.completed + result.busy == 20
    assert 3 <= result.completed <= 4  # the running one, the two queued, one taken off the queue meanwhile
    print(f"\n20 clients: {result.completed} completed, {result.busy} busy (503) in {result.seconds:.1f} s; "
          f"server peak RSS {server.peak_rss_mb():.0f} MB")
    assert healthy(server)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(png(b64).convert("RGB"))


SMALL = {"prompt": PROMPT, "steps": 3, "width": 64, "height": 64}


@pytest.mark.parametrize("path, raw, name", [
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": NaN}', "cfg_scale"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": Infinity}', "cfg_scale"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "eta": -Infinity}', "eta"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "subseed_strength": NaN}', "subseed_strength"),
    ("/sdapi/v1/img2img", b'{"prompt": "x", "init_images": ["x"], "denoising_strength": NaN}', "denoising_strength"),
    ("/v1/images/generations", b'{"prompt": "x", "guidance": NaN}', "guidance"),
])
def test_non_finite_numbers_get_400_and_the_server_keeps_serving(server, path, raw, name):
    reply = server.request("POST", path, raw=raw)
    assert reply.status == 400, (reply.status, reply.text)
    assert reply.message.startswith(f"{name}: ") and "finite number" in reply.message, reply.message
    assert "\n" not in reply.message
    assert healthy(server)
    assert server.post("/sdapi/v1/txt2img", {**SMALL, "steps": 1}).status == 200


@pytest.mark.parametrize("path, name", [("/sdapi/v1/txt2img", "prompt"), ("/sdapi/v1/txt2img", "negative_prompt"),
                                        ("/v1/images/generations", "prompt"), ("/sdapi/v1/img2img", "prompt")])
def test_a_3_mb_prompt_gets_400_at_once(server, path, name):
    from sdonnx.cli.server import MAX_PROMPT_CHARS

    body = {"prompt": PROMPT, "init_images": ["x"], name: "a red circle, " * (3 * 2**20 // 14)}
    start = time.monotonic()
    reply = server.post(path, body)
    assert reply.status == 400 and reply.message == f"{name}: at most {MAX_PROMPT_CHARS} characters, got " \
        f"{len(body[name])}", reply.message
    assert time.monotonic() - start < 5
    assert healthy(server)


def test_a_prompt_of_the_maximum_length_is_served(server):
    from sdonnx.cli.server import MAX_PROMPT_CHARS

    long = ("a red circle on a white background, " * 200)[:MAX_PROMPT_CHARS]
    reply = server.post("/sdapi/v1/txt2img", {**SMALL, "steps": 1, "prompt": long, "negative_prompt": long})
    assert reply.status == 200, reply.message
    assert json.loads(reply.body["info"])["prompt"] == long


@pytest.mark.parametrize("path, fields, message", [
    ("/sdapi/v1/txt2img", {"scheduler": "Exponential"}, "scheduler: sdonnx has no scheduler 'Exponential'; "
                                                       "it has Automatic and Karras"),
    ("/sdapi/v1/txt2img", {"enable_hr": True}, "enable_hr: sdonnx does not do hires fix"),
    ("/sdapi/v1/txt2img", {"restore_faces": True}, "restore_faces: sdonnx does not do face restoration"),
    ("/sdapi/v1/txt2img", {"tiling": True}, "tiling: sdonnx does not do tiling"),
    ("/sdapi/v1/txt2img", {"subseed_strength": 0.5}, "subseed_strength: sdonnx does not do variation seeds"),
    ("/sdapi/v1/txt2img", {"styles": ["cinematic"]}, "styles: sdonnx does not do saved styles"),
    ("/sdapi/v1/txt2img", {"s_churn": 1.0}, "s_churn: sdonnx does not do s_churn"),
    ("/sdapi/v1/txt2img", {"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts: sdonnx"),
    ("/sdapi/v1/txt2img", {"script_name": "x/y/z plot"}, "script_name: sdonnx does not do scripts"),
    ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "sdxl"}},
     "override_settings: sd_model_checkpoint 'sdxl': this server serves one model, 'default'"),
    ("/sdapi/v1/txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 2}},
     "override_settings: CLIP_stop_at_last_layers is fixed at 1"),
    ("/sdapi/v1/txt2img", {"n_iter": 0}, "n_iter: Input should be greater than or equal to 1"),
    ("/sdapi/v1/img2img", {"init_images": ["x"], "resize_mode": 2}, "resize_mode: sdonnx does not do resize modes"),
    ("/sdapi/v1/img2img", {"init_images": ["x", "y"]}, "init_images: List should have at most 1 item"),
    ("/sdapi/v1/img2img", {"init_images": ["x"], "mask": "x", "mask_blur": 4}, "mask_blur: sdonnx does not do"),
    ("/sdapi/v1/img2img", {"init_images": ["x"], "mask": "x", "inpaint_full_res": True},
     "inpaint_full_res: sdonnx does not do inpainting only the masked area"),
    ("/v1/images/generations", {"schedule": "exponential"}, "schedule: Input should be 'default' or 'karras'"),
])
def test_what_sdonnx_does_not_do_gets_400_naming_the_field(server, path, fields, message):
    reply = server.post(path, {"prompt": PROMPT, **fields})
    assert reply.status == 400 and reply.message.startswith(message), (reply.status, reply.message)
    assert healthy(server)


# What webuiapi 0.9 (mix1009/sdwebuiapi) sends for api.txt2img(prompt=..., sampler_name="Euler") with
# its defaults: most of it changes nothing in A1111 either, and eta applies to no Euler sampler.
WEBUIAPI_TXT2IMG = {
    "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "hr_prompt": "", "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0,
    "firstphase_height": 0, "prompt": PROMPT, "styles": [], "seed": 11, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 3, "cfg_scale": 7.0,
    "width": 64, "height": 64, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
    "sampler_name": "Euler", "scheduler": "automatic", "sampler_index": "Euler a", "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
}


def test_what_a1111_clients_send_by_default_is_served_as_a1111_would(server):
    reply = server.post("/sdapi/v1/txt2img", WEBUIAPI_TXT2IMG)
    assert reply.status == 200, reply.message
    info = json.loads(reply.body["info"])
    assert info["sampler_name"] == "Euler" and info["seed"] == 11 and info["eta"] is None
    plain = server.post("/sdapi/v1/txt2img", {**SMALL, "cfg_scale": 7, "sampler_name": "Euler", "seed": 11})
    assert np.array_equal(pixels(reply.body["images"][0]), pixels(plain.body["images"][0]))
    unsent = server.post("/sdapi/v1/txt2img", {**WEBUIAPI_TXT2IMG, "send_images": False})
    assert unsent.status == 200 and unsent.body["images"] == []


def test_n_iter_runs_batches_with_consecutive_seeds(server):
    reply = server.post("/sdapi/v1/txt2img", {**SMALL, "seed": 100, "n_iter": 2})
    assert reply.status == 200, reply.message
    info = json.loads(reply.body["info"])
    assert info["all_seeds"] == [100, 101] and len(reply.body["images"]) == 2
    for image, seed in zip(reply.body["images"], (100, 101)):
        alone = server.post("/sdapi/v1/txt2img", {**SMALL, "seed": seed})
        assert np.array_equal(pixels(image), pixels(alone.body["images"][0]))
    batches = server.post("/sdapi/v1/txt2img", {**SMALL, "steps": 1, "seed": 7, "batch_size": 2, "n_iter": 2})
    assert json.loads(batches.body["info"])["all_seeds"] == [7, 8, 9, 10] and len(batches.body["images"]) == 4


def test_eta_is_used_where_a1111_uses_it(server):
    def image(**fields):
        reply = server.post("/sdapi/v1/txt2img", {**SMALL, "seed": 4, **fields})
        assert reply.status == 200, reply.message
        return pixels(reply.body["images"][0])

    none, one = image(sampler_name="Euler a", eta=0), image(sampler_name="Euler a", eta=1)
    assert not np.array_equal(none, one)  # eta 0: no fresh noise
    assert np.array_equal(one, image(sampler_name="Euler a"))  # 1 is Euler a's default, as A1111's eta_ancestral
    assert not np.array_equal(image(sampler_name="DDIM", eta=1), image(sampler_name="DDIM"))  # DDIM's is 0
    # A1111 passes eta only to samplers that take it; sdonnx's own API refuses it there.
    assert np.array_equal(image(sampler_name="Euler", eta=1), image(sampler_name="Euler"))
    reply = server.post("/v1/images/generations", {"prompt": PROMPT, "sampler": "euler", "eta": 0.5})
    assert reply.status == 400 and "eta applies to the" in reply.message and "not euler" in reply.message
    reply = server.post("/sdapi/v1/txt2img", {**SMALL, "sampler_name": "Euler a", "eta": 1.5})
    assert reply.status == 400 and reply.message.startswith("eta: Input should be less than or equal to 1")


def test_karras_comes_from_the_scheduler_or_the_sampler_name(server):
    def infotext(**fields):
        reply = server.post("/sdapi/v1/txt2img", {**SMALL, "steps": 1, **fields})
        assert reply.status == 200, reply.message
        return json.loads(reply.body["info"])["infotexts"][0]

    assert "Karras" in infotext(sampler_name="DPM++ 2M", scheduler="Karras")
    assert "Karras" in infotext(sampler_name="DPM++ 2M Karras", scheduler="Automatic")
    assert "Karras" not in infotext(sampler_name="DPM++ 2M", scheduler="automatic")


def test_docs_and_openapi_describe_the_fields(server):
    from sdonnx.cli.server import MAX_PROMPT_CHARS
    from sdonnx.runtime.checks import MAX_GUIDANCE

    docs = server.get("/docs")
    assert docs.status == 200 and "swagger" in docs.text.lower()
    schema = server.get("/openapi.json").body
    models = schema["components"]["schemas"]
    txt2img = models["Txt2ImgRequest"]["properties"]
    assert {"maximum": MAX_GUIDANCE, "minimum": 0} .items() <= txt2img["cfg_scale"]["anyOf"][0].items()
    assert txt2img["prompt"]["maxLength"] == MAX_PROMPT_CHARS
    assert {"n_iter", "eta", "scheduler", "enable_hr", "override_settings"} <= set(txt2img)
    assert {"init_images", "mask", "denoising_strength", "resize_mode"} <= set(models["Img2ImgRequest"]["properties"])
    assert {"prompt", "n", "size", "response_format", "steps", "guidance"} <= set(models["ImagesRequest"]["properties"])
    edits = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert {"image", "mask", "prompt", "strength"} <= set(models[edits["multipart/form-data"]["schema"]["$ref"]
                                                               .rpartition("/")[2]]["properties"])
    assert {"/sdapi/v1/options", "/sdapi/v1/txt2img", "/v1/images/generations"} <= set(schema["paths"])
    answers = schema["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]
    assert {"200", "400", "413", "503"} <= set(answers) and "422" not in answers  # validation answers 400


def test_options_name_the_one_model(server):
    options = server.get("/sdapi/v1/options")
    assert options.status == 200 and options.body["sd_model_checkpoint"] == "default"
    assert server.post("/sdapi/v1/options", {"sd_model_checkpoint": "default"}).status == 200
    assert server.post("/sdapi/v1/options", options.body).status == 200  # what it read, written back
    assert server.post("/sdapi/v1/options", {"samples_save": False, "outdir_samples": "x"}).status == 200
    other = server.post("/sdapi/v1/options", {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"})
    assert other.status == 400 and "this server serves one model, 'default'" in other.message
    fixed = server.post("/sdapi/v1/options", {"eta_ancestral": 0.5})
    assert fixed.status == 400 and fixed.message == "options: eta_ancestral is fixed at 1.0 in sdonnx, got '0.5'"
    assert server.get("/sdapi/v1/options").body == options.body
    same = server.post("/sdapi/v1/txt2img", {**SMALL, "steps": 1,
                                            "override_settings": {"sd_model_checkpoint": "default"}})
    assert same.status == 200, same.message


def _edit(server, fields: dict, files: dict):
    body, headers = multipart(fields, files)
    return server.request("POST", "/v1/images/edits", raw=body, headers=headers)


def test_openai_edits_is_img2img_without_a_mask(server):
    from sdonnx.cli.server import EDIT_STRENGTH

    init = server.post("/sdapi/v1/txt2img", {**SMALL, "steps": 6, "seed": 5}).body["images"][0]
    # The fields the openai package's images.edit(image=..., prompt=..., n=2, ...) sends, and ours.
    fields = {"prompt": PROMPT, "n": 2, "response_format": "b64_json", "model": "dall-e-2", "steps": 6,
              "seed": 21}
    reply = _edit(server, fields, {"image": ("image.png", base64.b64decode(init), "image/png")})
    assert reply.status == 200, reply.message
    assert [d["seed"] for d in reply.body["data"]] == [21, 22]
    same = server.post("/sdapi/v1/img2img", {"prompt": PROMPT, "steps": 6, "seed": 21, "batch_size": 2,
                                            "init_images": [init], "denoising_strength": EDIT_STRENGTH})
    for edited, img2img in zip(reply.body["data"], same.body["images"]):
        assert np.array_equal(pixels(edited["b64_json"]), pixels(img2img))
    assert png(reply.body["data"][0]["b64_json"]).size == (64, 64)  # the image's own size
    sized = _edit(server, {**fields, "n": 1, "size": "128x64", "strength": 0.3},
                  {"image": ("image.png", base64.b64decode(init), "image/png")})
    assert sized.status == 200 and png(sized.body["data"][0]["b64_json"]).size == (128, 64)


@pytest.mark.parametrize("fields, files, message", [
    ({"prompt": PROMPT}, ("image", "mask"), "mask: a mask needs an inpainting model; default is not one"),
    ({"prompt": PROMPT}, (), "image: required"),
    ({"prompt": PROMPT, "guidance": "nan"}, ("image",), "guidance: Input should be a finite number"),
    ({"prompt": "x" * 5000}, ("image",), "prompt: at most 4000 characters, got 5000"),
    ({"prompt": PROMPT, "response_format": "url"}, ("image",), "response_format: only b64_json"),
    ({"prompt": PROMPT, "strength": "2"}, ("image",), "strength: Input should be less than or equal to 1"),
])
def test_openai_edits_refusals(server, fields, files, message):
    picture = {"image": Image.new("RGB", (64, 64), "white"), "mask": Image.new("RGBA", (64, 64))}
    sent = {name: (f"{name}.png", base64.b64decode(b64_png(picture[name])), "image/png") for name in files}
    reply = _edit(server, fields, sent)
    assert reply.status == 400 and reply.message.startswith(message), (reply.status, reply.message)
    assert healthy(server)


def test_openai_mask_transparent_is_repainted():
    from sdonnx.cli.server import openai_mask

    mask = Image.new("RGBA", (8, 4), (255, 255, 255, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 4, 4))  # the left half transparent: edit there
    mask.putpixel((7, 3), (0, 0, 0, 1))  # barely opaque: kept
    converted = np.asarray(openai_mask(base64.b64decode(b64_png(mask))))
    assert converted.shape == (4, 8)
    assert (converted[:, :4] == 255).all() and (converted[:, 4:] == 0).all()


ENDPOINTS = [("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/images/generations"),
             ("POST", "/v1/images/edits"), ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img"),
             ("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/interrupt"), ("GET", "/sdapi/v1/samplers"),
             ("GET", "/sdapi/v1/schedulers"), ("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/options"),
             ("POST", "/sdapi/v1/options"), ("GET", "/docs"), ("GET", "/openapi.json")]


@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_api_key_guards_every_endpoint(keyed, method, path):
    body = None if method == "GET" else {}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                    {"Authorization": "Basic " + base64.b64encode(b"user:wrong").decode()}):
        reply = keyed.request(method, path, body, headers=headers)
        assert reply.status == 401 and "API key" in reply.message, (headers, reply.status)
        assert reply.headers.get("www-authenticate", reply.headers.get("WWW-Authenticate")) == 'Basic realm="sdonnx"'


def test_api_key_accepted_as_bearer_or_basic_password(keyed):
    bearer = {"Authorization": "Bearer s3cret"}
    assert keyed.get("/health", headers=bearer).status == 200
    assert keyed.get("/docs", headers=bearer).status == 200
    assert keyed.get("/openapi.json", headers=bearer).body["info"]["title"] == "sdonnx"
    basic = {"Authorization": "Basic " + base64.b64encode(b"anyone:s3cret").decode()}
    reply = keyed.post("/v1/images/generations", {"prompt": PROMPT, "steps": 2}, headers=basic)
    assert reply.status == 200 and png(reply.body["data"][0]["b64_json"]).size == (shapes.IMAGE_SIZE,) * 2


def test_serve_refuses_a_taken_port_and_bad_options(server):
    port = str(urlparse(server.url).port)
    cli = [sys.executable, "-c", "from sdonnx.cli.app import main; main()", "serve"]
    taken = subprocess.run(cli + ["--port", port], capture_output=True, text=True, timeout=60)
    assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
    empty = subprocess.run(cli + ["--port", "0", "--api-key", " "], capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "--api-key is empty" in empty.stderr
    assert healthy(server)


def test_an_init_image_over_the_size_limit_is_refused_not_generated(server):
    """Without width and height the init image's own size counts, and it must stay within
    MAX_SIDE; an upload of more than MAX_UPLOAD_PIXELS is refused before it is decoded."""
    from sdonnx.cli.server import MAX_SIDE

    wide = b64_png(Image.new("RGB", (MAX_SIDE + 64, 64), "white"))
    for path, body in (("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": [wide]}),):
        reply = server.post(path, body)
        assert reply.status == 400 and f"outside 8..{MAX_SIDE} pixels per side" in reply.message, reply.message
    reply = _edit(server, {"prompt": PROMPT}, {"image": ("i.png", base64.b64decode(wide), "image/png")})
    assert reply.status == 400 and f"outside 8..{MAX_SIDE} pixels per side" in reply.message, reply.message
    huge = b64_png(Image.new("1", (4 * MAX_SIDE + 8, MAX_SIDE)))  # 1-bit: a small file, many pixels
    reply = server.post("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": [huge], "width": 64, "height": 64})
    assert reply.status == 400 and "pixels accepted here" in reply.message, reply.message
    assert healthy(server)


def test_an_empty_mask_is_no_mask_as_before(server):
    init = b64_png(Image.new("RGB", (64, 64), "white"))
    reply = server.post("/sdapi/v1/img2img", {**SMALL, "init_images": [init], "mask": ""})
    assert reply.status == 200, reply.message


def test_an_openai_mask_without_a_transparent_pixel_is_refused():
    from sdonnx.cli.server import openai_mask
    from sdonnx.runtime.errors import InputError

    with pytest.raises(InputError, match="no transparent pixel"):
        openai_mask(base64.b64decode(b64_png(Image.new("RGB", (8, 8), "white"))))


def rss_mb(server) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@pytest.mark.parametrize("provider", ["cpu", pytest.param("openvino", marks=needs_openvino)])
def test_the_server_holds_its_memory_over_100_requests_of_mixed_sizes(provider):
    """No leak and no growth per new size: the resident set after 100 requests cycling through
    four sizes (OpenVINO keeps four compiled shapes) and both endpoints stays within 10% of the
    one after the first 10, which have seen every size."""
    sizes = ["64x64", "128x128", "96x160", "192x128"]
    s = Server("--provider", provider, "--queue", "2")
    try:
        after = {}
        for i in range(100):
            width, height = (int(v) for v in sizes[i % len(sizes)].split("x"))
            if i % 2:
                reply = s.post("/v1/images/generations", {"prompt": PROMPT, "size": sizes[i % len(sizes)],
                                                          "steps": 2, "seed": i})
            else:
                reply = s.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "width": width, "height": height,
                                                     "steps": 2, "seed": i})
            assert reply.status == 200, reply.message
            if i + 1 in (10, 100):
                after[i + 1] = rss_mb(s)
        print(f"\n{provider}: RSS after 10 requests {after[10]:.0f} MB, after 100 {after[100]:.0f} MB")
        assert after[100] <= after[10] * 1.10
    finally:
        s.stop()
