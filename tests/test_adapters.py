"""LoRAs and textual-inversion embeddings on an exported folder, against diffusers.

The LoRA files are written here with random weights, in kohya/A1111's format and in the
PEFT format diffusers saves; the reference is diffusers' `load_lora_weights` (+ `fuse_lora`
or `set_adapters`) and `load_textual_inversion` on the tiny torch model the folder was
exported from. diffusers 0.39 drops the text encoder's *attention* layers of a kohya file
("unexpected keys ... to_q_lora"), so the kohya file's text-encoder layers are the MLP ones
and the PEFT file carries the text encoder's attention.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from sdonnx import Pipeline
from sdonnx.runtime import adapters
from sdonnx.runtime.errors import InputError

from conftest import _reference, psnr

PARITY_DB = 45.0
SIZE, STEPS = 64, 4
PROMPT, NEGATIVE = "a red circle", "blurry"


def latents(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)


def ours(pipe, prompt=PROMPT, **options) -> np.ndarray:
    image = pipe.generate(prompt, negative_prompt=NEGATIVE, steps=STEPS, guidance=7.5, width=SIZE, height=SIZE,
                          latents=latents(), sampler="euler", **options)[0]
    return np.asarray(image)


def theirs(reference, prompt=PROMPT) -> np.ndarray:
    out = reference(prompt, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, width=SIZE,
                    height=SIZE, latents=torch.from_numpy(latents()), output_type="np").images[0]
    return (out * 255).round().astype(np.uint8)


def _pairs(modules: dict, names: list[str], rank: int, seed: int, amplitude: float = 0.3):
    rng = np.random.default_rng(seed)
    for name in names:
        weight = modules[name].weight
        down = (rank, weight.shape[1], *weight.shape[2:])
        up = (weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []))
        yield name, (torch.from_numpy(rng.standard_normal(down).astype(np.float32) * amplitude),
                     torch.from_numpy(rng.standard_normal(up).astype(np.float32) * amplitude))


def _layers(model, pattern: str) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and re.search(pattern, n)]


@pytest.fixture(scope="module")
def reference(tiny_source):
    pipe = _reference(tiny_source)
    import diffusers

    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def lora_files(reference, tmp_path_factory):
    """kohya: UNet attention linears, 1x1 proj_in/out convs and 3x3 resnet convs, text-encoder
    MLPs, alpha 2 of rank 4. PEFT: UNet feed-forwards and the text encoder's attention, rank 2,
    no alpha (scale 1)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("loras")
    unet = dict(reference.unet.named_modules())
    text = dict(reference.text_encoder.named_modules())
    kohya = {}
    for part, modules, names in (
        ("unet", unet, _layers(reference.unet, r"attn\d\.to_(q|k|v|out\.0)$|proj_(in|out)$|resnets\.0\.conv1$")),
        ("te", text, _layers(reference.text_encoder, r"mlp\.fc\d$")),
    ):
        for name, (down, up) in _pairs(modules, names, 4, seed=len(kohya)):
            key = f"lora_{part}_{name.replace('.', '_')}"
            kohya.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                          f"{key}.alpha": torch.tensor(2.0)})
    save_file(kohya, folder / "kohya_style.safetensors")
    peft = {}
    for prefix, modules, names in (
        ("unet", unet, _layers(reference.unet, r"ff\.net\.(0\.proj|2)$")),
        ("text_encoder", text, _layers(reference.text_encoder, r"self_attn\.(q|k|v|out)_proj$")),
    ):
        for name, (down, up) in _pairs(modules, names, 2, seed=100 + len(peft)):
            peft.update({f"{prefix}.{name}.lora_A.weight": down, f"{prefix}.{name}.lora_B.weight": up})
    save_file(peft, folder / "peft_detail.safetensors")
    return folder


@pytest.fixture
def fresh(tiny_onnx, lora_files):
    return Pipeline.load(tiny_onnx, provider="cpu", lora_dir=lora_files)


@pytest.fixture
def with_reference_lora(reference):
    """diffusers' pipeline with LoRAs loaded for one test, unloaded after."""
    loaded = []

    def load(path, name):
        reference.load_lora_weights(str(path), adapter_name=name)
        loaded.append(name)
        return reference

    yield load
    reference.unfuse_lora()
    reference.unload_lora_weights()


