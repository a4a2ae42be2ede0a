"""What ``t2v train`` can be told: ``TrainConfig``, and the names of what a training output directory holds.

    cfg = settings.load(TrainConfig, "train.yaml", ["steps=100"])     # or t2v train --set steps=100

The driver (``job.py``) and the worker loop (``worker.py``) both read it; neither imports the other's module
for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines.settings import check, check_choice
from pipelines.tracking import TrackingConfig
from pipelines.training.periodic_eval import PeriodicEvalConfig

CONFIG_FILE = "train_config.yaml"
RESULT_FILE = "result.json"
RUN_FILE = "mlflow_run.json"  # the MLflow run this output directory logs to (reused on resume)
EXPORT_DIR = "model"
RAY_DIR = "ray"
RAY_RUN_NAME = "train"
# Settings a checkpoint depends on (the architecture): resuming with another value is refused. Everything else
# (steps, lr, batch sizes, data) may change on resume; another num_workers or zero_stage resumes from the
# consolidated weights with a fresh optimizer state (worker.Reshard).
RESUME_FIXED = ("model", "model_overrides", "init_from")


@dataclass
class TrainConfig:
    """Everything one training run needs. ``t2v train --dry-run`` prints it resolved."""

    data: list[str] = field(default_factory=list)  # curation output directories (t2v curate --output)
    output: str = "runs/train"
    # model
    model: str = "tiny"  # model.registry registry name
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"encoders": {"vae_path": ...}}
    init_from: str | None = None  # TextToVideo model.pt, ModelScope/TF-T2V UNet file, or diffusers UNet folder
    # optimisation
    steps: int = 1000
    image_batch_size: int = 8  # per worker and step (content branch); 0: no image batches
    video_batch_size: int = 4  # per worker and step (motion branch); 0: no video batches
    text_free_fraction: float = 0.5  # share of the video batch from text-free clips (when both kinds exist)
    image_loss_weight: float = 1.0  # weight of the content-branch loss against the motion-branch loss
    lr: float = 1e-4
    spatial_lr_mult: float = 1.0  # TF-T2V trains pretrained spatial weights at 0.5
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 turns clipping off
    ema_decay: float = 0.999  # EMA weights; the effective decay ramps up as (1 + n) / (10 + n)
    # where the fp32 EMA lives: auto = host memory on GPUs under ZeRO 0-2 (there it would be a whole second copy on
    # one device), the device under ZeRO-3 (each rank keeps the EMA of its own partition) and on CPU
    ema_device: Literal["auto", "device", "cpu"] = "auto"
    # conditioning (TF-T2V)
    cfg_dropout: float = 0.1  # per sample: text -> negative-prompt embedding
    negative_prompt: str = ""  # also the unconditional input of sampling
    image_condition_prob: float = 0.5  # content branch: share of image batches conditioned on the image
    video_image_condition_prob: float = 0.5  # motion branch: share of video batches (clips) given the clip's image
    image_frame: Literal["middle", "first"] = "middle"  # the clip frame that is the image condition (TF-T2V: first)
    # per_batch: one condition choice for a whole branch batch; per_sample: the TF-T2V recipe, each sample chooses
    # (content: text or image; motion: image with video_image_condition_prob) and its conditions drop as VGen's
    # UNet drops them: p_all_zero of the samples lose every condition, p_all_keep keep all, and each condition of
    # the others drops with condition_dropout. A dropped text becomes dropped_text, a dropped image zero tokens.
    condition_sampling: Literal["per_batch", "per_sample"] = "per_batch"
    condition_dropout: float = 0.5  # VGen misc_dropout (its t2v_train.yaml: 0.4)
    p_all_zero: float = 0.1
    p_all_keep: float = 0.1
    dropped_text: Literal["negative_prompt", "zeros"] = "negative_prompt"  # zeros: as VGen multiplies y by 0
    # data
    frame_stride: int = 0  # 0: clip frames spread over the whole clip; k: every k-th frame (shapes=model)
    shuffle_block: int = 256
    prefetch: int = 4  # step batches prepared ahead (background thread)
    decode_workers: int = 2  # samples decoded in parallel (threads, in-process PyAV)
    decode_cache_mb: float = 0.0  # keep decoded clips in memory (small corpora read for many epochs)
    # clip shapes (pipelines/loader.py BucketPlan). model: every clip resized to the model's size and frames;
    # buckets: each batch is one bucket of the data (size and frames as curated), no padding
    shapes: Literal["model", "buckets"] = "model"
    pixel_budget: int = 0  # buckets: pixels (w x h x frames) per video batch; 0: video_batch_size at the model's
    bucket_weights: dict[str, float] = field(default_factory=dict)  # buckets: 448x256_16f or 448x256 -> weight
    frame_mixing: Literal["per_step", "per_rank"] = "per_step"  # buckets: per_rank trains rank r on frame_lens[r]
    frame_lens: list[int] = field(default_factory=list)  # per_rank: frames per rank, cycled (empty: the data's)
    # distribution
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    threads_per_worker: int = 0  # torch threads per worker; 0: cpus_per_worker
    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO optimizer state and step on the CPU (DeepSpeedCPUAdam)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # speed settings (pipelines/training/speed.py): each stops with the reason where this machine cannot do it
    activation_checkpointing: bool = (
        False  # recompute UNet block activations in backward: less memory, ~1/3 more compute
    )
    fused_adamw: bool = False  # torch's fused AdamW kernel (one launch per step instead of one per tensor)
    compile_unet: bool = False  # torch.compile the UNet inside the DeepSpeed engine (first steps compile)
    attention_backend: Literal["auto", "flash", "efficient", "math", "cudnn"] = "auto"  # auto: torch picks
    device_peak_tflops: float = 0.0  # one device's peak, for MFU; 0: known GPUs' bf16 peak, none on CPU
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config
    address: str | None = None  # Ray cluster address; None: $RAY_ADDRESS or a local Ray
    # checkpoints, faults
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 3  # worker-group restarts from the last checkpoint before giving up
    max_bad_fraction: float = 0.05  # stop when more than this share of samples read (or of shards) is unusable
    snapshot_every: int = 0  # also export model_ema.pt to model/snapshots/ every N steps (0: off)
    # samples and logging
    sample_every: int = 500  # sample videos for sample_prompts every N steps (0: off)
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle moving right", "a blue square moving up"])
    sample_steps: int = 25
    sample_guidance: float = 9.0
    sample_fps: float = 8.0
    periodic_eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)  # val/* metrics during training
    log_every: int = 1  # MLflow metrics every N steps
    print_every: int = 0  # progress line every N steps; 0: about 20 lines per run
    time_limit_minutes: float = 0.0  # stop (checkpoint + export) after this long, LR decayed; 0: no limit
    seed: int = 0
    mlflow: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="t2v-train"))
    log_model: bool = True  # log the final model to the run as an MLflow pyfunc generation model
    logged_model_name: str = "model"  # its name in the run
    logged_model_weights: Literal["ema", "raw"] = "ema"  # which exported weights it serves
    export_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # exported checkpoints: the fp32 master weights by default
    save_final: bool = True  # false: no checkpoint and no export at the end (benchmarks: figures only)
    debug_fail_at_step: int = 0  # tests: the last rank exits once at this step (fault-tolerance check)

    def __post_init__(self) -> None:
        check(isinstance(self.data, list), "data must be a list of curation output directories")
        check(bool(self.output), "output is empty: name a directory for checkpoints and the exported model")
        check(self.steps >= 1, f"steps={self.steps}: must be >= 1")
        check(self.image_batch_size >= 0 and self.video_batch_size >= 0, "batch sizes must be >= 0")
        check(
            self.image_batch_size + self.video_batch_size > 0,
            "image_batch_size and video_batch_size are both 0: at least one branch must train",
        )
        for name in (
            "text_free_fraction",
            "cfg_dropout",
            "image_condition_prob",
            "video_image_condition_prob",
            "min_lr_ratio",
            "condition_dropout",
            "p_all_zero",
            "p_all_keep",
        ):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"{name}={value}: must be within [0, 1]")
        check(self.lr > 0, f"lr={self.lr}: must be > 0")
        check(self.spatial_lr_mult >= 0, "spatial_lr_mult must be >= 0 (0 freezes the spatial layers' updates)")
        check(
            self.weight_decay >= 0 and self.grad_clip >= 0 and self.image_loss_weight >= 0,
            "weight_decay, grad_clip and image_loss_weight must be >= 0",
        )
        check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        check(0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay}: must be within [0, 1)")
        check_choice("ema_device", self.ema_device, ["auto", "device", "cpu"])
        check(self.frame_stride >= 0, "frame_stride must be >= 0 (0 spreads the frames over the whole clip)")
        check(
            self.shuffle_block >= 1 and self.prefetch >= 1 and self.decode_workers >= 1,
            "shuffle_block, prefetch and decode_workers must be >= 1",
        )
        check_choice("shapes", self.shapes, ["model", "buckets"])
        check_choice("frame_mixing", self.frame_mixing, ["per_step", "per_rank"])
        check(self.pixel_budget >= 0, "pixel_budget must be >= 0 (0: video_batch_size clips of the model's shape)")
        check(
            all(isinstance(w, (int, float)) and w >= 0 for w in self.bucket_weights.values()),
            f"bucket_weights={self.bucket_weights}: weights must be numbers >= 0, e.g. {{448x256_16f: 2.0}}",
        )
        check(
            all(isinstance(n, int) and n >= 1 for n in self.frame_lens),
            f"frame_lens={self.frame_lens}: must be frame counts >= 1, e.g. [16, 16, 32, 32]",
        )
        check(self.num_workers >= 1 and self.cpus_per_worker >= 1, "num_workers and cpus_per_worker must be >= 1")
        check(self.threads_per_worker >= 0, "threads_per_worker must be >= 0 (0: cpus_per_worker)")
        check_choice("zero_stage", self.zero_stage, [0, 1, 2, 3])
        check(
            not (self.offload_optimizer and self.zero_stage == 0),
            "offload_optimizer needs zero_stage >= 1 (DeepSpeed offloads ZeRO optimizer partitions)",
        )
        check_choice("precision", self.precision, ["auto", "bf16", "fp32"])
        check(
            not (self.precision == "bf16" and not self.use_gpu),
            "precision=bf16 needs use_gpu=true; CPU training runs in fp32 (precision=auto)",
        )
        check(self.checkpoint_every >= 1, "checkpoint_every must be >= 1 step")
        check(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1 (resume needs the latest checkpoint)")
        check(self.max_failures >= 0, "max_failures must be >= 0")
        check(0 <= self.max_bad_fraction <= 1, f"max_bad_fraction={self.max_bad_fraction}: must be within 0..1")
        for name in ("snapshot_every", "sample_every", "print_every", "debug_fail_at_step"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0 (0 turns it off)")
        check(self.log_every >= 1, "log_every must be >= 1")
        check(self.sample_steps >= 1, "sample_steps must be >= 1")
        check(
            not (self.sample_every and not self.sample_prompts),
            "sample_every > 0 needs sample_prompts (a list of prompts), or set sample_every=0",
        )
        check_choice("logged_model_weights", self.logged_model_weights, ["ema", "raw"])
        check(self.save_final or not self.log_model, "save_final=false exports no model to log: set log_model=false")
        check(self.device_peak_tflops >= 0, "device_peak_tflops must be >= 0 (0: known GPUs' bf16 peak)")
        check_choice("image_frame", self.image_frame, ["middle", "first"])
        check_choice("attention_backend", self.attention_backend, ["auto", "flash", "efficient", "math", "cudnn"])
        check_choice("export_dtype", self.export_dtype, ["fp32", "bf16", "fp16"])
        check_choice("condition_sampling", self.condition_sampling, ["per_batch", "per_sample"])
        check_choice("dropped_text", self.dropped_text, ["negative_prompt", "zeros"])
        check(
            self.p_all_zero + self.p_all_keep <= 1.0,
            f"p_all_zero + p_all_keep = {self.p_all_zero + self.p_all_keep}: must be <= 1 (shares of one batch)",
        )
        check(self.time_limit_minutes >= 0, "time_limit_minutes must be >= 0 (0: no limit)")

    @property
    def bf16(self) -> bool:
        return self.use_gpu and self.precision in ("auto", "bf16")

    @property
    def ema_on_cpu(self) -> bool:
        if self.ema_device == "auto":
            return self.use_gpu and self.zero_stage < 3
        return self.ema_device == "cpu"
