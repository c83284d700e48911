"""The run config of ``imagen-lite train``: one dataclass, saved as ``train_config.json`` beside
the outputs and inside every checkpoint.

A setting lives here or in a saved component's ``config.json``, never both: the architecture of
a from-scratch model comes from its preset (``tiny``/``small``, see :mod:`.stages`), the run's
recipe from this dataclass. ``--config FILE`` reads a JSON object of these fields; command-line
flags override it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

FAMILY_STAGES = {
    "imagen": ("base", "sr"),
    "dalle2": ("clip", "prior", "decoder", "sr"),
}
TIMESTEP_BIAS = ("none", "later", "earlier", "range")


def check_timestep_bias(strategy: str, multiplier: float, portion: float, begin: int, end: int | None,
                        num_train_timesteps: int = 1000) -> None:  # fmt: skip
    """Reject a bad timestep-bias setting with a message naming the value and what is allowed."""
    if strategy not in TIMESTEP_BIAS:
        raise ValueError(f"timestep_bias_strategy={strategy!r}: one of {TIMESTEP_BIAS}")
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or multiplier < 0:
        raise ValueError(f"timestep_bias_multiplier={multiplier!r} must be a number >= 0 (1: no bias, 0: never)")
    if isinstance(portion, bool) or not isinstance(portion, (int, float)) or not 0.0 < portion <= 1.0:
        raise ValueError(f"timestep_bias_portion={portion!r} must be in (0, 1]")
    stop = num_train_timesteps if end is None else end
    if strategy == "range" and not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin < stop <= num_train_timesteps):
        raise ValueError(f"timestep_bias_begin={begin!r}, timestep_bias_end={end!r}: need 0 <= begin < end <= "
                         f"{num_train_timesteps} (end None: {num_train_timesteps})")  # fmt: skip


def timestep_bias_args(cfg) -> tuple:
    """(strategy, multiplier, portion, begin, end) of a run config with the ``timestep_bias_*``
    fields (TrainConfig, the default trainer's BaseRunConfig)."""
    return (cfg.timestep_bias_strategy, cfg.timestep_bias_multiplier, cfg.timestep_bias_portion,
            cfg.timestep_bias_begin, cfg.timestep_bias_end)  # fmt: skip


SCRATCH_PRESETS = ("tiny", "small")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")
FINETUNE = ("full", "lora")

# Fields that may change between a run and its resume without changing the math of a step --
# and ``lr``: a resume at another peak lr continues the restored schedule scaled to it (the
# loop rescales the optimizer's and scheduler's lrs), the usual way to drop the lr for a last
# phase of a long run (decision, fourth session: the DALL-E 2 decoder needed it).
RESUMABLE_CHANGES = frozenset(
    {"lr", "snr_floor", "timestep_bias_strategy", "timestep_bias_multiplier", "timestep_bias_portion",
     "timestep_bias_begin", "timestep_bias_end", "shapes_mixture", "shapes_contrast_group", "image_embed_dropout", "max_steps", "checkpoint_every", "keep_checkpoints", "validation_every", "validation_prompts",
     "validation_steps", "validation_guidance", "resume", "out", "log_every", "save_pipeline", "num_workers", "stop_at"}
)  # fmt: skip


@dataclass
class TrainConfig:
    """What ``imagen-lite train`` does; each field carries its reason."""

    # -- what
    family: str = "imagen"  # "imagen" (T5 -> base -> sr) or "dalle2" (CLIP -> prior -> decoder -> sr)
    stage: str = "base"  # one of FAMILY_STAGES[family]
    data: str = ""  # image folder, a `datasets` name/path, or "shapes" (the procedural stream)
    out: str = ""  # output pipeline directory; checkpoints go to OUT/checkpoints
    model: str = "tiny"  # start point: "tiny"/"small" (from scratch) or a pipeline dir / preset to fine-tune
    finetune: str = "full"  # "full" or "lora" (peft adapters on the UNets / prior; needs `pip install peft`)
    # -- data
    image_column: str = "image"  # `datasets` column; imagefolder metadata.jsonl uses file_name
    caption_column: str = "text"  # metadata.jsonl key / `datasets` column of the caption
    resolution: int | None = None  # None: the stage's own size; otherwise it must fit the UNet
    sr_crop: tuple = (16, 32)  # SR stages: low-res crop side range in px (Imagen trains SR on crops)
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    # (image_embed_dropout: beyond the caption-dropped samples, this share gets the learned
    # unconditional CLIP image embedding while its caption stays, so the decoder must read the text
    # tokens too, where the embedding binds colours to shapes weakly; 0: as Karlo / DALL-E 2)
    image_embed_dropout: float = 0.0  # dalle2 decoder: share of samples trained on their caption alone
    num_workers: int = 0  # image decoding threads (0: in the training process)
    # data "shapes": share of each caption kind, e.g. {"position": 0.5, "relation": 0.5}; None: the stream's default
    shapes_mixture: dict | None = None
    shapes_contrast_group: int = 1  # data shapes: g > 1 puts each position/relation caption's variants in one batch (CLIP hard negatives)
    # -- optimisation
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per process and micro-step
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4  # AdamW; LoRA runs often use 1e-4..1e-3, from-scratch 5e-4
    lr_schedule: str = "constant_with_warmup"  # one of LR_SCHEDULES (diffusers' get_scheduler)
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    min_snr_gamma: float | None = 5.0  # min-SNR loss weights (Hang et al. 2023); None: plain MSE
    snr_floor: float = 0.0  # x0-space weight clamp(SNR, snr_floor, gamma): >0 trains the high-noise (layout) steps
    # timestep sampling bias, as diffusers' SDXL training script's --timestep_bias_* (stages.timestep_bias_weights):
    # "later" multiplies the draw weight of the noisiest `portion` of the timesteps by `multiplier`
    timestep_bias_strategy: str = "none"  # one of TIMESTEP_BIAS
    timestep_bias_multiplier: float = 1.0  # draw weight of the biased timesteps (1: uniform, 0: never drawn)
    timestep_bias_portion: float = 0.25  # "later"/"earlier": the share of the timesteps that is biased
    timestep_bias_begin: int = 0  # "range": [begin, end)
    timestep_bias_end: int | None = None  # None: num_train_timesteps
    ema_decay: float | None = 0.999  # EMA of the trained weights (exported); None: off
    mixed_precision: str = "no"  # "no", "fp16", "bf16": trained weights stay float32 under autocast
    gradient_checkpointing: bool = False  # trade compute for memory on the trained UNets
    train_text_encoder: bool | None = None  # imagen base: train T5 jointly; None: only when from scratch
    # x/y coordinate input channels on the imagen base UNet / dalle2 decoder (CoordConv, tried for the
    # embedded default's ignored positions); None: as the start pipeline; 2: grow them (zero weights)
    coord_channels: int | None = None
    sr_noise_level_max: int | None = None  # SR augmentation level ~ U[0, max); None: the noising scheduler's range
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: = lora_rank (scale 1)
    lora_targets: tuple = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections
    seed: int = 0  # weights of from-scratch models, noise, timesteps, dropout, crops
    data_seed: int = 1  # data order: a pure function of (data_seed, step), so resume is exact
    # -- bookkeeping
    checkpoint_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # the newest K are kept
    validation_every: int = 0  # steps between validation images; 0: off
    validation_prompts: tuple = ()  # empty: the first 4 captions of the data
    validation_steps: int = 25  # denoising steps per stage for validation images
    validation_guidance: float = 4.0  # classifier-free guidance of validation images (1: off)
    log_every: int = 10  # steps between log lines (TensorBoard or OUT/logs/train_log.jsonl)
    save_pipeline: bool = True  # LoRA runs: also write the merged full pipeline (False: adapter only)
    resume: str | None = None  # None, "latest" or a checkpoint directory
    stop_at: int | None = None  # end this invocation at this step (checkpointed); continue with resume="latest"

    # ------------------------------------------------------------------ checks
    def check(self) -> "TrainConfig":
        """Reject bad values with a message naming the field, the value and what is allowed."""
        if self.family not in FAMILY_STAGES:
            raise ValueError(f"family={self.family!r} is not known; use one of {tuple(FAMILY_STAGES)}")
        if self.stage not in FAMILY_STAGES[self.family]:
            raise ValueError(
                f"stage={self.stage!r} is not a stage of family {self.family!r}; its stages are {FAMILY_STAGES[self.family]}"
            )
        if not self.data:
            raise ValueError("data is empty; pass --data DIR (an image folder), a `datasets` name/path, or 'shapes'")
        if not self.out:
            raise ValueError("out is empty; pass --out DIR, the output pipeline directory")
        choices = [("finetune", FINETUNE), ("mixed_precision", MIXED_PRECISION), ("lr_schedule", LR_SCHEDULES)]
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; use one of {allowed}")
        positive = ["max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints",
                    "lora_rank", "validation_steps", "log_every"]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.stop_at is not None and (isinstance(self.stop_at, bool) or not isinstance(self.stop_at, int) or self.stop_at < 1):
            raise ValueError(f"stop_at={self.stop_at!r} must be a positive integer (a step), or None")
        if self.coord_channels not in (None, 2):
            raise ValueError(f"coord_channels={self.coord_channels!r}: None (as the start pipeline) or 2 (add x/y channels)")
        for name in ("warmup_steps", "validation_every", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        if not 0.0 <= float(self.caption_dropout) <= 1.0:
            raise ValueError(f"caption_dropout={self.caption_dropout!r} must be in [0, 1]")
        if not 0.0 <= float(self.image_embed_dropout) <= 1.0:
            raise ValueError(f"image_embed_dropout={self.image_embed_dropout!r} must be in [0, 1]")
        if self.image_embed_dropout and (self.family, self.stage) != ("dalle2", "decoder"):
            raise ValueError(f"image_embed_dropout={self.image_embed_dropout!r} is for the dalle2 decoder, "
                             f"not {self.family} {self.stage} (only the decoder reads a CLIP image embedding)")  # fmt: skip
        if self.ema_decay is not None and not 0.0 < float(self.ema_decay) < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} must be in (0, 1), or None for no EMA")
        if self.min_snr_gamma is not None and float(self.min_snr_gamma) <= 0:
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma!r} must be > 0, or None for plain MSE")
        if isinstance(self.snr_floor, bool) or not isinstance(self.snr_floor, (int, float)) or self.snr_floor < 0:
            raise ValueError(f"snr_floor={self.snr_floor!r} must be a number >= 0 (0: plain min-SNR)")
        check_timestep_bias(*timestep_bias_args(self))
        if self.shapes_mixture is not None and self.data != "shapes":
            raise ValueError(f"shapes_mixture={self.shapes_mixture!r} is for data 'shapes' (got data={self.data!r})")
        g = self.shapes_contrast_group
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"shapes_contrast_group={g!r} must be an int >= 1 (1: independent scenes)")
        if g > 1 and self.data != "shapes":
            raise ValueError(f"shapes_contrast_group={g!r} is for data 'shapes' (got data={self.data!r})")
        if g > 1 and self.batch_size % g:
            raise ValueError(f"shapes_contrast_group={g!r} must divide batch_size={self.batch_size!r}, so no group is split "
                             f"across batches")  # fmt: skip
        if float(self.lr) <= 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        crop = tuple(self.sr_crop) if self.sr_crop else ()
        if crop and (len(crop) != 2 or not all(isinstance(c, int) and c >= 4 for c in crop) or crop[0] > crop[1]):
            raise ValueError(f"sr_crop={self.sr_crop!r} must be (min, max) low-res crop sides in px, 4 <= min <= max")
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, int)
                                            or self.resolution < 8):  # fmt: skip
            raise ValueError(f"resolution={self.resolution!r} must be an integer >= 8, or None for the stage's own size")
        if self.train_text_encoder and (self.family, self.stage) != ("imagen", "base"):
            raise ValueError(
                f"train_text_encoder=True is for family 'imagen' stage 'base' (T5 trained jointly); for "
                f"{self.family!r} {self.stage!r} train the text encoder with "
                + ("stage 'clip'" if self.family == "dalle2" else "stage 'base'")
            )
        if self.finetune == "lora" and self.stage == "clip":
            raise ValueError("finetune='lora' applies to the UNets and the prior; stage 'clip' trains the CLIP towers fully")
        return self

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a JSON object of TrainConfig fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source} has unknown field(s) {unknown}; known fields are {sorted(names)}")
        tuples = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, tuple)}
        return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def load(cls, path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid JSON ({err})") from None
        return cls.from_dict(data, source=f"config file {str(path)!r}")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def differences(saved: dict, current: "TrainConfig") -> dict:
    """Fields whose value in a checkpoint's config differs from ``current`` and that change the
    math of a step (so resuming with them would not continue the same run)."""
    now = json.loads(current.to_json())
    return {
        k: (saved.get(k), now[k])
        for k in now
        if k not in RESUMABLE_CHANGES and k in saved and saved.get(k) != now[k]
    }

