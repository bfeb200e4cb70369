"""`sdonnx serve` on loopback: OpenAI's images API, AUTOMATIC1111's /sdapi/v1, the page, limits.

Each server is a real `sdonnx serve` process on the embedded default model (128 px, ONNX
Runtime CPU), driven over HTTP; after every error case the server must still be healthy.
"""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import numpy as np
import pytest

from serving import Server, load, png
from sdonnx.models import shapes

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
    from PIL import Image

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
    ("/v1/images/generations", {"prompt": PROMPT, "n": 0}, 400, "n: 0 is outside 1..8"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "sampler_name": "Euler z"}, 400, "unknown sampler 'Euler z'"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "width": 100}, 400, "multiples of 32"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 0}, 400, "steps: 0 is outside 1..150"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": "ten"}, 400, "steps: expected an integer"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "cfg_scale": -1}, 400, "cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": 3}, 400, "prompt: expected a string"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT}, 400, "init_images: expected a list"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": ["/etc/passwd"]}, 400, "not valid base64"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": [base64.b64encode(b"not an image").decode()]},
     400, "not a readable image"),
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


def _send_raw(server: Server, head: str, chunks) -> tuple[int, str]:
    """Send a request by hand (oversized or chunked bodies); the server may answer early."""
    url = urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.putrequest("POST", "/sdapi/v1/txt2img")
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


def test_oversized_bodies_get_413(server):
    size = 17 * 2**20
    status, text = _send_raw(server, [("Content-Type", "application/json"), ("Content-Length", str(size))],
                             [b" " * 2**20] * 17)
    assert status == 413 and "request body over 16 MB" in text
    # Without a Content-Length (chunked), the limit is enforced while reading.
    chunk = b" " * 2**20
    framed = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 17 + [b"0\r\n\r\n"]
    status, text = _send_raw(server, [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
                             framed)
    assert status == 413 and "request body over 16 MB" in text
    assert healthy(server)


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


ENDPOINTS = [("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/images/generations"),
             ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img"), ("GET", "/sdapi/v1/progress"),
             ("POST", "/sdapi/v1/interrupt"), ("GET", "/sdapi/v1/samplers"), ("GET", "/sdapi/v1/sd-models")]


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
