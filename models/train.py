"""Train the embedded default model: a tiny Stable Diffusion on captioned shapes (see shapes.py).

The three parts have the SD 1.x architecture (CLIP text encoder with the real CLIP vocabulary,
cross-attention UNet, KL autoencoder with a latent downscale of 8) and are trained from scratch
on CPU with diffusers/torch, seeded: first the autoencoder, then the UNet and text encoder
together on its latents (epsilon prediction, SD 1.5's noise schedule, 10% empty captions for
classifier-free guidance). Writes a diffusers folder with fp16 weights and `training.json`
(settings, time, loss curve).

    python models/train.py models/stage1 --vae-minutes 12 --decoder-minutes 20 --unet-minutes 48
    python models/train.py models/next --decoder-only models/stage1 --decoder-minutes 14

The first run trains the autoencoder, then its decoder alone on the fixed latent space (the
joint run's moving encoder keeps the reconstruction blurry; a frozen encoder lets the decoder
learn sharp shapes), then the UNet. `--decoder-only` continues a trained pipeline's decoder;
the latent space stays, so the UNet stays valid. The Makefile's `default-model` target replays
the runs that made models/default.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdonnx.models import shapes

UNET = dict(
    block_out_channels=(48, 96, 96),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)
VAE = dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=16)
TEXT = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999


def build(out: Path, seed: int):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdonnx.export.clip_vocab import write_tokenizer_files
    from sdonnx.export.synthetic import SD15_SCHEDULER

    torch.manual_seed(seed)
    write_tokenizer_files(out / "tokenizer")
    tokenizer = CLIPTokenizer(out / "tokenizer" / "vocab.json", out / "tokenizer" / "merges.txt",
                              pad_token="<|endoftext|>", model_max_length=77)
    size = IMAGE_SIZE
    unet = UNet2DConditionModel(sample_size=size // 8, in_channels=4, out_channels=4, **UNET)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=size,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, **VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32, **TEXT))
    return tokenizer, unet, vae, text_encoder, PNDMScheduler(**SD15_SCHEDULER)


class LossLog:
    """Running mean of a part's loss, appended to the record every `every` steps and printed."""

    def __init__(self, log: list, part: str, every: int):
        self.log, self.part, self.every, self.values = log, part, every, []

    def add(self, step: int, loss: float) -> None:
        self.values.append(loss)
        if step % self.every == 0:
            mean = float(np.mean(self.values))
            self.log.append({"part": self.part, "step": step, "loss": round(mean, 5)})
            print(f"{self.part} step {step} loss {mean:.4f}", flush=True)
            self.values = []


def save(pipe, out: Path, record: dict) -> None:
    """fp16 weights, SD 1.5's explicit `clip_sample: false`, the training record; then rename."""
    tmp = out.with_name(out.name + ".partial")
    pipe.to("cpu").to(torch.float16).save_pretrained(tmp)
    config_file = tmp / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "clip_sample": False}, indent=2))
    (tmp / "training.json").write_text(json.dumps(record, indent=1))
    tmp.rename(out)


LR_SCHEDULES = ("cosine", "constant")
LR_SCHEDULE = "cosine"  # set from --lr-schedule
IMAGE_SIZE = shapes.IMAGE_SIZE  # set from --image-size
DEVICE = "cpu"  # set from --device


class Schedule:
    """Learning rate over a budget of `steps`, or of wall-clock `minutes` when `steps` is None:
    100 steps of warm-up, then cosine decay to 5% (or the peak throughout with --lr-schedule
    constant, as the first default model's runs).

    A budget in steps gives the same model on any machine (a GPU can try a recipe that takes
    90 minutes here); one in minutes, as the runs that made the first default models, does not.
    """

    def __init__(self, optimizer, peak: float, minutes: float, steps: int | None = None):
        self.optimizer, self.peak, self.steps = optimizer, peak, steps
        self.start, self.seconds = time.time(), minutes * 60

    def running(self, step: int) -> bool:
        if self.steps is not None:
            done = step / self.steps if self.steps > 0 else 1.0
        else:
            done = (time.time() - self.start) / self.seconds if self.seconds > 0 else 1.0
        if done >= 1:
            return False
        lr = self.peak
        if LR_SCHEDULE == "cosine":
            lr *= min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return True


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) 1.0 where a training image is not its plain background, else 0.0.

    The background is uniform and no shape reaches a corner, so the top-left pixel is it.
    """
    return ((x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.02).float()


def object_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights 1 + `weight` on the object: a small shape covers 2% of a 64-pixel
    image, so under a plain mean its corners hardly count and come out round."""
    return 1.0 + weight * object_mask(x)


