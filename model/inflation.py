"""Starting a Lumiere STUNet from a trained image model's TextToVideo checkpoint (what ``t2v train --set
model=tiny-stunet --set init_from=image_model.pt`` does): spatial UNet weights and stored encoders come from the
image model, the new temporal layers keep their initialisation (``model/stunet.py``)."""

from __future__ import annotations

from model import validation
from model.registry import ModelConfig
from model.stunet import inflate_from_image
from model.text_to_video import FORMAT, read_checkpoint
from model.validation import check


def is_image_model_for(model_config, path: str | None) -> bool:
    """Whether ``path`` is a TextToVideo checkpoint of a ModelScope-layout (image or video) model that a STUNet
    ``model_config`` starts from by inflation, rather than a checkpoint to resume as it is."""
    if getattr(model_config, "stunet", None) is None or not path:
        return False
    try:
        ckpt = read_checkpoint(path)
    except (OSError, ValueError):  # not our checkpoint: the released-weights loaders say what is wrong with it
        return False
    return ckpt.get("format") == FORMAT and ckpt["config"].get("stunet") is None


def inflate_model_from_image(model, path: str) -> list[str]:
    """Start a STUNet ``TextToVideo`` from an image model's checkpoint (``is_image_model_for``): its spatial UNet
    weights and, when the file stores them (random-initialised CLIP), its text and image encoders, so the inflated
    model reads prompts as the image model learnt to. Returns the UNet keys left at their initialisation."""
    ckpt = read_checkpoint(path)
    stored = validation.from_dict(ModelConfig, ckpt["config"])
    check(
        stored.encoders == model.config.encoders,
        f"{path}: the image model's encoders ({stored.encoders}) differ from this STUNet's "
        f"({model.config.encoders}); give the STUNet the image model's encoder settings",
    )
    for name in ("text_encoder", "image_encoder"):
        if ckpt.get(name) is not None:
            getattr(model, name).load_state_dict(ckpt[name])
    return inflate_from_image(model.unet, ckpt["unet"])


__all__ = ["inflate_model_from_image", "is_image_model_for"]