@pytest.mark.parametrize("name,scale", [("kohya_style", 0.7), ("peft_detail", 1.0)])
def test_a_lora_matches_diffusers(fresh, lora_files, with_reference_lora, name, scale):
    reference = with_reference_lora(lora_files / f"{name}.safetensors", name)
    reference.fuse_lora(lora_scale=scale)
    want = theirs(reference)
    base = ours(fresh)
    got = ours(fresh, loras=[(lora_files / f"{name}.safetensors", scale)])
    assert psnr(base, want) < 30, "the LoRA changes too little to test"
    assert psnr(got, want) >= PARITY_DB
    # Negative control: the same LoRA at another scale misses the bar.
    assert psnr(ours(fresh, loras=[(lora_files / f"{name}.safetensors", scale * 0.8)]), want) < PARITY_DB


def test_two_loras_at_once_match_diffusers(fresh, lora_files, with_reference_lora):
    with_reference_lora(lora_files / "kohya_style.safetensors", "kohya_style")
    reference = with_reference_lora(lora_files / "peft_detail.safetensors", "peft_detail")
    reference.set_adapters(["kohya_style", "peft_detail"], adapter_weights=[0.6, -0.5])
    want = theirs(reference)
    got = ours(fresh, loras=[(lora_files / "kohya_style.safetensors", 0.6),
                             (lora_files / "peft_detail.safetensors", -0.5)])
    assert psnr(got, want) >= PARITY_DB


def test_prompt_tags_equal_the_api_and_are_recorded(fresh, lora_files):
    by_api = fresh.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, width=SIZE, height=SIZE, latents=latents(),
                            loras=[("kohya_style", 0.7)])[0]
    by_tag = fresh.generate(PROMPT + " <lora:kohya_style:0.7>", negative_prompt=NEGATIVE, steps=STEPS, width=SIZE,
                            height=SIZE, latents=latents())[0]
    assert np.array_equal(np.asarray(by_api), np.asarray(by_tag))
    short = adapters.read_lora(lora_files / "kohya_style.safetensors").short_hash
    for image in (by_api, by_tag):
        first, *_, last = image.info["parameters"].splitlines()
        assert first == PROMPT + " <lora:kohya_style:0.7>"
        assert f'Lora hashes: "kohya_style: {short}"' in last


def test_scale_zero_and_switching_back_give_todays_image_exactly(fresh, lora_files):
    base = ours(fresh)
    assert np.array_equal(ours(fresh, loras=[(lora_files / "kohya_style.safetensors", 0.0)]), base)
    ours(fresh, loras=[(lora_files / "kohya_style.safetensors", 1.0)])
    assert np.array_equal(ours(fresh), base)


def test_switching_recomputes_only_what_changed(fresh, lora_files):
    kohya, peft = lora_files / "kohya_style.safetensors", lora_files / "peft_detail.safetensors"
    ours(fresh, loras=[(kohya, 0.5), (peft, 1.0)])
    patcher = fresh.adapters.patchers["unet"]
    before = {m: array for m, (_, array) in patcher._done.items()}
    ours(fresh, loras=[(kohya, 0.5), (peft, 0.3)])
    after = {m: array for m, (_, array) in patcher._done.items()}
    kept = [m for m in after if after[m] is before.get(m)]
    redone = [m for m in after if after[m] is not before.get(m)]
    assert kept and all(".ff." not in m for m in kept)  # only the kohya layers, untouched
    assert redone and all(".ff." in m for m in redone)  # the PEFT layers, whose scale changed


def test_openvino_applies_the_same_lora(tiny_onnx, lora_files):
    pytest.importorskip("openvino")
    cpu = Pipeline.load(tiny_onnx, provider="cpu")
    openvino = Pipeline.load(tiny_onnx, provider="openvino", precision="fp32")
    use = [(lora_files / "kohya_style.safetensors", 0.7)]
    want = ours(cpu, loras=use)
    assert psnr(ours(openvino, loras=use), want) >= PARITY_DB
    assert psnr(ours(openvino), want) < PARITY_DB  # and without it, it differs


def test_the_map_derived_from_the_graph_equals_the_recorded_one(tiny_onnx):
    for part in ("unet", "text_encoder"):
        recorded = adapters.WeightMap.load(tiny_onnx / part / "model.onnx")
        derived = adapters.derive_weight_map(tiny_onnx / part / "model.onnx")
        assert recorded.modules == derived.modules and len(recorded.modules) > 10


