"""Train the embedded tiny model's weights into streamnode/diffusion/tiny_model/.

    PYTHONPATH=. python scripts/train_tiny.py            # ~10 min on one CPU thread
    PYTHONPATH=. python scripts/train_tiny.py --out /tmp/t --vae-steps 5 --unet-steps 5

Everything it learns from is made here from one seed: images (gradients, colour bars, stripes,
checkers, smooth noise, rectangles and discs, grain) and captions composed from the words of
`TINY_LOOKS` and `FILLER_WORDS`. Each caption names a look; the training target for an
(image, caption) pair is the image restyled by that look (`restyle`), and a caption without a
look word (the empty one included) means the image itself.

1. The TAESD-class VAE learns to reconstruct the images through its 8× smaller latent, held
   near zero mean and unit spread per channel (the scale the noise schedule assumes).
2. The UNet and the CLIP text encoder learn paired img2img with the stream's own LCM step
   (the tiny LCM scheduler's ᾱ and boundary scalings, as `LcmSchedule` reads them), at every
   train timestep (so the UNet is smooth in t), the stream's range more often: from
   X = a·z_input + b·ε, one LCM step must land on z_target. So one denoising step gives the
   restyled frame, cond − uncond (CFG) points from the frame towards its look, and a blend of
   two prompts' embeddings lands between their looks. A quarter of the pairs start from an
   already restyled image (input = target), which is what the later stages of a stream batch
   see: a look applied again stays that look.

One thread and fixed seeds make a run repeatable on one machine; the sha256 of every written
file is printed and recorded in tiny_model/manifest.json. Other CPUs may round differently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from streamnode.diffusion.schedule import LcmSchedule
from streamnode.diffusion.tiny import (
    FILLER_WORDS,
    TEXTURE_LOOKS,
    TINY_LOOKS,
    TRAINED,
    WEIGHTS_DIR,
    tiny_modules,
    tiny_scheduler,
    write_tiny_tokenizer,
)

SEED = 12
IMAGE_SIZE = 64
"""Training crops are 64²: the networks are convolutional, the looks are per-pixel or local."""

# Palettes: the luminance 0..1 is mapped piecewise-linearly onto these stops (RGB 0..1).
PALETTES: dict[str, list[tuple[float, float, float]]] = {
    "fire": [(0.05, 0.0, 0.0), (0.7, 0.05, 0.0), (1.0, 0.5, 0.0), (1.0, 0.92, 0.35)],
    "ocean": [(0.0, 0.02, 0.12), (0.0, 0.2, 0.5), (0.1, 0.6, 0.8), (0.85, 0.95, 1.0)],
    "forest": [(0.02, 0.08, 0.02), (0.1, 0.35, 0.1), (0.45, 0.7, 0.2), (0.85, 0.95, 0.6)],
    "snow": [(0.5, 0.58, 0.72), (0.8, 0.86, 0.95), (0.97, 0.98, 1.0)],
    "neon": [(0.05, 0.0, 0.1), (0.9, 0.1, 0.7), (0.1, 0.9, 1.0)],
    "sunset": [(0.15, 0.05, 0.3), (0.8, 0.25, 0.35), (1.0, 0.6, 0.2), (1.0, 0.9, 0.6)],
    "gold": [(0.25, 0.15, 0.0), (0.8, 0.6, 0.1), (1.0, 0.95, 0.6)],
    "night": [(0.0, 0.0, 0.03), (0.05, 0.08, 0.25), (0.35, 0.45, 0.7)],
    "mono": [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)],
}
TINTS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "orange": (0.95, 0.5, 0.05),
    "yellow": (0.95, 0.85, 0.1),
    "green": (0.1, 0.7, 0.15),
    "blue": (0.1, 0.25, 0.9),
    "purple": (0.5, 0.15, 0.75),
    "pink": (0.95, 0.45, 0.7),
}
for _name, _colour in TINTS.items():
    PALETTES[_name] = [(0.0, 0.0, 0.0), _colour, (1.0, 1.0, 1.0)]
COLOUR_LOOKS = tuple(k for k in TINY_LOOKS if k not in TEXTURE_LOOKS)
assert set(COLOUR_LOOKS) == set(PALETTES), "every colour look needs a palette"


def luminance(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 1)


def palette_map(lum: torch.Tensor, stops: list[tuple[float, float, float]]) -> torch.Tensor:
    table = torch.tensor(stops, dtype=lum.dtype)  # (k, 3)
    pos = lum[:, 0] * (len(stops) - 1)
    i = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - i).unsqueeze(-1)
    out = table[i] * (1 - frac) + table[i + 1] * frac  # (B, H, W, 3)
    return out.permute(0, 3, 1, 2)


def _blur(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1)


def texture(x: torch.Tensor, look: str) -> torch.Tensor:
    if look == "soft":  # watercolour-ish: washed out, blurred
        return 0.6 * _blur(_blur(x, 5), 5) + 0.4
    if look == "sketch":  # dark lines on paper where the luminance has edges
        lum = _blur(luminance(x), 3)
        gx = lum[..., :, 2:] - lum[..., :, :-2]
        gy = lum[..., 2:, :] - lum[..., :-2, :]
        edges = (F.pad(gx, (1, 1, 0, 0)).abs() + F.pad(gy, (0, 0, 1, 1)).abs()).mul(4).clamp(0, 1)
        paper = torch.tensor([0.95, 0.93, 0.87]).view(1, 3, 1, 1)
        return paper * (1 - edges) + 0.08 * edges
    if look == "poster":
        return (x * 3).round() / 3
    if look == "negative":
        return 1 - x
    raise ValueError(look)


def restyle(x: torch.Tensor, looks: tuple[str, ...]) -> torch.Tensor:
    """The training target: `x` (B, 3, H, W in 0..1) with its texture look, then its colour look."""
    for look in looks:
        if look in TEXTURE_LOOKS:
            x = texture(x, look)
    for look in looks:
        if look in PALETTES:
            x = palette_map(luminance(x), PALETTES[look])
    return x.clamp(0, 1)


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=g)


def _randint(g: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=g))


def make_images(g: torch.Generator, n: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """n synthetic RGB images in 0..1: a background, 0–5 shapes, sometimes grain."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        c0, c1 = _rand(g, 3), _rand(g, 3)
        kind = _randint(g, 0, 5)
        if kind == 0:  # linear gradient, any direction
            angle = float(_rand(g, 1)) * 2 * math.pi
            u = xx * math.cos(angle) + yy * math.sin(angle)
            u = (u - u.min()) / (u.max() - u.min() + 1e-6)
            img = c0.view(3, 1, 1) * (1 - u) + c1.view(3, 1, 1) * u
        elif kind == 1:  # colour bars, often test-pattern-like saturated colours
            k = _randint(g, 3, 9)
            colours = _rand(g, k, 3)
            if float(_rand(g, 1)) < 0.5:
                colours = (colours > 0.5).float() * (0.75 + 0.25 * float(_rand(g, 1)))
            axis = xx if float(_rand(g, 1)) < 0.7 else yy
            img = colours[(axis * k).long().clamp(max=k - 1)].permute(2, 0, 1)
        elif kind == 2:  # stripes or checker
            period = _randint(g, 4, size // 2) / size
            if float(_rand(g, 1)) < 0.5:
                mask = ((xx / period).floor() + (yy / period).floor()) % 2 == 0
            else:
                angle = float(_rand(g, 1)) * math.pi
                mask = ((xx * math.cos(angle) + yy * math.sin(angle)) / period).floor() % 2 == 0
            img = torch.where(mask, c0.view(3, 1, 1), c1.view(3, 1, 1))
        elif kind == 3:  # smooth colour noise
            r = _randint(g, 2, 9)
            img = F.interpolate(_rand(g, 1, 3, r, r), size=(size, size), mode="bilinear", align_corners=False)[0]
        else:
            img = c0.view(3, 1, 1).expand(3, size, size).clone()
        for _ in range(_randint(g, 0, 6)):
            colour = _rand(g, 3)
            pick = float(_rand(g, 1))
            if pick < 0.2:
                colour = torch.ones(3)
            elif pick < 0.3:
                colour = torch.zeros(3)
            cx, cy, w, h = (float(v) for v in _rand(g, 4))
            w, h = 0.08 + 0.4 * w, 0.08 + 0.4 * h
            if float(_rand(g, 1)) < 0.5:
                mask = ((xx - cx).abs() < w / 2) & ((yy - cy).abs() < h / 2)
            else:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < (w / 2) ** 2
            img = torch.where(mask, colour.view(3, 1, 1), img)
        if float(_rand(g, 1)) < 0.15:
            img = img + (_rand(g, 3, size, size) - 0.5) * 0.3 * float(_rand(g, 1))
        out[i] = img.clamp(0, 1)
    return out


def make_caption(g: torch.Generator) -> tuple[str, tuple[str, ...]]:
    """A caption and the looks it names: 15% empty, 10% only filler words, else one or two looks."""
    pick = float(_rand(g, 1))
    if pick < 0.15:
        return "", ()
    looks: list[str] = []
    if pick >= 0.25:
        has_texture = float(_rand(g, 1)) < 0.35
        has_colour = not has_texture or float(_rand(g, 1)) < 0.6
        if has_texture:
            looks.append(TEXTURE_LOOKS[_randint(g, 0, len(TEXTURE_LOOKS))])
        if has_colour:
            looks.append(COLOUR_LOOKS[_randint(g, 0, len(COLOUR_LOOKS))])
    words = [TINY_LOOKS[look][_randint(g, 0, len(TINY_LOOKS[look]))] for look in looks]
    words += [FILLER_WORDS[_randint(g, 0, len(FILLER_WORDS))] for _ in range(_randint(g, 0 if looks else 1, 4))]
    order = torch.randperm(len(words), generator=g).tolist()
    return " ".join(words[i] for i in order), tuple(looks)


def _lr(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _identity_conv(conv: nn.Conv2d, channels: int, taps: list[tuple[int, int]], scale: float = 1.0, bias: float = 0.0) -> None:
    """Channels 0..channels-1 of `conv` pass their input through (mean over `taps`); the other
    outputs keep their random weights but do not feed back into those channels yet."""
    with torch.no_grad():
        conv.weight[:channels] = 0
        for c in range(channels):
            for i, j in taps:
                conv.weight[c, c, i, j] = scale / len(taps)
        if conv.bias is not None:
            conv.bias[:channels] = bias

CENTRE = [(1, 1)]
BOX = [(1, 1), (1, 2), (2, 1), (2, 2)]

def init_vae_as_box_filter(vae: nn.Module) -> None:
    """Start the VAE as an 8× box-filter encoder (latent channels 0–2 = the block's mean colour
    mapped to −1..1) and a nearest-neighbour decoder, with every residual block an identity and
    the other channels random. From the seeded random init alone this plain-ReLU net (no norms)
    crawls: ~13 dB after 300 steps; from here it starts near 20 dB and learns the details."""
    from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
    for m in vae.modules():
        if isinstance(m, AutoencoderTinyBlock):
            nn.init.zeros_(m.conv[4].weight)
            nn.init.zeros_(m.conv[4].bias)
    enc = [m for m in vae.encoder.layers if isinstance(m, nn.Conv2d)]
    _identity_conv(enc[0], 3, CENTRE)
    for conv in enc[1:-1]:
        _identity_conv(conv, 3, BOX)
    with torch.no_grad():
        last = enc[-1]
        last.weight.zero_()
        last.bias.zero_()
        for c in range(3):
            last.weight[c, c, 1, 1] = 2.0
            last.bias[c] = -1.0
    dec = [m for m in vae.decoder.layers if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        first = dec[0]
        first.weight[:3] = 0
        for c in range(3):
            first.weight[c, c, 1, 1] = 0.5
        first.bias[:3] = 0.5
    for conv in dec[1:-1]:
        _identity_conv(conv, 3, CENTRE)
    with torch.no_grad():
        final = dec[-1]
        final.weight.zero_()
        final.bias.zero_()
        for c in range(3):
            final.weight[c, c, 1, 1] = 1.0


def train_vae(vae: torch.nn.Module, steps: int, batch: int, g: torch.Generator) -> float:
    """Reconstruction (L1 + L2) through the latent, latents held near mean 0 / std 1 per channel,
    decoded with a little noise added so the decoder tolerates imperfect UNet latents."""
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    loss_avg = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 2e-3)
        x = make_images(g, batch) * 2 - 1
        z = vae.encode(x).latents
        mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
        y = vae.decode(z + 0.05 * torch.randn(z.shape, generator=g)).sample
        loss = F.l1_loss(y, x) + F.mse_loss(y, x) + 0.05 * (mean.pow(2).mean() + (std - 1).pow(2).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_avg = 0.95 * loss_avg + 0.05 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae  {step:5d}/{steps} loss {loss_avg:.4f} latent std {std.mean():.2f}", flush=True)
    return loss_avg


def train_unet(modules: dict[str, torch.nn.Module], tokenizer: object, steps: int, batch: int,
               g: torch.Generator) -> float:
    """Paired img2img through the stream's own LCM step (module docstring)."""
    unet, text_encoder, vae = modules["unet"], modules["text_encoder"], modules["vae_tiny"]
    scheduler = tiny_scheduler()
    stream_t = LcmSchedule.from_scheduler(scheduler, list(range(50))).timesteps  # 999, 979, …, 19
    # The same scalars as LcmSchedule, for every train timestep: training covers all of them,
    # not only the stream's 50, so the UNet is smooth in t. Trained on the 50 alone, it keys on
    # the sinusoidal embedding's fastest frequencies (a different pattern at every t): one step
    # of t moved its output 7 %, and OpenVINO's own sin/cos moved it 9 %, failing the backend's
    # self-check.
    alphas_cumprod = scheduler.alphas_cumprod.double()
    a_all, b_all = alphas_cumprod.sqrt().float(), (1 - alphas_cumprod).sqrt().float()
    scalings = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in range(len(alphas_cumprod))]
    skip_all = torch.tensor([float(s) for s, _ in scalings])
    out_all = torch.tensor([float(o) for _, o in scalings])
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    loss_avg = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 1e-3)
        x = make_images(g, batch)
        captions, looks = zip(*(make_caption(g) for _ in range(batch)), strict=True)
        y = torch.cat([restyle(x[i : i + 1], looks[i]) for i in range(batch)])
        restyled_input = _rand(g, batch) < 0.25
        x = torch.where(restyled_input.view(-1, 1, 1, 1), y, x)
        with torch.no_grad():
            z_in = vae.encode(x * 2 - 1).latents
            z_target = vae.encode(y * 2 - 1).latents
        # Every timestep; the presets' range (t_index ≥ 15, t ≤ 699) twice as often.
        t = torch.where(_rand(g, batch) < 0.3, torch.randint(0, 1000, (batch,), generator=g),
                        torch.randint(int(stream_t[-1]), int(stream_t[15]) + 1, (batch,), generator=g))
        a, b = a_all[t].view(-1, 1, 1, 1), b_all[t].view(-1, 1, 1, 1)
        c_skip, c_out = skip_all[t].view(-1, 1, 1, 1), out_all[t].view(-1, 1, 1, 1)
        noise = torch.randn(z_in.shape, generator=g)
        latent = a * z_in + b * noise
        ids = tokenizer(list(captions), padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        eps = unet(latent, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        x0 = c_out * (latent - b * eps) / a + c_skip * latent
        # x0 error, down-weighted where the latent is mostly noise (SNR < 1/4), where the
        # input says little and ε errors are magnified by b/a.
        weight = (4 * (a / b) ** 2).clamp(max=1.0)
        loss = (weight * (x0 - z_target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_avg = 0.95 * loss_avg + 0.05 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == steps - 1:
            print(f"unet {step:5d}/{steps} loss {loss_avg:.4f}", flush=True)
    return loss_avg


def save(modules: dict[str, torch.nn.Module], out: Path) -> dict[str, str]:
    """float16 safetensors, one per trained component; returns their sha256."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name in TRAINED:
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in modules[name].state_dict().items()}
        path = out / f"{name}.safetensors"
        save_file(state, path)
        hashes[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for the safetensors (default: the package's)")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    from transformers import CLIPTokenizer

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    modules = tiny_modules(vocab_size)
    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    vae = modules["vae_tiny"].train()
    init_vae_as_box_filter(vae)
    vae_loss = train_vae(vae, args.vae_steps, max(4, args.batch // 2), g)
    vae.eval().requires_grad_(False)
    unet_loss = train_unet(modules, tokenizer, args.unet_steps, args.batch, g)
    hashes = save(modules, args.out)
    manifest = {
        "seed": SEED,
        "image_size": IMAGE_SIZE,
        "vae_steps": args.vae_steps,
        "unet_steps": args.unet_steps,
        "batch": args.batch,
        "final_loss": {"vae": round(vae_loss, 5), "unet": round(unet_loss, 5)},
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "sha256": hashes,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for name, digest in hashes.items():
        print(f"{digest}  {name}")
    print(f"done in {manifest['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
