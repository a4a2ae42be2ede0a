"""t2v sample --checkpoint runs/train/model/model_ema.pt --prompt "a red circle moving left" --out sample.mp4 [--gif]

Generate videos from a trained or imported checkpoint (``TextToVideo`` format), or straight from a released
ModelScopeT2V / TF-T2V UNet file with ``--model`` naming its config, and write them as playable H.264 mp4 files
(and looping gifs with ``--gif``). Also runs as ``python -m flows.sample``.

    t2v sample --checkpoint model.pt --prompt "a red circle moving left" --prompt "a blue square moving up"
        --out out.mp4 --steps 50 --guidance 9 --seed 0 [--image first_frame.png] [--negative-prompt "..."]
    t2v sample --checkpoint lumiere.pt --prompt "..." --inpaint video.mp4 --mask mask.png   (or --image first.png,
        --cinemagraph image.png --mask region.png: models trained with masked conditioning, model/masked.py)
    t2v sample --checkpoint composer.pt --prompt "a red circle" --condition motion=clip.mp4 --condition
        sketch=edges.png   (structure conditions, any subset of the model's: flows/condition_inputs.py)
    t2v sample --checkpoint ssr.pt --prompt "..." --upscale low_res.mp4 --window 8 --stride 4   (super-resolution
        over overlapping temporal windows, MultiDiffusion: model/multidiffusion.py)
    t2v sample --checkpoint tft2v_t2v_non_ema_512000.pth --model tf-t2v --prompt "a corgi running on the beach"
        --set model_overrides.encoders.vae_path=... --set model_overrides.encoders.clip_pretrained=...

Steps, guidance, eta, negative prompt and timestep spacing default to the model's ``sampling`` settings (the
released sampler for the released configs).

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
from typing import Any

from pipelines import logs, settings
from pipelines.settings import check

log = logging.getLogger("t2v.sample")


@dataclass
class SampleConfig:
    checkpoint: str = ""  # model.pt written by training, t2v import or TextToVideo.save; or a released UNet file
    model: str | None = None  # registry config of a released UNet file (modelscope-1.7b, tf-t2v); None: model.pt
    model_overrides: dict[str, Any] = field(default_factory=dict)  # with model: e.g. {"encoders": {"vae_path": ..}}
    prompts: list[str] = field(default_factory=list)
    out: str = "sample.mp4"
    gif: bool = False  # also write a looping gif beside each mp4
    steps: int | None = None  # DDIM steps (None: the model's sampling.steps, 50)
    guidance: float | None = None  # classifier-free guidance scale (1 = no guidance; None: the model's, 9)
    eta: float | None = None  # DDIM stochasticity (0 = deterministic ODE; None: the model's)
    seed: int = 0
    negative_prompt: str | None = None  # the unconditional side of guidance (None: the model's)
    timestep_spacing: str | None = None  # trailing | leading (None: the model's)
    image: str | None = None  # conditioning image file (CLIP image embedding; the first frame for masked models)
    inpaint: str | None = None  # video to inpaint where --mask is white (masked models, flows/masked_inputs.py)
    cinemagraph: str | None = None  # image to animate where --mask is white (masked models)
    mask: str | None = None  # png (or mp4 for --inpaint): white marks the region
    upscale: str | None = None  # low-resolution video for a super-resolution model (model/multidiffusion.py)
    window: int | None = None  # --upscale: frames per temporal window (None: the model's ssr.window or num_frames)
    stride: int | None = None  # --upscale: frames between window starts (None: half a window)
    fps: float | None = None  # output frame rate; default: the model's fps
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    conditions: dict[str, str] = field(default_factory=dict)  # kind -> file (flows/condition_inputs.py)
    depth_model: str | None = None  # local depth network for a depth condition given as media
    guide_conditions: bool = False  # guidance contrasts prompt + conditions with neither (follows them more closely)

    def __post_init__(self) -> None:
        check(bool(self.checkpoint), "no checkpoint given: pass --checkpoint PATH (a model.pt from training)")
        check(
            bool(self.prompts) and all(isinstance(p, str) and p.strip() for p in self.prompts),
            'no prompt given: pass --prompt "a red circle moving left" (repeatable)',
        )
        check(self.out.lower().endswith(".mp4"), f"out={self.out!r}: must end in .mp4, e.g. --out sample.mp4")
        check(self.steps is None or self.steps >= 1, f"steps={self.steps}: must be >= 1 (50 is the usual)")
        check(
            self.guidance is None or self.guidance >= 0,
            f"guidance={self.guidance}: must be >= 0 (1 = no guidance, 9 is the usual)",
        )
        check(self.eta is None or self.eta >= 0, f"eta={self.eta}: must be >= 0")
        check(
            self.timestep_spacing in (None, "trailing", "leading"),
            f"timestep_spacing={self.timestep_spacing!r}: use trailing or leading",
        )
        check(
            not (self.model_overrides and not self.model),
            "model_overrides apply to a released UNet file: also pass --model modelscope-1.7b|tf-t2v",
        )
        check(self.fps is None or self.fps > 0, f"fps={self.fps}: must be > 0")
        given = [f"--{name}" for name in ("image", "inpaint", "cinemagraph", "upscale") if getattr(self, name)]
        check(len(given) <= 1, f"{' and '.join(given)}: give one of --image, --inpaint, --cinemagraph, --upscale")
        check(
            (self.window is None and self.stride is None) or bool(self.upscale),
            "--window and --stride go with --upscale low_res.mp4",
        )
        check(
            not (self.mask and not (self.inpaint or self.cinemagraph)),
            "--mask goes with --inpaint video.mp4 or --cinemagraph image.png",
        )
        check(
            not (self.conditions and given),
            f"--condition and {' '.join(given)} both fill the extra input channels: give one of them",
        )
        check(not (self.guide_conditions and not self.conditions), "--guide-conditions goes with --condition KIND=PATH")
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


def load_model(cfg: SampleConfig, device: str):
    """The TextToVideo to sample: a model.pt, or a released UNet file under the registry config ``cfg.model``."""
    from model.registry import get_config
    from model.text_to_video import TextToVideo, from_released

    if cfg.model is None:
        return TextToVideo.from_checkpoint(cfg.checkpoint, device=device)
    return from_released(cfg.checkpoint, get_config(cfg.model, cfg.model_overrides or None), device)


def run(cfg: SampleConfig) -> list[Path]:
    """Generate and write the videos; returns the mp4 paths (gifs sit beside them with .gif)."""
    from pipelines import media

    device = resolve_device(cfg.device)
    image = None
    if cfg.image is not None:
        path = Path(cfg.image)
        if not path.is_file():
            raise FileNotFoundError(f"image {cfg.image!r} does not exist: pass an existing png/jpg with --image")
        image = media.decode_image(path.read_bytes())  # uint8 [h, w, 3]
    model = load_model(cfg, device)
    if cfg.upscale:
        return _upscale(cfg, model)
    from flows.masked_inputs import masked_concat

    concat = masked_concat(model, cfg.image, cfg.inpaint, cfg.cinemagraph, cfg.mask)
    conditions = None
    if cfg.conditions:
        from flows.condition_inputs import load_conditions

        conditions = load_conditions(model, cfg.conditions, cfg.depth_model)
    if concat is not None and not model.config.unet.image_embed_dim:
        image = None  # the image is the first frame only: this model has no CLIP image condition
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
        spacing=cfg.timestep_spacing,
        concat=concat,
        conditions=conditions,
        guide_conditions=cfg.guide_conditions,
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


def _upscale(cfg: SampleConfig, model) -> list[Path]:
    """Super-resolve ``cfg.upscale`` with MultiDiffusion over temporal windows, one video per prompt."""
    from flows.masked_inputs import read_video
    from model.multidiffusion import super_resolve
    from pipelines import media

    low = read_video(cfg.upscale, "--upscale")
    fps = cfg.fps or model.config.fps
    paths = output_paths(cfg.out, len(cfg.prompts))
    for i, (prompt, path) in enumerate(zip(cfg.prompts, paths)):
        frames = super_resolve(
            model,
            low,
            prompt,
            window=cfg.window,
            stride=cfg.stride,
            steps=cfg.steps,
            guidance=cfg.guidance,
            seed=cfg.seed + i,
        )
        media.write_mp4(frames, path, fps)
        log.info(
            "wrote %s (%d frames, %dx%d) from %s for %r",
            path,
            len(frames),
            frames.shape[2],
            frames.shape[1],
            cfg.upscale,
            prompt,
        )
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t2v sample", description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="model.pt (training, t2v import) or a released UNet file with --model")
    parser.add_argument("--model", help="registry config of a released UNet file: modelscope-1.7b or tf-t2v")
    parser.add_argument("--prompt", action="append", dest="prompts", help="text prompt (repeatable)")
    parser.add_argument("--out", help="output mp4 path (default sample.mp4)")
    parser.add_argument("--gif", action="store_true", default=None, help="also write a looping gif")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the model's, 50)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, 9)")
    parser.add_argument("--eta", type=float, help="DDIM eta (default: the model's, 0)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--negative-prompt", dest="negative_prompt", help="unconditional prompt (default: the model's)")
    parser.add_argument("--image", help="conditioning image file (png/jpg); a masked model starts the video from it")
    parser.add_argument("--inpaint", help="video to inpaint where --mask is white (masked models)")
    parser.add_argument("--cinemagraph", help="image to animate where --mask is white (masked models)")
    parser.add_argument("--mask", help="png (or mp4 for --inpaint) whose white pixels mark the region")
    parser.add_argument("--upscale", help="low-resolution video for a super-resolution model (any length)")
    parser.add_argument("--window", type=int, help="--upscale: frames per temporal window")
    parser.add_argument("--stride", type=int, help="--upscale: frames between window starts")
    parser.add_argument("--fps", type=float, help="output frame rate (default: the model's)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument(
        "--condition",
        action="append",
        dest="conditions",
        metavar="KIND=PATH",
        help="structure condition (repeatable): motion|sketch|depth = a video, image or .npy of the model's size",
    )
    parser.add_argument("--depth-model", dest="depth_model", help="local depth network (.pt2) for --condition depth=")
    parser.add_argument(
        "--guide-conditions",
        dest="guide_conditions",
        action="store_true",
        default=None,
        help="guidance pushes towards the conditions as well as the prompt (follows them more closely)",
    )
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.conditions:
        pairs = [c.split("=", 1) for c in args.conditions]
        bad = [c for c, pair in zip(args.conditions, pairs) if len(pair) != 2 or not pair[0] or not pair[1]]
        if bad:
            parser.error(f"--condition {bad[0]!r}: use KIND=PATH, e.g. --condition sketch=edges.png")
        args.conditions = dict(pairs)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "set", "dry_run")}
    cfg = settings.resolve(parser, SampleConfig, args, flags)
    if cfg is not None:
        logs.setup()
        try:
            run(cfg)
        except (FileNotFoundError, ValueError) as e:  # unreadable or unfitting checkpoint, bad image or mask
            print(f"t2v sample: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