def test_a_folder_without_a_map_derives_it(tiny_onnx, lora_files, tmp_path):
    import shutil

    copy_ = tmp_path / "copy"
    shutil.copytree(tiny_onnx, copy_)
    for part in ("unet", "text_encoder"):
        (copy_ / part / adapters.WEIGHT_MAP_FILE).unlink()
    use = [(lora_files / "kohya_style.safetensors", 0.7)]
    assert np.array_equal(ours(Pipeline.load(copy_, provider="cpu"), loras=use),
                          ours(Pipeline.load(tiny_onnx, provider="cpu"), loras=use))


# --- textual inversion ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_files(reference, tmp_path_factory):
    """An AUTOMATIC1111 .pt (2 vectors) and a diffusers learned_embeds.safetensors (1 vector)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("embeddings")
    width = reference.text_encoder.config.hidden_size
    rng = np.random.default_rng(7)
    vectors = torch.from_numpy(rng.standard_normal((2, width)).astype(np.float32))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
                "name": "sparkly", "step": 500}, folder / "sparkly.pt")
    save_file({"<glow>": torch.from_numpy(rng.standard_normal(width).astype(np.float32))},
              folder / "glowing.safetensors")
    return folder


@pytest.mark.parametrize("name,prompt", [("sparkly", "a sparkly red circle"), ("glowing", "a glowing red circle")])
def test_an_embedding_matches_diffusers(tiny_onnx, reference, embedding_files, name, prompt):
    path = next(embedding_files.glob(f"{name}.*"))
    pipe = Pipeline.load(tiny_onnx, provider="cpu", embeddings_dir=embedding_files)
    reference = copy.copy(reference)
    reference.tokenizer = copy.deepcopy(reference.tokenizer)
    reference.text_encoder = copy.deepcopy(reference.text_encoder)
    reference.load_textual_inversion(str(path), token=name)
    pipe.adapters.prepare(prompt)
    got = pipe.encode_prompt(prompt)
    with torch.no_grad():
        want = reference.encode_prompt(prompt, "cpu", 1, False)[0].numpy()
    assert np.abs(got - want).max() <= 1e-5
    plain = Pipeline.load(tiny_onnx, provider="cpu").encode_prompt(prompt)
    assert np.abs(plain - want).max() > 1e-2  # negative control: without the embedding it differs
    assert psnr(ours(pipe, prompt), theirs(reference, prompt)) >= PARITY_DB
    assert f"TI hashes: \"{name}: " in pipe.generate(prompt, steps=1, width=SIZE, height=SIZE)[0].info["parameters"]


# --- bad input ------------------------------------------------------------------------------


def _expect_unharmed(pipe, base):
    assert np.array_equal(ours(pipe), base)


def test_a_lora_for_another_base_is_refused_and_the_model_unharmed(fresh, tmp_path):
    from safetensors.torch import save_file

    base = ours(fresh)
    # An SD 2.x-shaped layer: cross-attention keys from a 1024-wide text encoder.
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 1024), f"{key}.lora_up.weight": torch.zeros(64, 4)},
              tmp_path / "sd2.safetensors")
    with pytest.raises(InputError, match="another base model"):
        ours(fresh, loras=[tmp_path / "sd2.safetensors"])
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"  # SDXL's original layout
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 64), f"{key}.lora_up.weight": torch.zeros(64, 4)},
              tmp_path / "sdxl.safetensors")
    with pytest.raises(InputError, match="another architecture"):
        ours(fresh, loras=[tmp_path / "sdxl.safetensors"])
    _expect_unharmed(fresh, base)


@pytest.mark.parametrize("content,message", [
    ({"weight": torch.zeros(3)}, "is not a LoRA"),
    ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}, "LoHa"),
    ({"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, "LoKr"),
    ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
      "lora_unet_x.dora_scale": torch.zeros(1, 4)}, "DoRA"),
    ({"lora_unet_x.lora_down.weight": torch.full((2, 4), float("nan")),
      "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}, "NaN"),
])
def test_files_that_are_not_plain_loras_are_refused_by_name(fresh, tmp_path, content, message):
    from safetensors.torch import save_file

    save_file(content, tmp_path / "file.safetensors")
    with pytest.raises(InputError, match=message):
        ours(fresh, loras=[tmp_path / "file.safetensors"])


def test_text_that_is_not_a_tensor_file_is_refused(fresh, tmp_path):
    (tmp_path / "notes.safetensors").write_text("not tensors")
    with pytest.raises(InputError, match="not a safetensors file"):
        ours(fresh, loras=[tmp_path / "notes.safetensors"])


@pytest.mark.parametrize("prompt,message", [
    ("a cat <lora:missing:0.5>", "'missing' not found"),
    ("a cat <lora:kohya_style:nan>", "finite number"),
    ("a cat <lora:kohya_style:1e9>", "finite number"),
    ("a cat <lora:kohya_style:strong>", "must be a number"),
    ("a cat <hypernet:style:1>", "only <lora"),
])
def test_bad_tags_get_one_line_each(fresh, prompt, message):
    base = ours(fresh)
    with pytest.raises(InputError, match=message) as caught:
        ours(fresh, prompt=prompt)
    assert "\n" not in str(caught.value)
    _expect_unharmed(fresh, base)


def test_a_prompt_tag_cannot_name_a_file_outside_the_lora_folder(fresh, lora_files):
    """A server takes prompts from anyone: a tag is a name in --lora-dir, never a path."""
    with pytest.raises(InputError, match="never a path"):
        ours(fresh, prompt=f"a cat <lora:{lora_files / 'kohya_style.safetensors'}:0.5>")


def test_an_embedding_longer_than_a_window_is_refused(tiny_onnx, tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(80, 32)}}, tmp_path / "long.pt")
    pipe = Pipeline.load(tiny_onnx, provider="cpu", embeddings_dir=tmp_path)
    with pytest.raises(InputError, match="80 vectors"):
        ours(pipe, prompt="a long circle")


def test_an_embedding_of_another_width_is_refused(tiny_onnx, tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}}, tmp_path / "wide.pt")
    pipe = Pipeline.load(tiny_onnx, provider="cpu", embeddings_dir=tmp_path)
    with pytest.raises(InputError, match="width 768"):
        ours(pipe, prompt="a wide circle")


def test_a_pickle_that_would_run_code_is_not_run(tiny_onnx, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"string_to_param": {"*": Payload()}}, tmp_path / "evil.pt")
    pipe = Pipeline.load(tiny_onnx, provider="cpu", embeddings_dir=tmp_path)
    with pytest.raises(InputError, match="could run code"):
        ours(pipe, prompt="an evil circle")


def test_an_int8_folder_refuses_loras(tiny_onnx, tmp_path, lora_files):
    import json
    import shutil

    copy_ = tmp_path / "int8"
    shutil.copytree(tiny_onnx, copy_)
    record = json.loads((copy_ / "sdonnx.json").read_text())
    record["parts"]["unet"]["precision"] = "int8 weights and activations"
    (copy_ / "sdonnx.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="int8"):
        ours(Pipeline.load(copy_, provider="cpu"), loras=[lora_files / "kohya_style.safetensors"])


# --- the command line and the server, on the embedded model ----------------------------------


@pytest.fixture(scope="module")
def default_lora(tmp_path_factory):
    """A kohya LoRA for the embedded model (rank 4, attention and resnet convs), written
    with numpy from the model's weight map."""
    from safetensors.numpy import save_file

    from sdonnx.runtime.pipeline import default_model_path

    modules = adapters.WeightMap.load(default_model_path() / "unet" / "model.onnx").modules
    rng = np.random.default_rng(3)
    tensors = {}
    for name, weight in modules.items():
        if not re.search(r"attn\d\.to_(q|v)$|resnets\.\d\.conv1$", name):
            continue
        shape = weight.torch_shape
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = rng.standard_normal((4, *shape[1:]), dtype=np.float32) * 0.3
        tensors[f"{key}.lora_up.weight"] = rng.standard_normal((shape[0], 4, *([1, 1] if len(shape) == 4 else [])),
                                                               dtype=np.float32) * 0.3
    folder = tmp_path_factory.mktemp("default-loras")
    save_file(tensors, folder / "style.safetensors")
    return folder


