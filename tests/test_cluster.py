"""`sdonnx batch --ray` and `sdonnx serve --ray` on a real two-node Ray cluster (head and a
second node, separate processes) inside a network namespace with only loopback (issue 25;
tests/ray_cluster.py). Images are compared pixel for pixel with `sdonnx generate` and the
single-process server on the embedded model."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ray_cluster import LoopbackNamespace, RayCluster
from serving import Client, Server, png
from test_batch import pixels, results, sdonnx, write_jobs

PROMPTS = ["a red circle on a white background", "a blue square", "a green triangle on black", "two yellow stars"]
STEPS = 8
SDONNX = [sys.executable, "-m", "sdonnx.cli.app"]


@pytest.fixture(scope="module")
def namespace():
    space = LoopbackNamespace()
    yield space
    space.close()


@pytest.fixture(scope="module")
def cluster(namespace, tmp_path_factory):
    cache = tmp_path_factory.mktemp("node-cache")
    ray = RayCluster(namespace, cpus=1, env={"SDONNX_CACHE_DIR": str(cache)})
    ray.cache = cache
    yield ray
    ray.stop()


def test_the_namespace_has_only_loopback(namespace):
    devices = {line.split()[1] for line in namespace.interfaces().splitlines()}
    assert devices == {"lo"}
    assert "127.0.0.1/8" in namespace.interfaces()


def test_a_batch_on_two_nodes_survives_a_killed_worker_and_resumes(cluster, namespace, tmp_path):
    assert cluster.nodes() == 2
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      [{"prompt": prompt, "seed": 100 * p + i, "steps": STEPS} for p, prompt in enumerate(PROMPTS)
                       for i in range(10)])
    out = tmp_path / "out"
    command = [*namespace.prefix, *SDONNX, "batch", str(jobs), "--out", str(out), "--ray", cluster.address,
               "--workers", "2", "--threads", "1", "--provider", "cpu"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)
    killed = None
    deadline = time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline:
        written = (out / "results.jsonl").read_text().count("\n") if (out / "results.jsonl").exists() else 0
        pids = namespace.processes("ray::BatchWorker")
        if killed is None and written >= 8 and len(pids) == 2:
            killed = pids[0]
            subprocess.run(["kill", "-9", str(killed)], check=True)
        time.sleep(0.05)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr
    assert killed is not None, "the batch ended before a worker could be killed"
    assert "a worker died" in stderr
    records = results(out)
    files = [r["file"] for r in records]
    assert len(records) == 40 and len(set(files)) == 40
    assert sorted(files) == sorted(p.name for p in out.glob("*.png"))
    assert not list(out.glob(".sdonnx-*.tmp"))  # no temporary file left behind
    nodes = {re.search(r"node (\w+)", r["worker"])[1] for r in records}
    assert len(nodes) == 2, nodes  # both nodes drew
    assert any(re.search(rf"pid {killed}$", r["worker"]) for r in records)  # the killed worker had drawn

    # Every image is what `sdonnx generate` draws: image j of --n-iter 10 uses seed + j.
    for p, prompt in enumerate(PROMPTS):
        reference = tmp_path / f"reference-{p}"
        done = sdonnx("generate", prompt, "--seed", 100 * p, "--steps", STEPS, "--n-iter", 10, "--provider", "cpu",
                      "--out", reference)
        assert done.returncode == 0, done.stderr
        for i in range(10):
            seed = 100 * p + i
            [mine] = [r for r in records if r["job"]["seed"] == seed]
            [theirs] = reference.glob(f"*-{seed}.png")
            assert np.array_equal(pixels(out / mine["file"]), pixels(theirs)), (prompt, seed)
    # Negative control: neighbouring seeds differ, so the comparison can fail.
    assert not np.array_equal(pixels(out / "00001-0.png"), pixels(out / "00002-1.png"))

    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=cluster.env)
    assert again.returncode == 0, again.stderr
    assert "all 40 images" in again.stdout and "nothing to draw" in again.stdout
    assert len(results(out)) == 40


def test_shipping_the_model_through_the_object_store(cluster, namespace, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": PROMPTS[0], "seed": i, "steps": STEPS} for i in range(4)])
    shipped, read = tmp_path / "shipped", tmp_path / "read"
    for out, extra in ((shipped, ["--ship-model"]), (read, [])):
        done = subprocess.run([*namespace.prefix, *SDONNX, "batch", str(jobs), "--out", str(out), "--ray",
                               cluster.address, "--provider", "cpu", *extra], capture_output=True, text=True,
                              timeout=300, env=cluster.env)
        assert done.returncode == 0, done.stderr
        assert "with 2 Ray workers" in done.stdout
    copies = list((cluster.cache / "ray-models").iterdir())
    assert len(copies) == 1 and (copies[0] / "default" / "model_index.json").is_file()  # one per node (one disk here)
    for record in results(shipped):
        assert (shipped / record["file"]).read_bytes() == (read / record["file"]).read_bytes()


def test_a_job_the_model_refuses_on_a_worker_fails_alone(cluster, namespace, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": PROMPTS[0], "seed": 1, "steps": STEPS},
                                                {"prompt": "x <lora:missing:1>", "seed": 2, "steps": STEPS}])
    out = tmp_path / "out"
    done = subprocess.run([*namespace.prefix, *SDONNX, "batch", str(jobs), "--out", str(out), "--ray", cluster.address,
                           "--provider", "cpu", "--lora-dir", str(tmp_path / "loras")], capture_output=True, text=True,
                          timeout=300, env=cluster.env)
    assert done.returncode == 2
    assert "line 2 (00002-2.png)" in done.stderr and "missing" in done.stderr and "Traceback" not in done.stderr
    assert [r["file"] for r in results(out)] == ["00001-1.png"]


def test_serve_on_two_replicas_answers_20_concurrent_requests(cluster, namespace, tmp_path):
    port = 8311
    # --ship-model: the replicas load the folder shipped through the object store.
    command = [*namespace.prefix, *SDONNX, "serve", "--ray", cluster.address, "--replicas", "2", "--threads", "1",
               "--port", str(port), "--queue", "10", "--provider", "cpu", "--ship-model"]
    served = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster.env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(served.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not any("serving" in line for line in lines) and served.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any("from 2 Ray Serve replicas" in line for line in lines), "".join(lines)
        bodies = [{"prompt": PROMPTS[i % 4], "seed": i, "steps": STEPS} for i in range(20)]

        def ask_all():
            client = Client(f"http://127.0.0.1:{port}")
            gate = threading.Barrier(20)

            def one(body):
                gate.wait()
                return client.post("/sdapi/v1/txt2img", body)

            with ThreadPoolExecutor(20) as pool:
                return list(pool.map(one, bodies))

        replies = namespace.call(ask_all)
    finally:
        # SIGTERM, as a service manager stops it: a test run started in the background (nohup ... &,
        # as CI is) hands its children SIGINT ignored, and Python then keeps ignoring it.
        served.send_signal(signal.SIGTERM)
        try:
            served.wait(120)
        except subprocess.TimeoutExpired:
            served.kill()
            raise AssertionError("sdonnx serve --ray did not stop on SIGTERM within 120 s:\n" + "".join(lines))
    assert served.returncode == 130, "".join(lines)
    # Serve's proxy outlives the app: the next `serve --ray` joins it (--port 0: its port), and
    # one asking for another port is told which one it has.
    base = [*namespace.prefix, *SDONNX, "serve", "--ray", cluster.address, "--replicas", "1", "--threads", "1",
            "--provider", "cpu"]
    elsewhere = subprocess.run([*base, "--port", str(port + 1)], capture_output=True, text=True, timeout=120,
                               env=cluster.env)
    assert elsewhere.returncode == 2 and f"proxy on 127.0.0.1:{port}; give --host 127.0.0.1 --port {port}" \
        in elsewhere.stderr, elsewhere.stderr
    again = subprocess.Popen([*base, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=cluster.env)
    try:
        for line in again.stdout:
            if "serving" in line:
                assert f"on http://127.0.0.1:{port}/ from 1 Ray Serve replica;" in line
                break
        else:
            raise AssertionError("the second sdonnx serve --ray did not start")
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(120)
    assert [r.status for r in replies] == [200] * 20, [r.text[:200] for r in replies if r.status != 200]

    single = Server("--threads", "1", "--provider", "cpu")
    try:
        for body, reply in zip(bodies, replies):
            expected = single.post("/sdapi/v1/txt2img", body)
            assert expected.status == 200
            got, want = png(reply.body["images"][0]), png(expected.body["images"][0])
            assert np.array_equal(np.asarray(got), np.asarray(want)), body
            assert json.loads(reply.body["info"])["all_seeds"] == [body["seed"]]
        # Negative control: the comparison tells two seeds apart.
        assert not np.array_equal(np.asarray(png(replies[0].body["images"][0])),
                                  np.asarray(png(replies[4].body["images"][0])))
    finally:
        single.stop()
