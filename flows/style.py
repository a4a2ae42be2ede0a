"""t2v style --checkpoint model.pt --style styled.pt --factor 0.6 --out runs/styled/model.pt

Blend a fine-tuned style's spatial (text-to-image) weights into a video model (Lumiere's stylised generation,
``model/style.py``): W = factor * W_style + (1 - factor) * W_model for every spatial weight, temporal layers as they
are. ``--style`` is the fine-tuned model's model.pt or a UNet state dict with our key names. The result is a model.pt
that ``t2v sample --checkpoint`` takes. Also runs as ``python -m flows.style``; ``--dry-run`` prints the settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines import logs, settings
from pipelines.settings import check

log = logging.getLogger("t2v.style")


@dataclass
class StyleConfig:
    checkpoint: str = ""  # the video model (model.pt)
    style: str = ""  # the fine-tuned spatial weights (model.pt or a UNet state dict)
    factor: float = 0.5  # 0 keeps the model, 1 takes the style's spatial weights
    out: str = "styled.pt"

    def __post_init__(self) -> None:
        check(bool(self.checkpoint), "no model given: pass --checkpoint model.pt")
        check(bool(self.style), "no style given: pass --style styled.pt (a fine-tuned model's weights)")
        check(0.0 <= self.factor <= 1.0, f"factor={self.factor}: must be within [0, 1] (0 = the model, 1 = the style)")
        check(self.out.endswith(".pt"), f"out={self.out!r}: must end in .pt, e.g. --out styled.pt")


def run(cfg: StyleConfig) -> Path:
    from model.style import blend_spatial
    from model.text_to_video import TextToVideo

    for name in ("checkpoint", "style"):
        if not Path(getattr(cfg, name)).is_file():
            raise FileNotFoundError(f"--{name} {getattr(cfg, name)!r} does not exist: pass an existing file")
    model = TextToVideo.from_checkpoint(cfg.checkpoint)
    names = blend_spatial(model.unet, cfg.style, cfg.factor)
    path = model.save(cfg.out, step=model.step, ema=model.ema)
    log.info(
        "wrote %s: %d spatial weights at %.2f x %s + %.2f x %s",
        path,
        len(names),
        cfg.factor,
        cfg.style,
        1 - cfg.factor,
        cfg.checkpoint,
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2v style", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", help="the video model (model.pt)")
    parser.add_argument("--style", help="fine-tuned spatial weights (model.pt or UNet state dict)")
    parser.add_argument("--factor", type=float, help="blend factor in [0, 1] (default 0.5)")
    parser.add_argument("--out", help="output model.pt (default styled.pt)")
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "set", "dry_run")}
    cfg = settings.resolve(parser, StyleConfig, args, flags)
    if cfg is not None:
        logs.setup()
        try:
            run(cfg)
        except (FileNotFoundError, ValueError) as e:
            print(f"t2v style: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