def object_cells(x: torch.Tensor) -> torch.Tensor:
    """object_mask on the latent grid: 1.0 where a latent pixel's 8x8 cell touches the object."""
    return torch.nn.functional.max_pool2d(object_mask(x), 8)


def train_vae(vae, rng, minutes: float, batch: int, log: list, steps: int | None = None) -> None:
    """Reconstruction (L1 + MSE) with a small KL term, as SD's autoencoder without the GAN."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = Schedule(optimizer, 1e-3, minutes, steps)
    step, losses = 0, LossLog(log, "vae", 100)
    while schedule.running(step):
        pixels, _ = shapes.batch(rng, batch, IMAGE_SIZE)
        x = torch.from_numpy(pixels).to(DEVICE)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        loss = rec + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.add(step, rec.item())
        step += 1


def finetune_decoder(vae, rng, minutes: float, batch: int, log: list, object_weight: float = 0.0,
                     lr: float = 1e-3, steps: int | None = None) -> None:
    """Train the VAE decoder alone (the encoder, so the UNet's latent space, stays fixed);
    `object_weight` > 0 weights the object's pixels (see object_weights)."""
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = Schedule(optimizer, lr, minutes, steps)
    step, losses = 0, LossLog(log, "vae_decoder", 100)
    while schedule.running(step):
        pixels, _ = shapes.batch(rng, batch, IMAGE_SIZE)
        x = torch.from_numpy(pixels).to(DEVICE)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample()
        recon = vae.decode(latents).sample
        error = (recon - x).abs() + (recon - x).pow(2)
        loss = (error * object_weights(x, object_weight)).mean() if object_weight else error.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.add(step, loss.item())
        step += 1
    vae.requires_grad_(False)


def encode_text(tokenizer, text_encoder, captions):
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(DEVICE))[0]


class FreshLatents:
    """The UNet's training data drawn and encoded batch by batch: latents sampled from the
    autoencoder's posterior, the scenes, and each latent pixel's object flag (see object_cells)."""

    def __init__(self, vae):
        self.vae = vae

    def batch(self, rng, n: int):
        pixels, scenes = shapes.render(rng, n, IMAGE_SIZE)
        x = torch.from_numpy(pixels).to(DEVICE)
        with torch.no_grad():
            latents = self.vae.encode(x).latent_dist.sample()
        return latents, scenes, object_cells(x)


class LatentBank:
    """`n` training scenes encoded once: the encoder is fixed while the UNet trains, and encoding
    every batch costs a quarter of a UNet step here. Each batch picks scenes at random and draws
    fresh latents from their posteriors (and train_unet fresh captions, noise and timesteps)."""

    def __init__(self, vae, rng, n: int, chunk: int = 64):
        means, stds, masks, self.scenes = [], [], [], []
        with torch.no_grad():
            for start in range(0, n, chunk):
                pixels, scenes = shapes.render(rng, min(chunk, n - start), IMAGE_SIZE)
                x = torch.from_numpy(pixels).to(DEVICE)
                posterior = vae.encode(x).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
                masks.append(object_cells(x))
                self.scenes += scenes
        self.mean, self.std, self.masks = torch.cat(means), torch.cat(stds), torch.cat(masks)

    def batch(self, rng, n: int):
        index = rng.integers(0, len(self.scenes), size=n)
        pick = torch.from_numpy(index).to(DEVICE)
        latents = self.mean[pick] + self.std[pick] * torch.randn_like(self.mean[pick])
        return latents, [self.scenes[i] for i in index], self.masks[pick]


