"""streamnode vs the original StreamDiffusion 0.1.1 on the same weights, both at their defaults.

Both libraries run the same job: img2img at W×W, T denoising steps (t_index_list), no CFG
(cfg_type "none", guidance 1), a TAESD-class VAE, float32 on the CPU, a uint8 H×W×3 frame in
and a uint8 H×W×3 frame out (the conversions are part of each frame's time). "Defaults" means
each library as a user calls it, with its own thread defaults and nothing tuned: StreamDiffusion
with `StreamDiffusion(pipe, …)` and `stream(image)` (PIL in, `postprocess_image` out);
streamnode with `StreamEngine.from_pretrained(…)` (backend "eager"), plus `accelerate(engine,
"auto")` (backend "auto": OpenVINO when it is installed).

Each library runs in its own process (StreamDiffusion in its own venv, below), and the parent
interleaves them: a block of frames from one, then a block from the other, round after round,
so a neighbour's burst of CPU hits both alike. Reported per (size, T, backend): median seconds
per frame of each and the ratio streamnode/StreamDiffusion in frames/s, per round and overall.

The original library's venv, `benchmarks/.venv-streamdiffusion` (git-ignored), is created on
first use: torch==2.13.0 (the CPU build; any other spec pulls CUDA), streamdiffusion==0.1.1,
diffusers==0.24.0, transformers<4.40, huggingface_hub==0.19.4, accelerate<0.26, numpy<2. On a
CPU StreamDiffusion needs two shims, written by this script into that venv and nowhere else:
`streamnode_cpu_shims.py` (a `torch.cuda.Event` stand-in on `time.perf_counter`: the library
times every call with CUDA events) and a stub `torchvision` package (imported by the library at
load, used only by a helper this benchmark does not call; the real one does not install beside
torch 2.13). None of StreamDiffusion's code is committed here.

    python benchmarks/vs_streamdiffusion.py                        # tiny model, 256², T = 1 2
    python benchmarks/vs_streamdiffusion.py --model sd-turbo-arch --size 512 --steps 1 --rounds 3 --frames 2
    python benchmarks/vs_streamdiffusion.py --out benchmarks/results/vs_streamdiffusion.json

`--model sd-turbo-arch` is sd-turbo's UNet (SD2.1-base config) and a standard TAESD with random
weights (seeded, saved once to a temporary folder that both libraries load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SD_VENV = HERE / ".venv-streamdiffusion"
SD_REQUIREMENTS = [
    "streamdiffusion==0.1.1", "diffusers==0.24.0", "transformers<4.40", "huggingface_hub==0.19.4",
    "accelerate<0.26", "numpy<2", "pillow",
]
T_INDEX = {1: [35], 2: [32, 45], 4: [16, 24, 32, 45]}
PROMPT = "a watercolour city at dusk"

CUDA_EVENT_SHIM = '''"""streamnode benchmark shim (benchmarks/vs_streamdiffusion.py): StreamDiffusion 0.1.1 times
every call with torch.cuda.Event and torch.cuda.synchronize; on a CPU they stand on perf_counter."""
import time

import torch


class _Event:
    def __init__(self, enable_timing=False, **_kw):
        self._t = 0.0

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end._t - self._t) * 1000.0


if not torch.cuda.is_available():
    torch.cuda.Event = _Event
    torch.cuda.synchronize = lambda device=None: None
'''

TORCHVISION_STUB = {
    "__init__.py": '"""Stub torchvision (streamnode benchmark shim): StreamDiffusion 0.1.1 imports it at load."""\n'
                   "from . import transforms  # noqa: F401\n__version__ = '0.0.0+streamnode-stub'\n",
    "transforms.py": '"""Only ToTensor, which StreamDiffusion\'s image_utils names (the benchmark never calls it)."""\n'
                     "import numpy as np\nimport torch\n\n\nclass ToTensor:\n"
                     "    def __call__(self, pic):\n"
                     "        a = np.asarray(pic, dtype=np.float32) / 255.0\n"
                     "        return torch.from_numpy(a).permute(2, 0, 1).contiguous()\n",
}


# -- the original library's venv ---------------------------------------------------------------


