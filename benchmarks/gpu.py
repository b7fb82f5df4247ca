"""Frames/s of img2img per acceleration backend on a GPU, printed as JSON.

The model is sd-turbo's architecture with random weights (no download): a UNet with the
SD2.1-base config (channels 320/640/1280/1280, cross-attention 1024, linear projection,
attention heads 5/10/20/20) and a TAESD-class VAE (`AutoencoderTiny` defaults); the text
encoder is a small CLIP with the right width (it runs once per prompt, never per frame). Speed
depends on shapes and kernels, not on the weights' values, so these figures are sd-turbo's.

For each backend (eager, compile, tensorrt: those that work here) and each T in --steps, with
F = 1 and cfg "none", at --size²: end-to-end frames/s of `StreamEngine.__call__` from a host
uint8 frame to a host uint8 frame (upload, encode, UNet, LCM step, decode, download), its
p50/p99 latency, and the UNet call alone (ms, CUDA-synchronised). Setup time (TensorRT build or
load, torch.compile) is reported separately. Run from the repository root:

    python benchmarks/gpu.py --out benchmarks/results/gpu-h100.json     # on a CUDA machine
    python benchmarks/gpu.py --tiny                                      # tiny model, any machine

Engines go to the user cache (STREAMNODE_CACHE), so a second run only loads them.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamnode.accel import accelerate, describe_backends, describe_seams, example_inputs, restore  # noqa: E402
from streamnode.diffusion.models import ModelComponents, load_components  # noqa: E402
from streamnode.diffusion.stream import StreamEngine  # noqa: E402

T_INDEX = {1: [35], 2: [32, 45], 4: [16, 24, 32, 45]}
PROMPT = "an oil painting of a dancer, vivid colours"
TARGET_FPS_H100_T1 = 300.0


def sd_turbo_architecture(device: torch.device, dtype: torch.dtype, seed: int = 0) -> ModelComponents:
    """sd-turbo's UNet and a TAESD-class VAE, randomly initialised (seeded), on `device`."""
    from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from streamnode.diffusion.tiny import write_tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = AutoencoderTiny()  # TAESD: 64 channels, encoder blocks 1/3/3/3, decoder 3/3/3/1
    folder = Path(tempfile.mkdtemp(prefix="streamnode-bench-tok-"))
    vocab = write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=16,
        max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    ))
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    for m in (unet, vae, text_encoder):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ModelComponents(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        device=device, dtype=dtype, tiny_vae=True,
        identity=f"bench:sd-turbo-architecture@random-seed{seed}|taesd=random",
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_ms(engine: StreamEngine, iters: int) -> float:
    """Median ms of one `unet_call` at the engine's batch shape."""
    x, t, emb = example_inputs(engine)["unet_call"]
    times = []
    with torch.inference_mode():
        for _ in range(3):
            engine.unet_call(x, t, emb)
        for _ in range(iters):
            _sync(engine.device)
            t0 = time.perf_counter()
            engine.unet_call(x, t, emb)
            _sync(engine.device)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench(c: ModelComponents, backend: str, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    engine = StreamEngine.from_components(
        c, t_index_list=T_INDEX[steps], width=args.size, height=args.size, frame_buffer_size=1,
        cfg_type="none", similarity_threshold=0.0,
    )
    engine.prepare(prompt=PROMPT, guidance_scale=1.0)
    t0 = time.perf_counter()
    used = accelerate(engine, backend, min_size=min(args.size, 256), max_size=max(args.size, 1024))
    setup_s = time.perf_counter() - t0
    row: dict[str, Any] = {"backend": backend, "used": used, "T": steps, "F": 1, "batch_rows": engine.batch_rows,
                           "setup_s": round(setup_s, 1)}
    if used != backend:
        row["note"] = "fell back (see the log); figures are for the backend used"
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(8)]
    for i in range(args.warmup):
        engine(frames[i % len(frames)])
    latencies = []
    start = time.perf_counter()
    for i in range(args.frames):
        t = time.perf_counter()
        out = engine(frames[i % len(frames)])  # host uint8 in → host uint8 out (synchronises)
        latencies.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    assert out.dtype == np.uint8 and out.shape == (args.size, args.size, 3)
    latencies.sort()
    row.update({
        "fps": round(args.frames / total, 1),
        "frame_ms_p50": round(1e3 * latencies[len(latencies) // 2], 3),
        "frame_ms_p99": round(1e3 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
        "unet_ms": round(unet_ms(engine, args.unet_iters), 3),
        "seams": describe_seams(engine),
    })
    restore(engine)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny model (any machine; checks the script)")
    parser.add_argument("--size", type=int, default=None, help="width = height (default 512; 128 with --tiny)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2], choices=sorted(T_INDEX))
    parser.add_argument("--backends", default=None,
                        help="comma list of eager,compile,tensorrt (default: every one available here; "
                             "eager only on a CPU)")
    parser.add_argument("--frames", type=int, default=None, help="timed frames per run (default 300 GPU, 10 CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--unet-iters", type=int, default=None)
    parser.add_argument("--allow-cpu-full", action="store_true", help="run the sd-turbo-size model on a CPU (slow)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("diffusers", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.tiny and not args.allow_cpu_full:
        print("gpu.py: no CUDA GPU here; the sd-turbo-size model takes minutes per frame on a CPU. "
              "Use --tiny to check the script, or --allow-cpu-full to insist.", file=sys.stderr)
        return 2
    args.size = args.size or (128 if args.tiny else 512)
    args.frames = args.frames or (300 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (30 if cuda else 3)
    args.unet_iters = args.unet_iters or (100 if cuda else 5)
    available = {name for name, ok, _ in describe_backends() if ok}
    wanted = args.backends.split(",") if args.backends else (
        [b for b in ("eager", "compile", "tensorrt") if b in available] if cuda else ["eager"]
    )
    dtype = torch.float16 if cuda else torch.float32
    if args.tiny:
        c = load_components("tiny", device=device, dtype=dtype)
        model = "tiny (embedded, random weights)"
    else:
        c = sd_turbo_architecture(device, dtype)
        model = "sd-turbo architecture (SD2.1-base UNet config, random weights) + TAESD-class VAE"

    results = [bench(c, backend, steps, args) for backend in wanted for steps in args.steps]
    trt_version = None
    try:
        import tensorrt

        trt_version = tensorrt.__version__
    except Exception:  # noqa: BLE001 - not installed or no CUDA libraries: reported as null
        pass
    report: dict[str, Any] = {
        "benchmark": "gpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "device": str(device),
        "model": model,
        "size": args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "cfg_type": "none",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tensorrt": trt_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "frames_timed": args.frames,
        "io": "host uint8 HxWx3 in, host uint8 HxWx3 out (StreamEngine.__call__)",
        "results": results,
    }
    best_t1 = max((r["fps"] for r in results if r["T"] == 1 and r["used"] == r["backend"]), default=None)
    if cuda and not args.tiny and best_t1 is not None:
        report["target"] = {"t1_fps_ge_300_on_h100": best_t1 >= TARGET_FPS_H100_T1, "best_t1_fps": best_t1}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