def train_unet(unet, text_encoder, tokenizer, vae, scheduler, rng, minutes: float, batch: int,
               log: list, min_snr: float = 0.0, lr: float = 1e-3, object_weight: float = 0.0,
               mislabeled: float = 0.0, steps: int | None = None, bank: int = 0,
               caption_dropout: float = CAPTION_DROPOUT, unrelated: float = 0.0) -> None:
    """Epsilon prediction; with `min_snr` > 0, each timestep's loss is weighted by
    min(SNR, min_snr) / SNR (Hang et al. 2023, "Min-SNR"): the nearly clean timesteps, which
    only polish texture, stop dominating the gradient, and the noisy ones that decide the
    shape and colour get their share. `object_weight` > 0 weights the latent pixels over the
    object (see object_cells): small shapes were the model's weak point. A `mislabeled`
    fraction of the captions names a wrong colour or shape, as web captions often do: with
    every caption right, the conditional prediction alone draws the prompt and classifier-free
    guidance has nothing left to do; with some wrong, guidance is what makes the model follow
    the prompt, as with real Stable Diffusion. An `unrelated` fraction describes another, random
    scene (a caption that belongs to another picture): the conditional prediction then mixes in
    the unconditional one, roughly (1 - unrelated) * cond + unrelated * uncond where the noise
    hides the picture, so guidance w acts as about w * (1 - unrelated) would on a model trained
    on right captions, and guidance 1 draws the prompt less often. `bank` > 0 encodes that many scenes once (see
    LatentBank) instead of every batch; `caption_dropout` is the share of empty captions that
    teaches the unconditional prediction classifier-free guidance needs."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    # Sampling uses an exponential moving average of the weights: much smoother than the last
    # step's weights after a short run.
    ema = [p.detach().clone() for p in params]
    scaling = vae.config.scaling_factor
    alphas = scheduler.alphas_cumprod.to(DEVICE)
    data = LatentBank(vae, rng, bank) if bank else FreshLatents(vae)
    schedule = Schedule(optimizer, lr, minutes, steps)
    step, losses = 0, LossLog(log, "unet", 100)
    while schedule.running(step):
        latents, scenes, cells = data.batch(rng, batch)
        latents = latents * scaling
        captions = shapes.captions(scenes, rng, mislabeled, unrelated)
        captions = ["" if rng.random() < caption_dropout else c for c in captions]
        noise = torch.randn_like(latents)
        t = torch.from_numpy(rng.integers(0, len(alphas), size=batch)).to(DEVICE)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encode_text(tokenizer, text_encoder, captions)).sample
        error = (pred - noise).pow(2)
        if object_weight:
            error = error * (1.0 + object_weight * cells)
        loss = error.mean(dim=(1, 2, 3))
        if min_snr > 0:
            snr = alphas[t] / (1 - alphas[t])
            loss = loss * snr.clamp(max=min_snr) / snr
        loss = loss.mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.add(step, loss.item())
        step += 1
    with torch.no_grad():
        for average, p in zip(ema, params):
            p.copy_(average)


def latent_scale(vae, rng) -> float:
    """SD's convention: scale latents to unit variance (SD 1.x's 0.18215 came the same way)."""
    with torch.no_grad():
        pixels, _ = shapes.batch(rng, 256, IMAGE_SIZE)
        return float(1.0 / vae.encode(torch.from_numpy(pixels).to(DEVICE)).latent_dist.mean.std())


def load_trained(folder: Path):
    """A pipeline this script wrote, in float32 for training, and its training record."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
    return pipe.to(DEVICE), json.loads((folder / "training.json").read_text())


