"""Checkpoints load without running pickled code: a checkpoint carrying a payload is refused, and nothing runs."""

from __future__ import annotations

import os

import pytest
import torch


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: run code when loaded
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_load_with_weights_only(tmp_path):
    from flows.registry import find_checkpoint
    from model.text_to_video import TextToVideo

    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    bad = tmp_path / "model" / "model.pt"
    bad.parent.mkdir()
    torch.save({"format": "t2v-platform/1", "config": {}, "unet": payload}, bad)
    with pytest.raises(ValueError, match="not a t2v-platform checkpoint"):
        TextToVideo.from_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="no t2v-platform checkpoint"):
        find_checkpoint(bad.parent)
    assert not marker.exists(), "loading a checkpoint ran pickled code"