def sd_python() -> Path:
    return SD_VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_sd_venv() -> Path:
    """Create the StreamDiffusion venv with its pins and the two shims (once); return its python."""
    python = sd_python()
    marker = SD_VENV / ".streamnode-ready"
    if not marker.is_file():
        print(f"creating {SD_VENV} (StreamDiffusion 0.1.1 and its pins; once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(SD_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, *SD_REQUIREMENTS], check=True)
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    (site / "streamnode_cpu_shims.py").write_text(CUDA_EVENT_SHIM, encoding="utf-8")
    stub = site / "torchvision"
    stub.mkdir(exist_ok=True)
    for name, text in TORCHVISION_STUB.items():
        (stub / name).write_text(text, encoding="utf-8")
    marker.touch()
    return python


# -- models ------------------------------------------------------------------------------------


def model_folder(name: str) -> Path:
    """A diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, vae_tiny/) both load."""
    sys.path.insert(0, str(ROOT))
    if name == "tiny":
        from streamnode.diffusion.tiny import ensure_tiny_model

        return ensure_tiny_model()
    if name != "sd-turbo-arch":
        raise SystemExit(f"--model {name!r}: use tiny or sd-turbo-arch")
    folder = Path(tempfile.gettempdir()) / "streamnode-bench-sd-turbo-arch"
    if (folder / "done").is_file():
        return folder
    import torch

    sys.path.insert(0, str(HERE))
    from gpu import sd_turbo_architecture

    c = sd_turbo_architecture(torch.device("cpu"), torch.float32)
    tiny = Path(model_folder("tiny"))
    folder.mkdir(parents=True, exist_ok=True)
    c.unet.save_pretrained(folder / "unet", safe_serialization=True)
    c.vae.save_pretrained(folder / "vae_tiny", safe_serialization=True)
    cfg = json.loads((folder / "vae_tiny" / "config.json").read_text())
    cfg.pop("block_out_channels", None)  # as tiny.py: AutoencoderTiny rejects its own alias
    (folder / "vae_tiny" / "config.json").write_text(json.dumps(cfg))
    c.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    c.scheduler.save_pretrained(folder / "scheduler")
    import shutil

    # The same BPE tokenizer files as the tiny model's (write_tiny_tokenizer): both transformers
    # versions read vocab.json + merges.txt. The pipeline loader wants a full VAE folder; the tiny
    # model's stands in (neither library runs it).
    shutil.copytree(tiny / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(tiny / "vae", folder / "vae", dirs_exist_ok=True)
    shutil.copy(tiny / "model_index.json", folder / "model_index.json")
    (folder / "done").touch()
    return folder


# -- workers (one process per library; commands on stdin, JSON on stdout) -------------------------


def _frames(size: int, n: int = 8) -> list[Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def streamdiffusion_worker(folder: Path, size: int, steps: int, threads: int | None) -> Any:
    import numpy as np
    import PIL.Image
    import streamnode_cpu_shims  # noqa: F401 - must come before streamdiffusion
    import torch
    from diffusers import AutoencoderTiny, StableDiffusionPipeline
    from streamdiffusion import StreamDiffusion
    from streamdiffusion.image_utils import postprocess_image

    if threads:
        torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    stream = StreamDiffusion(pipe, t_index_list=T_INDEX[steps], torch_dtype=torch.float32, width=size,
                             height=size, cfg_type="none")
    stream.vae = AutoencoderTiny.from_pretrained(str(folder / "vae_tiny"), torch_dtype=torch.float32)
    stream.prepare(PROMPT, guidance_scale=1.0)

    def run(frame: Any) -> Any:
        out = postprocess_image(stream(PIL.Image.fromarray(frame)), output_type="np")[0]
        return (out * 255).round().astype(np.uint8)

    return run, {"threads": torch.get_num_threads(), "torch": torch.__version__}


def streamnode_worker(folder: Path, size: int, steps: int, backend: str, threads: int | None) -> Any:
    sys.path.insert(0, str(ROOT))
    import torch

    from streamnode.accel import accelerate
    from streamnode.diffusion.stream import StreamEngine

    model = "tiny" if folder.name.startswith("tiny") else str(folder)
    eng = StreamEngine.from_pretrained(model, device="cpu", t_index_list=T_INDEX[steps], width=size, height=size,
                                       cfg_type="none", cpu_threads=threads,
                                       **({"tiny_vae": str(folder / "vae_tiny")} if model != "tiny" else {}))
    eng.prepare(prompt=PROMPT, guidance_scale=1.0)
    used = "eager" if backend == "eager" else accelerate(eng, "auto", threads=threads)
    return eng, {"threads": torch.get_num_threads(), "torch": torch.__version__, "backend": used}


def worker_main(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    if args.worker == "streamdiffusion":
        run, info = streamdiffusion_worker(folder, args.size, args.steps, args.threads)
    else:
        run, info = streamnode_worker(folder, args.size, args.steps, args.backend, args.threads)
    frames = _frames(args.size)
    for i in range(args.warmup):
        run(frames[i % len(frames)])
    out = sys.stdout
    out.write(json.dumps({"ready": True, **info}) + "\n")
    out.flush()
    i = 0
    for line in sys.stdin:
        n = int(line.strip() or 0)
        if n <= 0:
            break
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            frame = run(frames[i % len(frames)])
            times.append(time.perf_counter() - t0)
            i += 1
        assert frame.shape == (args.size, args.size, 3) and str(frame.dtype) == "uint8"
        out.write(json.dumps({"times": times}) + "\n")
        out.flush()


# -- the parent ----------------------------------------------------------------------------------


class Worker:
    def __init__(self, python: Path, name: str, folder: Path, size: int, steps: int, backend: str, warmup: int,
                 threads: int | None) -> None:
        cmd = [str(python), str(Path(__file__).resolve()), "--worker", name, "--folder", str(folder),
               "--size", str(size), "--steps", str(steps), "--backend", backend, "--warmup", str(warmup)]
        if threads:
            cmd += ["--threads", str(threads)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        # stderr to a file, never a pipe nobody reads (a chatty library would block on a full pipe).
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the worker; closed in close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, cwd=str(ROOT))
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self.log.seek(0)
            raise SystemExit(f"{name} worker failed to start:\n{self.log.read()[-3000:]}")
        self.info = json.loads(line)

    def run(self, n: int) -> list[float]:
        self.proc.stdin.write(f"{n}\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self.proc.stdout.readline())["times"]  # type: ignore[union-attr]

    def close(self) -> None:
        with_stdin = self.proc.stdin
        if with_stdin is not None:
            with_stdin.write("0\n")
            with_stdin.flush()
        self.proc.wait(timeout=60)
        self.log.close()


def compare(sd_py: Path, folder: Path, size: int, steps: int, backend: str, rounds: int, frames: int,
            warmup: int, threads: int | None) -> dict[str, Any]:
    sn_py = Path(sys.executable)
    sd = Worker(sd_py, "streamdiffusion", folder, size, steps, "eager", warmup, threads)
    sn = Worker(sn_py, "streamnode", folder, size, steps, backend, warmup, threads)
    per_round, all_sd, all_sn = [], [], []
    try:
        for r in range(rounds):
            # Alternate who goes first, so neither always runs right after the other's burst.
            order = [(sd, all_sd), (sn, all_sn)] if r % 2 == 0 else [(sn, all_sn), (sd, all_sd)]
            medians = {}
            for w, sink in order:
                t = w.run(frames)
                sink.extend(t)
                medians[w] = statistics.median(t)
            per_round.append(round(medians[sd] / medians[sn], 3))
    finally:
        sd.close()
        sn.close()
    sd_s, sn_s = statistics.median(all_sd), statistics.median(all_sn)
    return {
        "size": size, "steps": steps, "t_index_list": T_INDEX[steps], "backend": sn.info.get("backend"),
        "streamdiffusion_s_per_frame": round(sd_s, 4), "streamnode_s_per_frame": round(sn_s, 4),
        "ratio_fps": round(sd_s / sn_s, 3), "ratio_per_round": per_round,
        "threads": {"streamdiffusion": sd.info["threads"], "streamnode": sn.info["threads"]},
        "frames_per_round": frames, "rounds": rounds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny or sd-turbo-arch")
    p.add_argument("--size", type=int, nargs="+", default=[256])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backend", nargs="+", default=["eager", "auto"], help="streamnode backends: eager, auto")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--frames", type=int, default=10, help="frames per block")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="give both libraries this many threads (torch, and OpenVINO's pool); default: each its own")
    p.add_argument("--out", type=Path)
    # worker mode (internal)
    p.add_argument("--worker", choices=("streamdiffusion", "streamnode"))
    p.add_argument("--folder")
    args = p.parse_args()
    if args.worker:
        args.size, args.steps, args.backend = args.size[0], args.steps[0], args.backend[0]
        worker_main(args)
        return
    sd_py = ensure_sd_venv()
    folder = model_folder(args.model)
    load_start = os.getloadavg()[0]
    results = []
    for size in args.size:
        for steps in args.steps:
            for backend in args.backend:
                row = compare(sd_py, folder, size, steps, backend, args.rounds, args.frames, args.warmup, args.threads)
                print(json.dumps(row), file=sys.stderr, flush=True)
                results.append(row)
    report = {
        "benchmark": "vs_streamdiffusion", "model": args.model, "machine": platform.platform(),
        "processor": _cpu_name(), "cores": os.cpu_count(), "threads": args.threads or "defaults",
        "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0], "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