def resize(pipe, record: dict) -> None:
    """Continue `pipe` at IMAGE_SIZE: both networks are convolutional, so a pipeline trained at one
    size continues at another (progressive resolution, as SD went from 256 to 512 pixels); the
    configs' sample sizes, hence the pipeline's native size, follow."""
    pipe.vae.register_to_config(sample_size=IMAGE_SIZE)
    pipe.unet.register_to_config(sample_size=IMAGE_SIZE // 8)
    record["image_size"] = IMAGE_SIZE


def command() -> str:
    """This run's command line, for the training record."""
    return "train.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])


def decoder_only(args) -> None:
    """Second stage of the recipe: a longer decoder fine-tune on a trained pipeline."""
    start = time.time()
    pipe, record = load_trained(args.decoder_only)
    resize(pipe, record)
    rng = np.random.default_rng(args.seed + 1)
    finetune_decoder(pipe.vae, rng, args.decoder_minutes, 32, record["loss"], args.object_weight, args.lr,
                     args.decoder_steps)
    record.setdefault("stages", []).append(command())
    record["decoder_minutes"] = round(record.get("decoder_minutes", 0) + (time.time() - start) / 60, 1)
    save(pipe, args.out, record)
    print(f"wrote {args.out} in {(time.time() - start) / 60:.1f} min")


def take_autoencoder(pipe, record: dict, folder: Path) -> None:
    """Use the autoencoder of the pipeline `folder`, whose decoder was fine-tuned on the same
    latent space: its encoder must be this pipeline's, or the UNet would not fit it."""
    other, other_record = load_trained(folder)
    mine, theirs = pipe.vae.encoder.state_dict(), other.vae.encoder.state_dict()
    if any(not torch.equal(mine[name], theirs[name]) for name in mine):
        raise SystemExit(f"{folder}'s autoencoder has another encoder (latent space); "
                         "--vae-from needs a --decoder-only descendant of the same pipeline")
    pipe.vae = other.vae
    record["decoder_minutes"] = other_record.get("decoder_minutes", record.get("decoder_minutes", 0))
    record["stages"] = other_record.get("stages", record.get("stages", []))
    record["loss"] = [e for e in record["loss"] if not e["part"].startswith("vae_decoder")] + [
        e for e in other_record["loss"] if e["part"].startswith("vae_decoder")]


def unet_only(args) -> None:
    """Continue a trained pipeline's UNet and text encoder (the autoencoder stays as it is)."""
    start = time.time()
    pipe, record = load_trained(args.unet_from)
    if args.vae_from:
        take_autoencoder(pipe, record, args.vae_from)
    resize(pipe, record)
    rng = np.random.default_rng(args.seed + 2)
    pipe.vae.eval().requires_grad_(False)
    pipe.unet.train()
    pipe.text_encoder.train()
    train_unet(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler, rng, args.unet_minutes,
               64, record["loss"], args.min_snr, args.lr, args.object_weight, args.mislabeled, args.unet_steps,
               args.latent_bank, args.caption_dropout, args.unrelated)
    record["unet_minutes"] = round(record["unet_minutes"] + (time.time() - start) / 60, 1)
    record.setdefault("unet_stages", []).append(command())
    save(pipe, args.out, record)
    print(f"wrote {args.out} in {(time.time() - start) / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-minutes", type=float, default=15)
    parser.add_argument("--decoder-minutes", type=float, default=15,
                        help="then the VAE decoder alone (also the length of a --decoder-only run)")
    parser.add_argument("--unet-minutes", type=float, default=55)
    for part in ("vae", "decoder", "unet"):
        parser.add_argument(f"--{part}-steps", type=int, metavar="N",
                            help=f"budget the {part} run in steps instead of --{part}-minutes "
                                 "(the same model on any machine)")
    parser.add_argument("--latent-bank", type=int, default=0, metavar="N",
                        help="UNet runs: encode N training scenes once instead of every batch (0: every batch)")
    parser.add_argument("--unrelated", type=float, default=0.0, metavar="P",
                        help="fraction of UNet training captions that describe another, random scene")
    parser.add_argument("--caption-dropout", type=float, default=CAPTION_DROPOUT, metavar="P",
                        help="share of empty UNet training captions (the unconditional prediction for guidance)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda")
    parser.add_argument("--image-size", type=int, default=shapes.IMAGE_SIZE,
                        help="training images' side in pixels, a multiple of 8 (a --unet-from or "
                             "--decoder-only run may change it: progressive resolution)")
    parser.add_argument("--vae-from", type=Path, metavar="DIR",
                        help="take the trained autoencoder of the pipeline DIR instead of training one")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine")
    parser.add_argument("--min-snr", type=float, default=5.0,
                        help="Min-SNR loss weighting of the UNet (0: plain MSE, as the first runs)")
    parser.add_argument("--decoder-only", type=Path, metavar="DIR",
                        help="fine-tune the VAE decoder of the trained pipeline DIR into OUT")
    parser.add_argument("--unet-from", type=Path, metavar="DIR",
                        help="continue the UNet and text encoder of the trained pipeline DIR into OUT")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate of the UNet run, or of a --decoder-only run")
    parser.add_argument("--object-weight", type=float, default=0.0,
                        help="extra loss weight on the object's pixels (UNet and decoder runs; 0: plain mean)")
    parser.add_argument("--mislabeled", type=float, default=0.0, metavar="P",
                        help="fraction of UNet training captions that name a wrong colour or shape")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder")
    torch.set_num_threads(args.threads)
    if args.image_size < 32 or args.image_size % 8:
        parser.error(f"--image-size {args.image_size}: use a multiple of 8, at least 32")
    for option in ("mislabeled", "caption_dropout", "unrelated"):
        if not 0 <= getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option):g}: a fraction of the captions, "
                         "at least 0 and below 1")
    global LR_SCHEDULE, IMAGE_SIZE, DEVICE
    LR_SCHEDULE, IMAGE_SIZE, DEVICE = args.lr_schedule, args.image_size, args.device
    from diffusers import StableDiffusionPipeline

    if args.decoder_only:
        decoder_only(args)
        return
    if args.unet_from:
        unet_only(args)
        return

    start = time.time()
    rng = np.random.default_rng(args.seed)
    tokenizer, unet, vae, text_encoder, scheduler = build(args.out.with_name(args.out.name + ".partial"), args.seed)
    unet, vae, text_encoder = unet.to(DEVICE), vae.to(DEVICE), text_encoder.to(DEVICE)
    log: list[dict] = []
    vae_minutes, vae_stages = 0.0, []
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from / "vae", torch_dtype=torch.float32).to(DEVICE)
        source = json.loads((args.vae_from / "training.json").read_text())
        log += [entry for entry in source["loss"] if entry["part"].startswith("vae")]
        # The autoencoder's whole history: its joint run and any decoder-only runs after it.
        vae_minutes = source["vae_minutes"] + source.get("decoder_minutes", 0)
        vae_stages = source.get("stages", [])
    else:
        train_vae(vae, rng, args.vae_minutes, 32, log, args.vae_steps)
        # The decoder alone, on the now fixed latent space: the joint run's shifting encoder
        # keeps its reconstruction loss high; frozen, the decoder learns much sharper shapes.
        finetune_decoder(vae, rng, args.decoder_minutes, 32, log, steps=args.decoder_steps)
    vae.eval().requires_grad_(False)
    if not args.vae_from:
        vae.register_to_config(scaling_factor=latent_scale(vae, rng))
        # Saved now so the autoencoder can be checked (tests/benchmarks/vae_round_trip.py)
        # while the UNet trains.
        vae.to("cpu").save_pretrained(args.out.with_name(args.out.name + ".vae") / "vae")
        vae.to(DEVICE)
        (args.out.with_name(args.out.name + ".vae") / "training.json").write_text(
            json.dumps({"loss": log, "vae_minutes": round((time.time() - start) / 60, 1)}))
    vae_done = time.time()
    train_unet(unet, text_encoder, tokenizer, vae, scheduler, rng, args.unet_minutes, 64, log, args.min_snr,
               args.lr, mislabeled=args.mislabeled, steps=args.unet_steps, bank=args.latent_bank,
               caption_dropout=args.caption_dropout, unrelated=args.unrelated)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    record = {
        "seed": args.seed,
        "command": command(),
        "device": DEVICE,
        "architecture": {"unet": UNET, "vae": VAE, "text_encoder": TEXT},
        "parameters": {name: sum(p.numel() for p in m.parameters())
                       for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))},
        "vae_minutes": round(vae_minutes + (vae_done - start) / 60, 1),
        "unet_minutes": round((time.time() - vae_done) / 60, 1),
        **({"vae_from": str(args.vae_from), "vae_stages": vae_stages} if args.vae_from else {}),
        "torch_threads": args.threads,
        "image_size": IMAGE_SIZE,
        "lr_schedule": args.lr_schedule,
        "min_snr": args.min_snr,
        "mislabeled": args.mislabeled,
        "loss": log,
    }
    save(pipe, args.out, record)
    print(f"wrote {args.out} in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
