"""t2v sample --checkpoint runs/train/model/model_ema.pt --prompt "a red circle moving left" --out sample.mp4 [--gif]

Generate videos from a trained checkpoint (``TextToVideo`` format) and write them as playable H.264 mp4 files
(and looping gifs with ``--gif``). Also runs as ``python -m flows.sample``.

    t2v sample --checkpoint model.pt --prompt "a red circle moving left" --prompt "a blue square moving up"
        --out out.mp4 --steps 50 --guidance 9 --seed 0 [--image first_frame.png] [--negative-prompt "..."]

One prompt writes exactly ``--out``; several write ``<out stem>-<i>.mp4`` (one file per prompt, in order). Settings
can also come from ``--config file.yaml`` and ``--set key=value``; explicit flags win. ``--dry-run`` prints the
resolved settings and exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import logs, settings
from pipelines.settings import check

log = logging.getLogger("t2v.sample")


@dataclass
class SampleConfig:
    checkpoint: str = ""  # model.pt written by training or TextToVideo.save
    prompts: list[str] = field(default_factory=list)
    out: str = "sample.mp4"
    gif: bool = False  # also write a looping gif beside each mp4
    steps: int = 50  # DDIM steps
    guidance: float = 9.0  # classifier-free guidance scale (1 = no guidance)
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic ODE)
    seed: int = 0
    negative_prompt: str = ""  # the unconditional side of guidance
    image: str | None = None  # optional conditioning image file (CLIP image embedding)
    fps: float | None = None  # output frame rate; default: the model's fps
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        check(bool(self.checkpoint), "no checkpoint given: pass --checkpoint PATH (a model.pt from training)")
        check(
            bool(self.prompts) and all(isinstance(p, str) and p.strip() for p in self.prompts),
            'no prompt given: pass --prompt "a red circle moving left" (repeatable)',
        )
        check(self.out.lower().endswith(".mp4"), f"out={self.out!r}: must end in .mp4, e.g. --out sample.mp4")
        check(self.steps >= 1, f"steps={self.steps}: must be >= 1 (50 is the usual)")
        check(self.guidance >= 0, f"guidance={self.guidance}: must be >= 0 (1 = no guidance, 9 is the usual)")
        check(self.eta >= 0, f"eta={self.eta}: must be >= 0")
        check(self.fps is None or self.fps > 0, f"fps={self.fps}: must be > 0")
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device={self.device!r}: use auto, cpu, cuda or cuda:N",
        )


def output_paths(out: str | Path, n: int) -> list[Path]:
    """Where the videos of n prompts go: ``out`` itself for one, ``<stem>-<i>.mp4`` for several."""
    out = Path(out)
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"device={name!r} but no CUDA device is available; use --set device=cpu")
    return name


def run(cfg: SampleConfig) -> list[Path]:
    """Generate and write the videos; returns the mp4 paths (gifs sit beside them with .gif)."""
    from model.text_to_video import TextToVideo
    from pipelines import media

    device = resolve_device(cfg.device)
    image = None
    if cfg.image is not None:
        path = Path(cfg.image)
        if not path.is_file():
            raise FileNotFoundError(f"image {cfg.image!r} does not exist: pass an existing png/jpg with --image")
        image = media.decode_image(path.read_bytes())  # uint8 [h, w, 3]
    model = TextToVideo.from_checkpoint(cfg.checkpoint, device=device)
    log.info(
        "loaded %s (model %r, step %s, %d frames %dx%d) on %s",
        cfg.checkpoint,
        model.config.name,
        model.step,
        model.config.num_frames,
        model.config.width,
        model.config.height,
        device,
    )
    videos = model.generate(
        list(cfg.prompts),
        image=image,
        steps=cfg.steps,
        guidance=cfg.guidance,
        eta=cfg.eta,
        seed=cfg.seed,
        negative_prompt=cfg.negative_prompt,
        progress=True,
    )  # uint8 [b, f, h, w, 3]
    fps = cfg.fps or model.config.fps
    paths = output_paths(cfg.out, len(cfg.prompts))
    for prompt, frames, path in zip(cfg.prompts, videos, paths):
        media.write_mp4(frames, path, fps)
        line = f"wrote {path} ({frames.shape[0]} frames at {fps:g} fps) for {prompt!r}"
        if cfg.gif:
            gif = media.write_gif(frames, path.with_suffix(".gif"), fps)
            line += f" and {gif}"
        log.info(line)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t2v sample", description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="model.pt written by training (result.json 'checkpoint')")
    parser.add_argument("--prompt", action="append", dest="prompts", help="text prompt (repeatable)")
    parser.add_argument("--out", help="output mp4 path (default sample.mp4)")
    parser.add_argument("--gif", action="store_true", default=None, help="also write a looping gif")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 50)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 9)")
    parser.add_argument("--eta", type=float, help="DDIM eta (default 0)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--negative-prompt", dest="negative_prompt", help="unconditional prompt (default empty)")
    parser.add_argument("--image", help="conditioning image file (png/jpg)")
    parser.add_argument("--fps", type=float, help="output frame rate (default: the model's)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "set", "dry_run")}
    cfg = settings.resolve(parser, SampleConfig, args, flags)
    if cfg is not None:
        logs.setup()
        run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