def _cli(*args: str, check: bool = True):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "from sdonnx.cli.app import main; main()", *args],
                          capture_output=True, text=True, check=check)


def test_the_command_line_takes_lora_files_and_tags_alike(default_lora, tmp_path):
    from PIL import Image

    common = ["--seed", "5", "--steps", "6", "--size", "64x64", "--provider", "cpu"]
    _cli("generate", "a red circle", "--lora", f"{default_lora / 'style.safetensors'}:0.8", *common,
         "--out", str(tmp_path / "file.png"))
    _cli("generate", "a red circle <lora:style:0.8>", "--lora-dir", str(default_lora), *common,
         "--out", str(tmp_path / "tag.png"))
    _cli("generate", "a red circle", *common, "--out", str(tmp_path / "plain.png"))
    by_file, by_tag, plain = (np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB"))
                              for n in ("file", "tag", "plain"))
    assert np.array_equal(by_file, by_tag)
    assert psnr(by_file, plain) < 35
    api = Pipeline.load(provider="cpu").generate("a red circle", seed=5, steps=6, width=64, height=64,
                                                 loras=[(default_lora / "style.safetensors", 0.8)])[0]
    assert np.array_equal(np.asarray(api), by_file)
    missing = _cli("generate", "a cat <lora:nothere>", "--lora-dir", str(default_lora), *common,
                   "--out", str(tmp_path / "x.png"), check=False)
    assert missing.returncode == 2 and "'nothere' not found" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1 and not (tmp_path / "x.png").exists()  # one line, no blank
    bad_scale = _cli("generate", "a cat", "--lora", f"{default_lora / 'style.safetensors'}:abc", *common,
                     "--out", str(tmp_path / "y.png"), check=False)
    assert bad_scale.returncode == 2 and "must be a number" in bad_scale.stderr


