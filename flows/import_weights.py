"""t2v import --from tf-t2v tft2v_t2v_non_ema_512000.pth --out runs/imported/tf-t2v

Turn released weights into a checkpoint (``DIR/model.pt``, the ``TextToVideo`` format) that ``t2v sample
--checkpoint``, ``t2v train --set init_from=`` and ``t2v evaluate`` take. Also runs as
``python -m flows.import_weights``.

    --from modelscope PATH   ModelScopeT2V's text2video_pytorch_model.pth -> config modelscope-1.7b
    --from tf-t2v PATH       a TF-T2V UNet file ({'state_dict', 'step'} or bare)  -> config tf-t2v
    --from sd2 PATH          a Stable Diffusion 2.x UNet (LDM .ckpt/.safetensors or diffusers UNet folder),
                             inflated into a video UNet (default config modelscope-1.7b, the layout SD 2.x fits)
    --from diffusers DIR     a diffusers UNet folder: UNet3DConditionModel (ModelScope's diffusers port) is
                             converted, UNet2DConditionModel (SD) inflated

Released files load strictly: a missing, unexpected or mis-shaped key is an error that names the config whose
layout the file has. ``--model`` picks another registry config and ``--set model_overrides.KEY=VALUE`` changes it
(e.g. the encoders' local weight paths, which sampling and training need). Nothing is written unless the whole
import succeeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import logs, settings
from pipelines.settings import check, check_choice

log = logging.getLogger("t2v.import")

SOURCES = ("modelscope", "tf-t2v", "sd2", "diffusers")
DEFAULT_MODEL = {"modelscope": "modelscope-1.7b", "tf-t2v": "tf-t2v", "sd2": "modelscope-1.7b"}
CHECKPOINT_NAME = "model.pt"


@dataclass
class ImportConfig:
    source: str = ""  # modelscope | tf-t2v | sd2 | diffusers (--from)
    path: str = ""  # the released file or folder
    out: str = ""  # output directory; the checkpoint is <out>/model.pt
    model: str | None = None  # registry config (None: the one the source is: modelscope-1.7b or tf-t2v)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"encoders": {"vae_path": ...}}
    seed: int = 0  # initialises what the source lacks (an inflated image UNet's temporal layers)

    def __post_init__(self) -> None:
        check_choice("source (--from)", self.source, list(SOURCES))
        check(bool(self.path), "no weights given: pass the released file or folder after --from SOURCE")
        check(bool(self.out), "no output given: pass --out DIR (the checkpoint is written as DIR/model.pt)")

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL.get(self.source, "modelscope-1.7b")


def build_unet_state(cfg: ImportConfig, model_config) -> tuple[dict, int]:
    """The UNet weights under ``model_config`` and the source's training step (0 when it has none)."""
    import torch

    from model.released import inflate_image_unet, load_released, read_image_unet
    from model.unet import build_unet

    torch.manual_seed(cfg.seed)
    unet = build_unet(model_config.unet)
    path = Path(cfg.path)
    step = 0
    if cfg.source in ("modelscope", "tf-t2v"):
        step = load_released(unet, path, model_config.name).step or 0
    elif cfg.source == "diffusers" and _diffusers_class(path) == "UNet3DConditionModel":
        from diffusers import UNet3DConditionModel

        from model.convert import diffusers_to_modelscope

        state = diffusers_to_modelscope(UNet3DConditionModel.from_pretrained(str(path)).state_dict(), unet.cfg)
        load_released(unet, state, model_config.name)
    else:  # sd2, or a diffusers UNet2DConditionModel folder
        report = inflate_image_unet(unet, read_image_unet(path, unet.cfg))
        log.info("inflated %s: %d layers kept their initialisation", path, len(report.missing_allowed))
    return unet.state_dict(), step


def _diffusers_class(path: Path) -> str | None:
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers folder (no config.json): pass a diffusers UNet folder")
    return json.loads(config.read_text(encoding="utf-8")).get("_class_name")


def run(cfg: ImportConfig) -> Path:
    """Import and write ``<out>/model.pt``; returns its path. Raises before writing anything when it cannot."""
    from model.registry import get_config
    from model.text_to_video import write_checkpoint

    if not Path(cfg.path).exists():
        raise FileNotFoundError(f"{cfg.path!r} does not exist: pass the local released file or folder")
    model_config = get_config(cfg.model_name, cfg.model_overrides or None)
    state, step = build_unet_state(cfg, model_config)
    path = write_checkpoint(Path(cfg.out) / CHECKPOINT_NAME, model_config, state, step=step)
    log.info("wrote %s (config %s, step %d) from %s %s", path, model_config.name, step, cfg.source, cfg.path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t2v import", description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--from", dest="source", choices=SOURCES, help="what the weights are")
    parser.add_argument("path", nargs="?", help="the released file or folder")
    parser.add_argument("--out", help="output directory (the checkpoint is OUT/model.pt)")
    parser.add_argument("--model", help="registry config (default: modelscope-1.7b, or tf-t2v for --from tf-t2v)")
    parser.add_argument("--seed", type=int, help="seed for layers the source lacks (default 0)")
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "set", "dry_run")}
    cfg = settings.resolve(parser, ImportConfig, args, flags)
    if cfg is None:
        return 0
    logs.setup()
    try:
        path = run(cfg)
    except (FileNotFoundError, ValueError) as e:  # unreadable file, wrong layout, bad config
        print(f"t2v import: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
