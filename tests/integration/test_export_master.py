"""The exported weights are the optimizer's fp32 master weights, not a bf16 engine's rounded copy: a bf16 ZeRO-2
DeepSpeed engine on CPU (one gloo rank, in a child process: DeepSpeed keeps its process groups for the life of a
process) trains the tiny UNet a few steps, the training exporter writes model.pt / model_ema.pt, and the child
compares every tensor with the engine's fp32 masters and the EMA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, os, sys, torch
import deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from model.registry import get_config
from model.text_to_video import TextToVideo
from pipelines.training.config import TrainConfig
from pipelines.training.worker import Ema, Exporter, _skip_inference_shm_op, deepspeed_config

out = sys.argv[1]
_skip_inference_shm_op()
torch.manual_seed(0)
model = TextToVideo.build(get_config("tiny", {"num_frames": 2, "height": 16, "width": 16}))
cfg = TrainConfig(data=[], output=out, zero_stage=2, steps=3, ema_decay=0.9, lr=1e-2)
ds = deepspeed_config(cfg, world_size=1, branches=1)
ds["bf16"] = {"enabled": True}  # what a GPU run uses; DeepSpeed's CPU accelerator runs it too
engine, *_ = deepspeed.initialize(model=model.unet, model_parameters=list(model.unet.parameters()), config=ds)
ema = Ema(engine, cfg.ema_decay, rank=0)
g = torch.Generator().manual_seed(0)
for _ in range(3):
    x = torch.randn(2, 3, 2, 16, 16, generator=g).bfloat16()
    target = torch.randn(2, 3, 2, 16, 16, generator=g)  # the fresh UNet predicts 0: give it something to learn
    engine.backward((engine(x, torch.tensor([10, 500])).float() - target).pow(2).mean())
    engine.step()
    ema.update()
Exporter(model, engine, ema, 0, cfg, __import__("pathlib").Path(out), tracker=None).final(3, {})
raw = torch.load(f"{out}/model/model.pt", weights_only=True)["unet"]
ema_file = torch.load(f"{out}/model/model_ema.pt", weights_only=True)["unet"]
params = list(engine.module.named_parameters())
names = [n for n, _ in params]
report = {"dtypes": sorted({str(v.dtype) for v in raw.values()}), "module_dtype": str(params[0][1].dtype)}
report["raw_equals_master"] = all(torch.equal(raw[n], safe_get_full_fp32_param(p).float()) for n, p in params)
report["raw_differs_from_bf16_copy"] = any(not torch.equal(raw[n], p.float()) for n, p in params)
report["ema_equals_fp32_ema"] = all(torch.equal(ema_file[n], t) for n, t in zip(names, ema.tensors))
report["keys_match"] = set(raw) == set(model.unet.state_dict())
print("REPORT " + json.dumps(report))
"""


def test_exported_weights_are_the_fp32_master_weights(tmp_path, free_port):
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "export_master.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["module_dtype"] == "torch.bfloat16" and report["dtypes"] == ["torch.float32"]
    assert report["raw_equals_master"] and report["raw_differs_from_bf16_copy"]
    assert report["ema_equals_fp32_ema"] and report["keys_match"]