def test_the_server_applies_each_requests_loras(default_lora):
    pytest.importorskip("fastapi")
    from serving import Server, png

    from sdonnx import Pipeline as P

    pipe = P.load(provider="cpu", lora_dir=default_lora)
    settings = dict(seed=5, steps=6, width=64, height=64, guidance=5.0, sampler="euler")
    want = np.asarray(pipe.generate("a red circle <lora:style:0.8>", **settings)[0])
    plain = np.asarray(pipe.generate("a red circle", **settings)[0])
    server = Server("--provider", "cpu", "--lora-dir", str(default_lora))
    try:
        assert [entry["name"] for entry in server.get("/sdapi/v1/loras").body] == ["style"]
        for prompt, expected in (("a red circle <lora:style:0.8>", want), ("a red circle", plain),
                                 ("a red circle <lora:style:0.8>", want)):
            reply = server.post("/sdapi/v1/txt2img", {"prompt": prompt, "seed": 5, "steps": 6, "width": 64,
                                                     "height": 64, "cfg_scale": 5, "sampler_name": "Euler"})
            assert reply.status == 200, reply.message
            assert np.array_equal(np.asarray(png(reply.body["images"][0]).convert("RGB")), expected)
        reply = server.post("/v1/images/generations", {"prompt": "a red circle <lora:style:0.8>", "size": "64x64",
                                                       "seed": 5, "steps": 6, "guidance": 5, "sampler": "euler",
                                                       "response_format": "b64_json"})
        assert np.array_equal(np.asarray(png(reply.body["data"][0]["b64_json"]).convert("RGB")), want)
        bad = server.post("/sdapi/v1/txt2img", {"prompt": "a cat <lora:nothere:1>", "steps": 2, "width": 64,
                                               "height": 64})
        assert bad.status == 400 and "'nothere' not found" in bad.message
    finally:
        server.stop()


def test_a_lora_on_weights_inside_the_graph_file_matches_diffusers(default_lora):
    """The embedded model keeps its weights inside model.onnx (another onnxruntime path)."""
    import diffusers

    from sdonnx.runtime.pipeline import default_model_path

    source = default_model_path().parent / "default-diffusers"
    reference = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                                  torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    pipe = Pipeline.load(provider="cpu")
    plain = ours(pipe)
    reference.load_lora_weights(str(default_lora / "style.safetensors"))
    reference.fuse_lora(lora_scale=0.8)
    want = theirs(reference)
    assert psnr(plain, want) < 35
    assert psnr(ours(pipe, loras=[(default_lora / "style.safetensors", 0.8)]), want) >= PARITY_DB
