"""Training the embedded default on the ``shapes`` domain, on a 2-core CPU, run after run.

``scripts/train_default.py`` drives this module. Reads top to bottom: config -> build (or resume)
-> loop (render batch, noise, predict, weighted loss, step, EMA) -> periodic checkpoint and
shapes evaluation -> export a pipeline directory.

Recipe and why (measurements in issue #10 and ``docs/model_card.md``):
- The 64px base runs on 48x16x16 pixel-unshuffled input (4x4 patches; channels 48/96/192,
  attention at 8x8 and 4x4): 0.86 s per batch-32 step in float32 on this machine's 2 cores
  (AMD EPYC, AVX2, no AVX-512 BF16), where 12x32x32 (2x2 patches) with attention at 16x16
  cost ~10 s. bf16 autocast is off: without AVX-512 BF16 it ran 3x slower here.
- It predicts x0 (``prediction_type="sample"``) on a cosine schedule with min-SNR-5 loss
  weights: clean flat shapes within minutes, where epsilon prediction gave colour blobs.
- The T5 encoder (word-level tokenizer, one token per word) trains jointly with the base:
  there is no pretrained T5 that knows the shapes grammar offline.
- Captions are dropped (replaced by "") 10% of the time, for classifier-free guidance.
- Sampling uses an EMA of the weights; the resume state lives outside the repository.

Resuming on a new machine: every exported pipeline directory carries ``training_state.json``
(per stage: optimizer steps, wall hours, run config). When a stage's cache holds no
checkpoint, a run starts from the shipped weights instead of from scratch ("warm start"):
model and EMA both start from the shipped EMA weights (fp16 -> fp32), the step and hour
counters continue from the recorded ones, and AdamW starts afresh with its warm-up (its
moments are not shipped: 2x the weights for no sampling benefit). The data order is a pure
function of the step, so the run continues the same data stream. A run config whose
architecture differs from the shipped one is an error, not a silent reinitialisation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..data import shapes
from ..models import components as C
from .. import runtime, sampling
from ..sampling import pixel_unshuffle, upsample
from .checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from .config import check_timestep_bias, timestep_bias_args
from .stages import sample_timesteps, snr_floor_weight, timestep_bias_weights

logger = logging.getLogger("imagen_lite.train")

DEFAULT_CACHE = Path(os.environ.get("IMAGEN_LITE_CACHE", Path.home() / ".cache" / "imagen-lite")) / "train_default"
TRAINING_STATE_FILE = "training_state.json"  # per stage {step, cpu_hours, config}, in every exported directory
# Work-in-progress weights of a lineage that does not ship yet (fp16 exports with training_state.json,
# committed so the next session resumes it on a new machine); outside the package.
WIP_DIR = Path(__file__).resolve().parents[2] / "wip"


def lineage_name(stage: str, recipe: str) -> str:
    """The cache (and wip/) folder name of ``stage`` in lineage ``recipe``: "imagen-base" for v1,
    the lineage that ships; "imagen-base-v2" for v2."""
    return stage if recipe == "v1" else f"{stage}-{recipe}"
WARM_START_FILE = "warm_start.json"  # in a DALL-E 2 stage folder seeded by shipped weights: {step, from, cpu_hours}
ARCHITECTURE_FIELDS = {"imagen-base": ("t5", "unet", "unshuffle_factor", "max_length", "coord_channels"),
                       "imagen-sr": ("unet", "unshuffle_factor"), "imagen-refiner": ("size",)}  # fmt: skip


def _read_json(path: Path) -> dict:
    """A JSON file's content, or {} when there is none yet."""
    return json.loads(path.read_text()) if path.is_file() else {}


def read_training_state(directory) -> dict:
    return _read_json(Path(directory) / TRAINING_STATE_FILE)


def write_training_state(directory, stages: dict) -> None:
    """Merge ``stages`` ({stage: {step, cpu_hours, config}}) into ``directory``'s training state."""
    state = {**read_training_state(directory), **stages}
    (Path(directory) / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2))


def recipe_of(state: dict, stage: str) -> str:
    """The lineage (``--recipe``) of ``stage`` in a read training state: its record's ``"recipe"``;
    "v1" for a record without one (ships before the twelfth session, all v1)."""
    return state.get(stage, {}).get("recipe", "v1")


def shipped_recipe(directory, stage: str) -> str:
    """``recipe_of`` the training state of an exported directory."""
    return recipe_of(read_training_state(directory), stage)


def record_recipe(directory, stages, recipe: str) -> None:
    """Mark ``stages``' records in ``directory``'s training state as lineage ``recipe`` (ship_default
    does, so that a later run of another lineage never warm-starts from these weights)."""
    state = read_training_state(directory)
    write_training_state(directory, {s: {**state[s], "recipe": recipe} for s in stages if s in state})


def _comparable(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as a saved config reads back


def shipped_stage(directory, stage: str, cfg) -> dict:
    """The recorded state of ``stage`` in an exported directory, checked against ``cfg``'s
    architecture; raises ``ValueError`` naming the differing fields."""
    state = read_training_state(directory).get(stage)
    if state is None:
        raise ValueError(f"{str(directory)!r} has no {TRAINING_STATE_FILE} entry for stage {stage!r}; "
                         f"it cannot seed a run (pass --warm-start none to start from scratch)")  # fmt: skip
    ours = _comparable(asdict(cfg))
    defaults = _comparable(asdict(type(cfg)()))  # a field recorded before it existed had its default
    theirs = {k: _comparable(state["config"].get(k, defaults[k])) for k in ARCHITECTURE_FIELDS[stage]}
    if stage == "imagen-base" and theirs["coord_channels"] == 0:
        theirs["coord_channels"] = ours["coord_channels"]  # growable: _load_fp16 zero-initialises them
    differ = [k for k in ARCHITECTURE_FIELDS[stage] if theirs[k] != ours[k]]
    if differ:
        listed = ", ".join(f"{k}: shipped {state['config'].get(k)!r} vs run {ours[k]!r}" for k in differ)
        raise ValueError(f"the {stage} weights in {str(directory)!r} have another architecture ({listed}); "
                         f"train with the shipped config, or pass --warm-start none to start from scratch")  # fmt: skip
    return state


shapes_vocabulary = shapes.vocabulary  # the word-level tokenizer's vocabulary (kept name)


@dataclass
class BaseRunConfig:
    """The Imagen-family 64px base + jointly trained T5 (fields carry their reason)."""

    batch_size: int = 32  # ~0.9 s/step on this AVX2 2-core CPU (no AVX-512 BF16 here)
    lr: float = 5e-4  # constant after warm-up; lower it on resume when accuracy stalls
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999  # sampling from the EMA broke the 20% plateau in issue #10's run
    caption_dropout: float = 0.1  # classifier-free guidance needs an unconditional branch
    min_snr_gamma: float = 5.0  # min-SNR-5 weighting (Hang et al. 2023), x0 target
    # x0 weight clamp(SNR, snr_floor, gamma) (stages.snr_floor_weight): through step 10,400 it was 0,
    # which left the high-noise steps (layout: positions, relations) untrained
    snr_floor: float = 0.0
    # timestep bias (diffusers' SDXL script's --timestep_bias_*; stages.timestep_bias_weights). The
    # sixth session's layout phase (from step 12,800) used "later" 0.2 x 10 (71% of the draws at
    # t >= 800, where a sample's layout is decided) to 14,600, then "range" [850, 1000) x 30 with
    # position/relation captions only: positions appeared in the raw weights by 16,200 (model card)
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int | None = None
    unshuffle_factor: int = 4  # base UNet sees 48x16x16: attention at 16x16 cost ~8x a step at r=2 here
    bf16: bool = False  # CPU autocast pays only with AVX-512 BF16; on AVX2 it was 3x slower (measured)
    seed: int = 0
    data_seed: int = 1
    exclude_heldout: bool = True  # held-out compositions measure generalisation
    mixture: dict = field(
        default_factory=lambda: {"single": 0.15, "position": 0.2, "two_objects": 0.2, "relation": 0.25, "counting": 0.2}
    )  # harder kinds (position, relation) sampled more often
    t5: dict = field(default_factory=lambda: dict(d_model=128, num_layers=3, num_heads=4, d_ff=256, d_kv=32))
    unet: dict = field(
        default_factory=lambda: dict(
            block_out_channels=(48, 96, 192), layers_per_block=1, attention_head_dim=32,
            cross_attention_dim=128, attention_levels=(False, True, True),
        )
    )  # fmt: skip
    max_length: int = 16  # the longest shapes caption is 11 words + </s>
    checkpoint_every: int = 200
    eval_every: int = 500
    eval_prompts: int = 40
    eval_sampler: str = "ddpm"  # the shipped base sampler; the curve up to step 7,400 used "ddim"
    # 2: x/y coordinate channels after the noisy image (CoordConv; ImagenPipeline's coord_channels).
    # The cache run has had them since step 9,200; the trained base ignores them (zeroing them moves
    # its x0 prediction by 0.1%), and positions came from the layout phase, not from them (sixth
    # session, model card). A run with 2 may warm-start from weights without them
    # (components.grow_input_channels).
    coord_channels: int = 0
    # {step: {field: value}}: settings that change at a step (lr drops, layout phases), applied by
    # ``train_base_plan`` chunk by chunk; only BASE_PHASE_FIELDS. A resumed run re-applies every
    # phase at or before its step, so a phase's value wins over a --set of the same field.
    phases: dict = field(default_factory=dict)
    # Weight of an auxiliary binding loss on the T5's outputs (0: off; ``binding_loss``). Fourteenth
    # session: linear probes found that the jointly trained T5 barely carries which colour goes with
    # which shape (its output at a shape word names that object's colour 27% of the time, chance 17%;
    # the DALL-E 2 CLIP text tower's: 100%), and "binding swapped" is the v2 base's most common
    # failure. The UNet's cross-attention sees no word order, so an unbound T5 leaves it guessing.
    # Tried as a fine-tune of the shipped v2 base (phase {"20600": {"binding_weight": 0.5}}, 3,866
    # steps): the term fell (the tied readout names 54% of two-object colours), the images did not
    # change (60.3% against 59.3%, binding swaps 74 against 71 on 600): not shipped. 0.05 was too weak
    # to move the T5 at all. Binding from step 0 of a new lineage did pay: BASE_RECIPES["v3"].
    binding_weight: float = 0.0
    # Weight of an auxiliary layout loss on the T5's outputs (0: off; ``layout_loss``). Sixteenth
    # session: a linear probe (``scripts/probe_text_layout.py``: every relation caption of the
    # grammar, 70/30 split) reads an object's side in a relation caption off v3's T5 output at its
    # shape word 38% of the time (chance 25%), and v3's relations sit at chance (20%; 47 of 120
    # relation images have the right objects on the wrong sides). The binding loss's remedy again:
    # make each shape word's output name where its object goes.
    layout_weight: float = 0.0


# Fields a base phase may change: the ones a resume may change without touching the architecture.
BASE_PHASE_FIELDS = frozenset(
    {"lr", "snr_floor", "timestep_bias_strategy", "timestep_bias_multiplier", "timestep_bias_portion",
     "timestep_bias_begin", "timestep_bias_end", "mixture", "caption_dropout", "eval_every", "checkpoint_every", "bf16",
     "binding_weight", "layout_weight"}
)  # fmt: skip

# Named recipes of the Imagen base, as changes to BaseRunConfig's defaults applied when a run starts
# from scratch (a resumed run keeps its checkpoint's config). "v1" is the lineage that ships (its
# later changes were --set on resume; docs/model_card.md lists them). "v2" (eleventh session) is
# a new lineage from scratch with what v1 learned put in from step 0, so it gets its own 8
# reference hours (the tenth session's budget reading, docs/model_card.md):
# - snr_floor 1 and a mild high-noise bias ("later" 0.25 x 2: 40% of the draws at t >= 750):
#   v1's positions appeared only once the high-noise steps, where layout is decided, were
#   trained (its min-SNR weights had left them ~0 until step 10,400);
# - more two-object, relation and counting captions (v1's weakest categories), fewer singles;
# - no coordinate channels (they helped in no v1 run);
# - bf16 autocast: on this session's AVX-512 BF16 machine (scripts/budget_speed.py's class)
#   the UNet step is 0.365 s against 0.405 s in float32 (on AVX2-only machines it is 3x slower:
#   --set bf16=false there).
V2_MIXTURE = {"single": 0.1, "position": 0.2, "two_objects": 0.25, "relation": 0.25, "counting": 0.2}
# The range phase's captions: positions and relations only (v1's base, sixth session; the DALL-E 2 decoder's too).
RANGE_MIXTURE = {"position": 0.7, "relation": 0.3}
# v1's range phase: 84% of the draws in t [850, 1000), where a layout is decided, lr 5e-4. In v1 it
# made positions appear (20% -> 85% with the consolidation after it) where lr drops had not.
BASE_RANGE_PHASE = dict(lr=5e-4, timestep_bias_strategy="range", timestep_bias_multiplier=30.0, timestep_bias_begin=850,
                        timestep_bias_end=1000, mixture=RANGE_MIXTURE)  # fmt: skip
# v1's consolidation ("later" 0.2 x 10: 71% of the draws at t >= 800) with v2's weak kinds weighted
BASE_CONSOLIDATION_PHASE = dict(lr=2e-4, timestep_bias_strategy="later", timestep_bias_multiplier=10.0,
                                timestep_bias_portion=0.2, timestep_bias_begin=0, timestep_bias_end=None,
                                mixture={"single": 0.1, "position": 0.3, "two_objects": 0.2, "relation": 0.25, "counting": 0.15})  # fmt: skip
# v2's settings from step 0, and its range -> consolidation -> lr 1e-4 phases (v3 shares both)
V2_SETTINGS = dict(bf16=True, snr_floor=1.0, mixture=V2_MIXTURE, timestep_bias_strategy="later",
                   timestep_bias_multiplier=2.0, eval_every=1000)  # fmt: skip
V2_LAYOUT_PHASES = {"6200": BASE_RANGE_PHASE, "8600": BASE_CONSOLIDATION_PHASE, "10600": {"lr": 1e-4}}
# The detail phase: uniform timesteps again. Nineteenth session: v4 trained from 8,600 to 24,366
# with v1's consolidation bias ("later" 0.2 x 10: 71% of the draws at t >= 800, where a layout is
# decided), so the low and middle noise levels, where edges are drawn, got about a third of their
# uniform share. Its most common failure is "shape wrong" (60 of 116 wrong images at 64 px), and
# those are squares with a ragged, half-transparent edge row: the row's pixels cross the
# detector's foreground threshold here and there, the row widens the box, and the fill (0.85-0.93)
# reads as a circle's. No sampler fixed it (DDPM 25 / 50, DDIM 25: 39 / 36 / 31 of ~145 square
# objects under 0.93; model card, "Nineteenth session"). Result: v4d (below), 4,453 steps of it,
# scored 81.7% against 80.7% (paired z +0.6) with as many "shape wrong" images (65 against 60):
# the edge limit is the 4x4 base's own (v5).
BASE_DETAIL_PHASE = dict(timestep_bias_strategy="none", timestep_bias_multiplier=1.0)
BASE_RECIPES = {
    "v1": {},
    # lr 5e-4 to 6,200, where the curve (40 prompts) had sat at 35-37% for 3,000 steps with
    # positions 12-37% and relations 0; then v1's range phase (2,400 steps: at 7,400 the raw
    # weights still ignored position words, as v1's did for its first ~1,000-1,600), its
    # consolidation at 2e-4, and 1e-4 from 10,600 (v1's lr drops paid: model card). The thirteenth
    # session annealed it for its last 0.83 reference hours: 5e-5 from 20,600 (where the 40-prompt
    # curve had sat at 57.5-60% for 4,000 steps at 1e-4), 2e-5 from 25,000.
    "v2": dict(V2_SETTINGS, phases={**V2_LAYOUT_PHASES, "20600": {"lr": 5e-5}, "25000": {"lr": 2e-5}}),
    # v3 (started in the fourteenth session, shipped in the fifteenth at 23,844): v2 with the binding
    # loss from step 0. v2's T5 barely binds colours to shapes (``binding_weight`` above), and a
    # binding fine-tune of v2's trained UNet did not make it use the binding. Phases as v2's first
    # three (its anneal did not pay). 61.5% against v2's 59.3% on 600 images, no binding swaps.
    "v3": dict(V2_SETTINGS, binding_weight=0.5, phases=dict(V2_LAYOUT_PHASES)),
    # v4 (started in the sixteenth session): v3 with the layout loss from step 0 as well (its
    # relations sit at chance and its T5 hardly knows which object goes on which side:
    # ``layout_weight``). From step 0 because a late binding loss did not reach v2's images.
    "v4": dict(V2_SETTINGS, binding_weight=0.5, layout_weight=0.5, phases=dict(V2_LAYOUT_PHASES)),
    # v5 (started in the nineteenth session): v4 with 2x2 patches (the base sees 12x32x32, not
    # 48x16x16). Given a true render of a square at t = 0, v4's base returns an x0 prediction that
    # the detector reads right in only 51 of 64 images (its edge rows come back ragged, and a square
    # reads as a circle): the 4x4 patch grid, not the sampler or the timestep mix, limits its
    # edges, and "shape wrong" is its largest failure. A training step took 1.2-1.35 s here (v4's
    # 0.5-0.8), so its 8 reference hours (11.9 wall hours at 1.49x) buy about 30,000 steps.
    "v5": dict(V2_SETTINGS, binding_weight=0.5, layout_weight=0.5, unshuffle_factor=2, phases=dict(V2_LAYOUT_PHASES)),
    # v4d (nineteenth session): a branch of the shipped v4 at 24,366 (``--recipe v4d --warm-start
    # imagen_lite/weights/imagen``) with the detail phase above. Not a lineage from scratch.
    "v4d": dict(V2_SETTINGS, binding_weight=0.5, layout_weight=0.5,
                phases={**V2_LAYOUT_PHASES, "24366": BASE_DETAIL_PHASE}),
}  # fmt: skip


def check_base_phases(phases: dict) -> None:
    """``ValueError`` naming a bad phase step or field (before any training starts)."""
    for at, fields in (phases or {}).items():
        if not str(at).isdigit():
            raise ValueError(f"phases: step {at!r} must be a non-negative integer")
        if not isinstance(fields, dict):
            raise ValueError(f"phases[{at!r}]={fields!r} must be a dict of {{field: value}}")
        bad = sorted(set(fields) - BASE_PHASE_FIELDS)
        if bad:
            raise ValueError(f"phases[{at!r}] changes {bad}; a phase may change only {sorted(BASE_PHASE_FIELDS)}")


def build_base(cfg: BaseRunConfig):
    """(tokenizer, text_encoder, unet, scheduler) for a fresh run."""
    torch.manual_seed(cfg.seed)
    tok = C.word_tokenizer(shapes_vocabulary())
    t5 = C.t5_encoder(len(tok), C.T5Size(**cfg.t5))
    r = cfg.unshuffle_factor
    unet = C.if_unet(
        sample_size=64 // r, in_channels=3 * r * r + cfg.coord_channels, out_channels=3 * r * r,
        text_dim=cfg.t5["d_model"], size=C.UNetSize(**cfg.unet),
    )  # fmt: skip
    scheduler = C.ddpm_scheduler(prediction_type="sample")
    return tok, t5, unet, scheduler


class Trainable(torch.nn.Module):
    """The jointly trained modules, as one module for the optimizer, EMA and checkpoints."""

    def __init__(self, text_encoder, unet):
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet


def batch_at(cfg: BaseRunConfig, dataset: shapes.ShapesDataset, step: int):
    """The training batch of ``step``: a pure function of (data_seed, step), so resume is exact."""
    items = [dataset.example(step * cfg.batch_size + i) for i in range(cfg.batch_size)]
    images = torch.stack([it["pixel_values"] for it in items])  # (B, 3, 64, 64) in [-1, 1]
    texts = [it["text"] for it in items]
    return images, texts


def loss_fn(cfg, model, tok, scheduler, images, texts, gen: torch.Generator):
    """x0-prediction loss with min-SNR weights on a batch. Returns a scalar."""
    b = images.shape[0]
    drop = torch.rand(b, generator=gen) < cfg.caption_dropout
    texts = ["" if d else t for d, t in zip(drop.tolist(), texts)]
    ids = tok(texts, padding="max_length", max_length=cfg.max_length, truncation=True, return_tensors="pt")
    x0 = pixel_unshuffle(images, cfg.unshuffle_factor)  # (B, 12, 32, 32)
    n_t = scheduler.config.num_train_timesteps
    t = sample_timesteps(b, n_t, gen, timestep_bias_weights(n_t, *timestep_bias_args(cfg)))
    noise = torch.randn(x0.shape, generator=gen)
    xt = scheduler.add_noise(x0, noise, t)
    ac = scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    weight = snr_floor_weight(snr, cfg.min_snr_gamma, cfg.snr_floor)  # min-SNR-gamma for an x0 target
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        states = model.text_encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]
        xt = sampling.append_coordinates(xt, cfg.coord_channels)
        pred = model.unet(xt, t, encoder_hidden_states=states, return_dict=False)[0]
    per_sample = F.mse_loss(pred.float(), x0, reduction="none").mean(dim=(1, 2, 3))
    loss = (weight * per_sample).mean()
    if cfg.binding_weight:
        loss = loss + cfg.binding_weight * binding_loss(tok, model.text_encoder, states.float(), ids.input_ids)
    if cfg.layout_weight:
        loss = loss + cfg.layout_weight * layout_loss(tok, model.text_encoder, states.float(), ids.input_ids)
    return loss


def binding_targets(tok, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token of a shapes caption: at a shape word ("circle", "squares") the index in
    ``shapes.COLORS`` of the colour word right before it; at that colour word the index in
    ``shapes.SHAPES`` of its shape. -100 (ignored) everywhere else. In the shapes grammar a colour
    always directly precedes its shape ("a small red circle", "three green squares"). Read from the
    tokenizer's own tokens, so it needs a word-level tokenizer (one token per word)."""
    colours, shape_names = list(shapes.COLORS), list(shapes.SHAPES)
    to_colour = torch.full(input_ids.shape, -100, dtype=torch.long)
    to_shape = torch.full(input_ids.shape, -100, dtype=torch.long)
    for b, row in enumerate(input_ids.tolist()):
        words = [t.lstrip("\u2581") for t in tok.convert_ids_to_tokens(row)]
        for j in range(len(words) - 1):
            shape = words[j + 1][:-1] if words[j + 1].endswith("s") else words[j + 1]
            if words[j] in colours and shape in shape_names:
                to_shape[b, j] = shape_names.index(shape)
                to_colour[b, j + 1] = colours.index(words[j])
    return to_colour, to_shape


def binding_loss(tok, text_encoder, states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of reading each object's colour off its shape word's output state, and its
    shape off its colour word's, against the T5's own input embeddings of the colour and shape
    words (tied, as T5's LM head is to its embeddings: no new parameters, so the term can be
    switched on by a phase and checkpoints keep their layout). 0 for a batch with no such pair."""
    to_colour, to_shape = binding_targets(tok, input_ids)
    table = text_encoder.get_input_embeddings().weight

    def rows(words):  # the embeddings of these words (one sentencepiece-style token each)
        return table[torch.tensor(tok.convert_tokens_to_ids(["\u2581" + w for w in words]))].float()

    colour_logits = states @ rows(shapes.COLORS).T  # (B, L, 6)
    shape_logits = states @ rows(shapes.SHAPES).T  # (B, L, 3)
    terms = [F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
             for logits, target in ((colour_logits, to_colour), (shape_logits, to_shape)) if (target >= 0).any()]  # fmt: skip
    return sum(terms) / len(terms) if terms else states.sum() * 0.0


# The layout loss's classes, read off the T5's own embeddings of these words (as the binding loss's).
# "above"/"below" stand for "at the top"/"at the bottom" too: a class is where the object goes.
LAYOUT_WORDS = ("left", "right", "above", "below", "center")
_POSITION_CLASS = {"on the left": 0, "on the right": 1, "at the top": 2, "at the bottom": 3, "in the center": 4}
_RELATION_CLASS = {"to the left of": (0, 1), "to the right of": (1, 0), "above": (2, 3), "below": (3, 2)}


def layout_targets(tok, input_ids: torch.Tensor) -> torch.Tensor:
    """For each token of a shapes caption: at a position caption's shape word the index in
    ``LAYOUT_WORDS`` of its position ("a red circle on the left": circle -> left); at a relation
    caption's two shape words the side each object takes ("A to the left of B": A's shape -> left,
    B's -> right). -100 (ignored) everywhere else, and for any text outside the grammar (dropped
    captions, fine-tuning captions). Needs a word-level tokenizer, as ``binding_targets``."""
    target = torch.full(input_ids.shape, -100, dtype=torch.long)
    for b, row in enumerate(input_ids.tolist()):
        words = [t.lstrip("\u2581") for t in tok.convert_ids_to_tokens(row)]
        try:
            parsed = shapes.parse_caption(" ".join(w for w in words if w not in tok.all_special_tokens))
        except ValueError:
            continue
        at = [j for j, w in enumerate(words) if w in shapes.SHAPES]  # singular shape words, in order
        if parsed.kind == "position":
            target[b, at[0]] = _POSITION_CLASS[parsed.objects[0].position]
        elif parsed.kind == "relation":
            target[b, at[0]], target[b, at[1]] = _RELATION_CLASS[parsed.relation]
    return target


def layout_loss(tok, text_encoder, states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of reading where each object goes (``layout_targets``) off its shape word's
    output state, against the T5's input embeddings of ``LAYOUT_WORDS`` (tied, no new parameters,
    as ``binding_loss``). 0 for a batch with no position or relation caption."""
    target = layout_targets(tok, input_ids)
    if not (target >= 0).any():
        return states.sum() * 0.0
    table = text_encoder.get_input_embeddings().weight
    rows = table[torch.tensor(tok.convert_tokens_to_ids(["\u2581" + w for w in LAYOUT_WORDS]))].float()
    logits = states @ rows.T  # (B, L, 5)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)


def stage_record(step: int, hours: float, cfg) -> dict:
    return {"step": int(step), "cpu_hours": round(float(hours), 5), "config": _comparable(asdict(cfg))}


def _load_fp16(module: torch.nn.Module, directory: Path) -> None:
    """Load a saved (fp16) module directory into ``module``'s float32 weights, through the
    module class's own ``from_pretrained`` (diffusers / transformers read their layout)."""
    saved = type(module).from_pretrained(directory)
    state = saved.state_dict()
    if hasattr(module, "conv_in") and state["conv_in.weight"].shape != module.conv_in.weight.shape:
        state = C.grow_input_channels(state, module.conv_in.weight.shape[1])  # coord_channels added
    module.load_state_dict(state)  # copies (and upcasts) into the float32 parameters


def export_pipeline(cfg, tok, text_encoder, unet, scheduler, out_dir, defaults: dict | None = None,
                    training_state: dict | None = None):
    """Write an ImagenPipeline directory (fp16 safetensors), its generation defaults and training state."""
    import copy

    from ..pipelines.imagen import ImagenPipeline
    from ..presets import DEFAULTS_FILE

    pipe = ImagenPipeline(
        tokenizer=tok, text_encoder=copy.deepcopy(text_encoder).half(), unet=copy.deepcopy(unet).half(),
        scheduler=scheduler, unshuffle_factor=cfg.unshuffle_factor, max_sequence_length=cfg.max_length,
        coord_channels=cfg.coord_channels,
    )  # fmt: skip
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if defaults:
        (out_dir / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2))
    if training_state:
        write_training_state(out_dir, training_state)
    return out_dir


EVAL_SAMPLERS = ("ddpm", "ddim")


def _check_eval_sampler(sampler) -> None:
    if sampler not in EVAL_SAMPLERS:
        raise ValueError(f"eval_sampler={sampler!r}: the in-training evaluation samples with one of {EVAL_SAMPLERS}")


def evaluate_base(cfg, tok, text_encoder, unet, scheduler, n_prompts: int, guidance=(1.0,), steps: int = 25,
                  sampler: str = "ddpm"):
    """Shapes accuracy of the 64px base on the fixed prompt set, seed 0. ``sampler`` is "ddpm" (the
    shipped default since base step 7,400; the curve before that used "ddim", which scores this
    model lower) or "ddim"."""
    from diffusers import DDIMScheduler, DDPMScheduler

    _check_eval_sampler(sampler)
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler

    from ..evaluation.shapes import evaluate
    from ..pipelines.imagen import ImagenPipeline

    pipe = ImagenPipeline(
        tokenizer=tok, text_encoder=text_encoder, unet=unet,
        scheduler=cls.from_config(scheduler.config), unshuffle_factor=cfg.unshuffle_factor,
        max_sequence_length=cfg.max_length, coord_channels=cfg.coord_channels,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for g in guidance:

        def gen(prompts, seed, g=g):
            generator = torch.Generator().manual_seed(seed)
            return pipe(prompts, num_inference_steps=steps, guidance_scale=g, generator=generator).images

        results[g] = evaluate(gen, n_prompts=n_prompts, seeds=(0,), batch_size=40)
    return results


def _logger(path: Path):
    log = open(path, "a")

    def say(msg):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    return say


def run_loop(cfg, cache: Path, minutes: float, resume, model: torch.nn.Module, step_loss, evaluate_fn, say,
             max_steps: int | None = None, warm_start=None):
    """The loop every default stage shares: resume -> (batch, loss, AdamW, EMA) -> checkpoint
    every ``cfg.checkpoint_every`` and at the end -> evaluate every ``cfg.eval_every``.

    ``step_loss(step, gen) -> loss`` computes the stage's loss on the batch of ``step``;
    ``evaluate_fn(ema_module) -> {guidance: result}`` scores the EMA weights (None: a stage
    evaluated only with others, as the refiner).
    ``warm_start(model) -> (step, hours, source)``, used only when ``resume="latest"`` finds no
    checkpoint, loads shipped weights into ``model`` (the EMA starts from them too). Returns
    ``(ema, step, cpu_hours)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))

    step, hours = 0, 0.0
    ckpt = resolve_resume(cache, resume)
    if ckpt is not None:
        info = load_checkpoint(ckpt, model, optimizer, lr_scheduler, ema)
        step, hours = info["step"], float(info["extra"].get("cpu_hours", 0.0))
        for group in optimizer.param_groups:  # a new run may ask for a new lr
            group["initial_lr"] = cfg.lr
        lr_scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
        say(f"resumed from {ckpt} at step {step} ({hours:.2f} h so far), lr {cfg.lr}")
    elif resume == "latest" and warm_start is not None:
        step, hours, source = warm_start(model)
        ema.module.load_state_dict(model.state_dict())
        ema.n_averaged.fill_(max(step, 1))  # keep averaging from the shipped EMA, not copy the next step
        say(f"no checkpoint in {cache}: warm start from {source} at step {step} ({hours:.2f} h so far), "
            f"fresh AdamW, lr {cfg.lr}")  # fmt: skip

    def checkpoint():
        save_checkpoint(cache, step, model, optimizer, lr_scheduler, ema, extra={"cpu_hours": hours}, config=asdict(cfg))

    deadline = time.time() + minutes * 60
    t_last, losses = time.time(), []
    while time.time() < deadline and (max_steps is None or step < max_steps):
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # noise/timesteps/dropout of this step
        loss = step_loss(step, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        ema.update_parameters(model)
        step += 1
        losses.append(loss.item())
        if step % 50 == 0:
            say(f"step {step} loss {np.mean(losses):.4f} {(time.time() - t_last) / 50:.3f} s/step cpu_h {hours:.3f}")
            t_last, losses = time.time(), []
        if step % cfg.checkpoint_every == 0:
            checkpoint()
        if cfg.eval_every and evaluate_fn is not None and step % cfg.eval_every == 0:
            te = time.time()
            for g, r in evaluate_fn(ema.module).items():
                failures = [rec["failure"] for rec in r["records"] if rec.get("failure")]
                entry = {"step": step, "cpu_hours": round(hours, 3), "guidance": g, "overall": r["overall"],
                         "per_category": r["per_category"],
                         "failures": {m: failures.count(m) for m in sorted(set(failures))}}  # fmt: skip
                if getattr(cfg, "eval_sampler", None):
                    entry["sampler"] = cfg.eval_sampler
                with open(cache / "curve.jsonl", "a") as f:
                    f.write(json.dumps(entry) + "\n")
                say(f"eval step {step} g={g}: overall {r['overall']:.3f} {r['per_category']} ({time.time() - te:.0f}s)")
        hours += (time.time() - t0) / 3600  # wall time of the step, evaluation included
    checkpoint()
    return ema, step, hours


def train_base(cfg: BaseRunConfig, cache: Path, minutes: float, resume: str | None = "latest",
               export_dir: Path | None = None, max_steps: int | None = None, log_file: Path | None = None,
               warm_start: Path | None = None) -> dict:
    """Train the base + T5 for ``minutes`` wall minutes (or ``max_steps``), checkpointing under ``cache``;
    with no checkpoint there, start from the exported pipeline ``warm_start`` (if given)."""
    _check_eval_sampler(cfg.eval_sampler)  # before training: a bad value must not stop the run at its first evaluation
    check_timestep_bias(*timestep_bias_args(cfg))
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    say = _logger(log_file or cache / "train.log")

    # 1. Build
    tok, t5, unet, scheduler = build_base(cfg)
    model = Trainable(t5, unet).train()
    n = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in (("T5", t5), ("UNet", unet))}
    say(f"base: T5 {n['T5']:.2f}M + UNet {n['UNet']:.2f}M params; config {json.dumps(asdict(cfg))}")
    dataset = shapes.ShapesDataset(size=64, seed=cfg.data_seed, mixture=cfg.mixture, exclude_heldout=cfg.exclude_heldout)

    # 2. Loop
    def step_loss(step, gen):
        images, texts = batch_at(cfg, dataset, step)
        return loss_fn(cfg, model, tok, scheduler, images, texts, gen)

    def evaluate_fn(m):
        return evaluate_base(cfg, tok, m.text_encoder, m.unet, scheduler, cfg.eval_prompts, (1.0, 2.0),
                             sampler=cfg.eval_sampler)

    def seed_from_shipped(m):
        state = shipped_stage(warm_start, "imagen-base", cfg)
        _load_fp16(m.text_encoder, Path(warm_start) / "text_encoder")
        _load_fp16(m.unet, Path(warm_start) / "unet")
        return state["step"], state["cpu_hours"], warm_start

    ema, step, hours = run_loop(cfg, cache, minutes, resume, model, step_loss, evaluate_fn, say, max_steps,
                                seed_from_shipped if warm_start is not None else None)  # fmt: skip

    # 3. Export
    if export_dir is not None:
        export_pipeline(cfg, tok, ema.module.text_encoder, ema.module.unet, scheduler, export_dir,
                        training_state={"imagen-base": stage_record(step, hours, cfg)})  # fmt: skip
        say(f"exported EMA weights to {export_dir}")
    return {"step": step, "cpu_hours": hours, "checkpoints": [str(p) for p in list_checkpoints(cache)]}


def _start_step(cache: Path, resume: str | None, warm_start: Path | None, cfg) -> int:
    """The step a base run would start at: its checkpoint's, else the warm start's, else 0."""
    ckpt = resolve_resume(cache, resume)
    if ckpt is not None:
        return int(torch.load(ckpt / "state.pt", weights_only=True)["step"])
    if resume == "latest" and warm_start is not None:
        return int(shipped_stage(warm_start, "imagen-base", cfg)["step"])
    return 0


def train_base_plan(cfg: BaseRunConfig, cache: Path, minutes: float, resume: str | None = "latest",
                    export_dir: Path | None = None, max_steps: int | None = None, warm_start: Path | None = None) -> dict:
    """``train_base`` following ``cfg.phases``: chunks that stop at each phase start, each run with
    the settings of the phase it is in (``settings_at``), until ``minutes`` or ``max_steps``."""
    check_base_phases(cfg.phases)
    if not cfg.phases:
        return train_base(cfg, cache, minutes, resume, export_dir, max_steps, warm_start=warm_start)
    deadline = time.time() + minutes * 60
    plan = {"phases": cfg.phases}
    while True:
        step = _start_step(Path(cache), resume, warm_start, cfg)
        stops = [at for at in phase_starts(plan) if at > step] + ([max_steps] if max_steps is not None else [])
        stop = min(stops) if stops else None
        left = (deadline - time.time()) / 60
        last = stop is None or stop == max_steps or left <= 0.05
        chunk = replace(cfg, **settings_at(plan, step))
        result = train_base(chunk, cache, max(left, 0.0), resume, None, stop, warm_start=warm_start)
        resume = "latest"
        if last or result["step"] < stop:  # out of time (or the last phase ran to max_steps)
            if export_dir is not None:  # the EMA of the checkpoint the last chunk ended with
                export_base_checkpoint(cache, export_dir)
            return result


# ---------------------------------------------------------------------- 64 -> 256 super-resolution
@dataclass
class SRRunConfig:
    """The Imagen-family 64->256 SR UNet, trained on crops (Imagen trains its SR models on crops)."""

    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.998  # a shorter run than the base
    caption_dropout: float = 0.5  # flat shapes need little text at SR; robust to a base T5 that keeps training
    min_snr_gamma: float = 5.0
    unshuffle_factor: int = 4  # SR UNet sees 96x64x64 at 256px (noisy + conditioning patches)
    low_crops: tuple = (16, 24, 32)  # low-res crop sides; the 256 target crop is 4x
    max_aug_level: int = 500  # noise-conditioning augmentation level drawn from [0, max)
    seed: int = 0
    data_seed: int = 2
    exclude_heldout: bool = True
    unet: dict = field(
        default_factory=lambda: dict(
            block_out_channels=(32, 64, 96), layers_per_block=1, attention_head_dim=32,
            cross_attention_dim=64, attention_levels=(False, False, False),
        )
    )  # fmt: skip
    checkpoint_every: int = 200
    eval_every: int = 500
    eval_prompts: int = 40


def build_sr(cfg: SRRunConfig, text_dim: int):
    r = cfg.unshuffle_factor
    torch.manual_seed(cfg.seed)
    return C.if_unet(
        sample_size=256 // r, in_channels=6 * r * r, out_channels=3 * r * r, text_dim=text_dim,
        size=C.UNetSize(**cfg.unet), super_resolution=True,
    )  # fmt: skip


def sr_loss(cfg: SRRunConfig, unet, text_states, scheduler, noising, low, high, gen: torch.Generator):
    """x0 loss of the SR UNet on random aligned crops of (upsampled+augmented 64, true 256).

    The conditioning is built exactly as at inference -- the whole 64px image upsampled
    bilinearly to 256, noised to a random augmentation level -- and then cropped, so training
    sees the real inference input (not diffusers' DreamBooth shortcut).
    """
    b, r = low.shape[0], cfg.unshuffle_factor
    up = upsample(low, 256)  # (B, 3, 256, 256)
    level = torch.randint(0, cfg.max_aug_level, (b,), generator=gen)
    up = noising.add_noise(up, torch.randn(up.shape, generator=gen), level)
    c = 4 * cfg.low_crops[int(torch.randint(0, len(cfg.low_crops), (1,), generator=gen))]
    ys = torch.randint(0, (256 - c) // r + 1, (b,), generator=gen) * r  # patch-aligned crop corners
    xs = torch.randint(0, (256 - c) // r + 1, (b,), generator=gen) * r
    crop = lambda img: torch.stack([im[:, y : y + c, x : x + c] for im, y, x in zip(img, ys.tolist(), xs.tolist())])  # noqa: E731
    x0, cond = pixel_unshuffle(crop(high), r), pixel_unshuffle(crop(up), r)  # (B, 48, c/4, c/4)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
    xt = scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
    ac = scheduler.alphas_cumprod[t]
    weight = (ac / (1 - ac)).clamp(max=cfg.min_snr_gamma)
    pred = unet(torch.cat([xt, cond], dim=1), t, encoder_hidden_states=text_states, class_labels=level,
                return_dict=False)[0]  # fmt: skip
    return (weight * F.mse_loss(pred, x0, reduction="none").mean(dim=(1, 2, 3))).mean()


def evaluate_sr(cfg: SRRunConfig, base_pipe, sr_unet, n_prompts: int, steps: int = 10, noise_level: int = 100):
    """Shapes accuracy at 256 of the SR stage alone: ground-truth 64px renders upscaled."""
    from diffusers import DDIMScheduler

    from ..evaluation.shapes import evaluate
    from ..pipelines.imagen import ImagenPipeline
    from ..pipelines.common import postprocess

    sr_sched = DDIMScheduler.from_config(C.ddpm_scheduler(prediction_type="sample").config)
    pipe = ImagenPipeline(
        tokenizer=base_pipe.tokenizer, text_encoder=base_pipe.text_encoder, unet=base_pipe.unet,
        scheduler=base_pipe.scheduler, sr_unet=sr_unet, sr_scheduler=sr_sched,
        image_noising_scheduler=C.noising_scheduler(), unshuffle_factor=base_pipe.config.unshuffle_factor,
        max_sequence_length=base_pipe.config.max_sequence_length, sr_unshuffle_factor=cfg.unshuffle_factor,
        coord_channels=base_pipe.config.get("coord_channels", 0),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)

    def gen(prompts, seed):
        rng = np.random.default_rng(seed)
        lows = torch.stack([
            torch.from_numpy(shapes.render(shapes.scene_for_caption(p, rng), 64)).permute(2, 0, 1).float() / 127.5 - 1
            for p in prompts
        ])  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        return postprocess(_sr_only(pipe, prompts, lows, steps, noise_level, generator), "pil")

    return {"sr-on-ground-truth": evaluate(gen, n_prompts=n_prompts, seeds=(0,), batch_size=20)}


@torch.no_grad()
def _sr_only(pipe, prompts, lows, steps, noise_level, generator):
    """Run just the SR stage of ``pipe`` on given 64px images (B, 3, 64, 64) in [-1, 1]."""
    from diffusers.utils.torch_utils import randn_tensor

    from .. import sampling

    s, unet, scheduler = pipe.config.sr_unshuffle_factor, pipe.sr_unet, pipe.sr_scheduler
    n, side = lows.shape[0], unet.config.sample_size
    context = pipe.encode_prompt(prompts)
    scheduler.set_timesteps(steps)
    x = randn_tensor((n, unet.config.in_channels // 2, side, side), generator=generator) * scheduler.init_noise_sigma
    up = sampling.upsample(lows, side * s)
    level = torch.full((n,), noise_level)
    up = sampling.pixel_unshuffle(pipe.image_noising_scheduler.add_noise(up, randn_tensor(up.shape, generator=generator), level), s)

    def model_fn(inp, t, i):
        return unet(inp, t, encoder_hidden_states=context, class_labels=level, return_dict=False)[0]

    x = sampling.denoise(model_fn, scheduler, x, scheduler.timesteps, cond_image=up,
                         step_kwargs=sampling.scheduler_step_kwargs(scheduler, generator))  # fmt: skip
    return sampling.pixel_shuffle(x, s)


def train_sr(cfg: SRRunConfig, base_dir: Path, cache: Path, minutes: float, resume: str | None = "latest",
             export_dir: Path | None = None, max_steps: int | None = None, warm_start: Path | None = None) -> dict:
    """Train the 64->256 SR UNet against a frozen base pipeline directory's T5; with no
    checkpoint in ``cache``, start from the SR UNet of the exported cascade ``warm_start``."""
    from ..pipelines.imagen import ImagenPipeline

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    say = _logger(cache / "train.log")

    # 1. Build, freeze the text encoder
    base = ImagenPipeline.from_pretrained(base_dir, **runtime.dtype_kwargs(torch.float32))
    base.text_encoder.requires_grad_(False).eval()
    unet = build_sr(cfg, base.text_encoder.config.d_model).train()
    scheduler, noising = C.ddpm_scheduler(prediction_type="sample"), C.noising_scheduler()
    say(f"sr: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params; base {base_dir}; config {json.dumps(asdict(cfg))}")
    dataset = shapes.ShapesDataset(size=(64, 256), seed=cfg.data_seed, exclude_heldout=cfg.exclude_heldout)

    # 2. Loop
    def step_loss(step, gen):
        items = [dataset.example(step * cfg.batch_size + i) for i in range(cfg.batch_size)]
        low = torch.stack([it["pixel_values_low"] for it in items])
        high = torch.stack([it["pixel_values"] for it in items])
        drop = torch.rand(len(items), generator=gen) < cfg.caption_dropout
        texts = ["" if d else it["text"] for d, it in zip(drop.tolist(), items)]
        with torch.no_grad():
            states = base.encode_prompt(texts)
        return sr_loss(cfg, unet, states, scheduler, noising, low, high, gen)

    def evaluate_fn(m):
        return evaluate_sr(cfg, base, m, cfg.eval_prompts)

    def seed_from_shipped(m):
        state = shipped_stage(warm_start, "imagen-sr", cfg)
        _load_fp16(m, Path(warm_start) / "sr_unet")
        return state["step"], state["cpu_hours"], warm_start

    ema, step, hours = run_loop(cfg, cache, minutes, resume, unet, step_loss, evaluate_fn, say, max_steps,
                                seed_from_shipped if warm_start is not None else None)  # fmt: skip

    # 3. Export: the base directory's components plus the SR stage
    if export_dir is not None:
        export_cascade(base_dir, ema.module, cfg, export_dir, training_state={"imagen-sr": stage_record(step, hours, cfg)})
        say(f"exported base + EMA SR to {export_dir}")
    return {"step": step, "cpu_hours": hours, "checkpoints": [str(p) for p in list_checkpoints(cache)]}


def save_on_top_of(pipe, base_dir, out_dir, defaults: dict | None = None, training_state: dict | None = None) -> Path:
    """Save ``pipe`` (built from ``base_dir``'s components plus a new stage) to ``out_dir`` with
    ``base_dir``'s generation defaults (unless ``defaults``) and its training state plus
    ``training_state``."""
    from ..presets import DEFAULTS_FILE, read_defaults

    defaults = defaults or read_defaults(base_dir)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if defaults:
        (out_dir / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2))
    write_training_state(out_dir, {**read_training_state(base_dir), **(training_state or {})})
    return out_dir


def export_cascade(base_dir, sr_unet, cfg: SRRunConfig, out_dir, defaults: dict | None = None,
                   training_state: dict | None = None):
    """base pipeline dir + trained SR UNet -> one ImagenPipeline directory (fp16 safetensors);
    its training state is the base directory's plus ``training_state``."""
    import copy

    from ..pipelines.imagen import ImagenPipeline

    from diffusers import DDIMScheduler

    base = ImagenPipeline.from_pretrained(base_dir, **runtime.dtype_kwargs(torch.float16))
    # DDIM for the SR stage, as its evaluation (evaluate_sr) samples it: 10 steps suffice
    sr_config = C.ddpm_scheduler(prediction_type="sample").config
    pipe = ImagenPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, unet=base.unet, scheduler=base.scheduler,
        sr_unet=copy.deepcopy(sr_unet).half(), sr_scheduler=DDIMScheduler.from_config(sr_config),
        image_noising_scheduler=C.noising_scheduler(), unshuffle_factor=base.config.unshuffle_factor,
        max_sequence_length=base.config.max_sequence_length, sr_unshuffle_factor=cfg.unshuffle_factor,
        coord_channels=base.config.get("coord_channels", 0),
        refiner=base.refiner, refiner_scheduler=base.refiner_scheduler,  # a refiner the base directory has stays
        refiner_max_timestep=base.config.get("refiner_max_timestep", 0),
    )  # fmt: skip
    return save_on_top_of(pipe, base_dir, out_dir, defaults, training_state)


def export_cascade_carrying_sr(base_dir, sr_source, out_dir, defaults: dict | None = None):
    """base pipeline dir + the SR stage of another exported cascade (``sr_source``, e.g. the shipped
    one) -> one ImagenPipeline directory; the SR's training-state record comes along. How a new
    base lineage (v2) ships before it has an SR of its own: the SR reads the base's T5 states but
    trained with captions dropped half the time, and starts from the upsampled base image."""
    from diffusers import UNet2DConditionModel

    sr_source = Path(sr_source)
    state = read_training_state(sr_source).get("imagen-sr")
    if state is None or not (sr_source / "sr_unet").is_dir():
        raise ValueError(f"{str(sr_source)!r} has no SR stage (sr_unet/ and a {TRAINING_STATE_FILE} 'imagen-sr' record) to carry")
    sr_unet = UNet2DConditionModel.from_pretrained(sr_source / "sr_unet", torch_dtype=torch.float32)
    cfg = run_config(state["config"], SRRunConfig)
    record = {**state, "config": {**state["config"], "carried_from": str(sr_source)}}
    return export_cascade(base_dir, sr_unet, cfg, out_dir, defaults, training_state={"imagen-sr": record})


def run_config(saved: dict, config_cls):
    """A saved run config read back as ``config_cls``: fields the class no longer has are
    dropped, fields added since keep their defaults."""
    return config_cls(**{k: v for k, v in saved.items() if k in config_cls.__dataclass_fields__})


def resumed_config(config_cls, ckpt: Path | None, warm_start: Path | None = None, stage: str | None = None):
    """The config a run starts from: the one saved with checkpoint ``ckpt``; else, warm-starting,
    the recipe recorded for ``stage`` in ``warm_start``'s training state; else the defaults. So a
    run that passes no ``--set`` continues the recipe it resumes (its lr included) instead of
    falling back to the code's defaults."""
    if ckpt is not None:
        return run_config(json.loads((Path(ckpt) / "config.json").read_text()), config_cls)
    recorded = read_training_state(warm_start).get(stage, {}).get("config") if warm_start is not None else None
    return run_config(recorded, config_cls) if recorded else config_cls()


def _checkpoint_ema(cache: Path, checkpoint: str, config_cls, build):
    """``(cfg, ema_module, record)`` of a checkpoint: its run config read back as ``config_cls``,
    the module ``build(cfg)`` makes with the checkpoint's EMA weights loaded (read-only: safe
    while that run goes on), and its training-state record (step, hours, config)."""
    from safetensors.torch import load_model

    ckpt = resolve_resume(cache, checkpoint)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint under {str(cache)!r} to export")
    cfg = resumed_config(config_cls, ckpt)
    ema = AveragedModel(build(cfg), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    load_model(ema, str(ckpt / "ema.safetensors"))
    state = torch.load(ckpt / "state.pt", weights_only=True)
    return cfg, ema.module, stage_record(state["step"], state["extra"].get("cpu_hours", 0.0), cfg)


def export_base_checkpoint(cache: Path, out_dir: Path, checkpoint: str = "latest", defaults: dict | None = None) -> Path:
    """Export the EMA weights of a base checkpoint as a 64px pipeline directory."""
    built = {}

    def build(cfg):
        built["tok"], t5, unet, built["scheduler"] = build_base(cfg)
        return Trainable(t5, unet)

    cfg, model, record = _checkpoint_ema(cache, checkpoint, BaseRunConfig, build)
    return export_pipeline(cfg, built["tok"], model.text_encoder, model.unet, built["scheduler"], out_dir, defaults,
                           training_state={"imagen-base": record})  # fmt: skip


def export_sr_checkpoint(cache: Path, base_dir: Path, out_dir: Path, checkpoint: str = "latest",
                         defaults: dict | None = None) -> Path:
    """Export base pipeline dir + the EMA weights of an SR checkpoint as one cascade."""
    text_dim = json.loads((Path(base_dir) / "text_encoder" / "config.json").read_text())["d_model"]
    cfg, unet, record = _checkpoint_ema(cache, checkpoint, SRRunConfig, lambda cfg: build_sr(cfg, text_dim))
    return export_cascade(base_dir, unet, cfg, out_dir, defaults, training_state={"imagen-sr": record})


# ---------------------------------------------------------------------- low-noise refiner
@dataclass
class RefinerRunConfig:
    """The Imagen base's low-noise refiner (twentieth session, docs/model_card.md): an
    unconditional, full-resolution ``UNet2DModel`` that predicts v on t < ``max_timestep`` and
    takes over the base's last steps (``ImagenPipeline(refiner=...)``, ``refiner_start``).

    Why: the base predicts x0 through 4x4 patches and returns ragged square edges even from a
    clean true render (``scripts/probe_square_edges.py``: 51 / 64 at t = 0); "shape wrong" is its
    largest failure. v prediction is epsilon-like at low noise (x0 = sqrt(a) x_t - sqrt(1-a) v keeps
    x_t's edges), and at t < 300 the layout and colours are already fixed, so no text is needed.
    Its quality is measured with a base (the ship rule), so it has no evaluation of its own."""

    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    max_timestep: int = 300  # trains on t in [0, max_timestep); the pipeline's refiner_max_timestep
    bf16: bool = True
    seed: int = 0
    data_seed: int = 3
    exclude_heldout: bool = True
    size: dict = field(default_factory=lambda: asdict(C.SMALL_REFINER))
    checkpoint_every: int = 200
    eval_every: int = 0  # see the docstring: evaluated with a base, by the ship rule


def build_refiner(cfg: RefinerRunConfig):
    torch.manual_seed(cfg.seed)
    return C.refiner_unet(64, C.RefinerSize(**cfg.size)), C.refiner_scheduler()


def refiner_loss(cfg: RefinerRunConfig, unet, scheduler, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """v-prediction MSE on ``x0`` (B, 3, 64, 64) noised to t uniform in [0, max_timestep)."""
    b = x0.shape[0]
    t = torch.randint(0, cfg.max_timestep, (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    xt = scheduler.add_noise(x0, noise, t)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        pred = unet(xt, t, return_dict=False)[0]
    return F.mse_loss(pred.float(), scheduler.get_velocity(x0, noise, t))


def check_refiner_config(cfg: RefinerRunConfig, n_train: int = 1000) -> None:
    if isinstance(cfg.max_timestep, bool) or not isinstance(cfg.max_timestep, int) or not 0 < cfg.max_timestep <= n_train:
        raise ValueError(f"max_timestep={cfg.max_timestep!r}: the refiner's timesteps [0, max), an int in (0, {n_train}]")


def train_refiner(cfg: RefinerRunConfig, cache: Path, minutes: float, resume: str | None = "latest",
                  export_dir: Path | None = None, max_steps: int | None = None, warm_start: Path | None = None,
                  base_dir: Path | None = None) -> dict:
    """Train the refiner for ``minutes`` (or ``max_steps``), checkpointing under ``cache``; with no
    checkpoint there, start from the refiner of the exported cascade ``warm_start`` (if it has
    one). ``export_dir`` gets ``base_dir`` (an Imagen pipeline directory) with the EMA refiner."""
    check_refiner_config(cfg)
    if export_dir is not None and base_dir is None:
        raise ValueError("export_dir needs base_dir: the Imagen pipeline the refiner is exported with")
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    say = _logger(cache / "train.log")
    unet, scheduler = build_refiner(cfg)
    unet.train()
    say(f"refiner: UNet2DModel {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params; config {json.dumps(asdict(cfg))}")
    dataset = shapes.ShapesDataset(size=64, seed=cfg.data_seed, exclude_heldout=cfg.exclude_heldout)

    def step_loss(step, gen):
        x0 = torch.stack([dataset.example(step * cfg.batch_size + i)["pixel_values"] for i in range(cfg.batch_size)])
        return refiner_loss(cfg, unet, scheduler, x0, gen)

    def seed_from_shipped(m):
        state = shipped_stage(warm_start, "imagen-refiner", cfg)
        _load_fp16(m, Path(warm_start) / "refiner")
        return state["step"], state["cpu_hours"], warm_start

    has_refiner = warm_start is not None and "imagen-refiner" in read_training_state(warm_start)
    ema, step, hours = run_loop(cfg, cache, minutes, resume, unet, step_loss, None, say, max_steps,
                                seed_from_shipped if has_refiner else None)  # fmt: skip
    if export_dir is not None:
        export_with_refiner(base_dir, ema.module, cfg, export_dir,
                            training_state={"imagen-refiner": stage_record(step, hours, cfg)})  # fmt: skip
        say(f"exported {base_dir} + EMA refiner to {export_dir}")
    return {"step": step, "cpu_hours": hours, "checkpoints": [str(p) for p in list_checkpoints(cache)]}


def export_with_refiner(base_dir, refiner, cfg: RefinerRunConfig, out_dir, defaults: dict | None = None,
                        training_state: dict | None = None) -> Path:
    """An Imagen pipeline directory (every stage it has) + a refiner -> one directory (fp16
    safetensors); its training state is the base directory's plus ``training_state``."""
    import copy

    from ..pipelines.imagen import ImagenPipeline

    base = ImagenPipeline.from_pretrained(base_dir, **runtime.dtype_kwargs(torch.float16))
    parts = {k: v for k, v in base.components.items() if k not in ("refiner", "refiner_scheduler")}
    config = {k: base.config[k] for k in ("unshuffle_factor", "max_sequence_length", "sr_unshuffle_factor", "coord_channels")
              if k in base.config}  # fmt: skip
    pipe = ImagenPipeline(**parts, refiner=copy.deepcopy(refiner).half(), refiner_scheduler=C.refiner_scheduler(),
                          refiner_max_timestep=cfg.max_timestep, **config)  # fmt: skip
    return save_on_top_of(pipe, base_dir, out_dir, defaults, training_state)


def export_refiner_checkpoint(cache: Path, base_dir: Path, out_dir: Path, checkpoint: str = "latest",
                              defaults: dict | None = None) -> Path:
    """Export an Imagen pipeline dir + the EMA weights of a refiner checkpoint as one directory."""
    cfg, unet, record = _checkpoint_ema(cache, checkpoint, RefinerRunConfig, lambda cfg: build_refiner(cfg)[0])
    return export_with_refiner(base_dir, unet, cfg, out_dir, defaults, training_state={"imagen-refiner": record})


# ---------------------------------------------------------------------- DALL-E 2 family
# The DALL-E 2 default trains with the generic ``imagen-lite train`` loop (every stage of the
# family is one of its stages), stage after stage, each starting from the previous stage's
# pipeline directory: clip (contrastive, no pretrained CLIP knows shapes) -> prior -> sr ->
# decoder. Budgets are optimizer steps; a run continues the first unfinished stage from its
# newest checkpoint, in chunks of ``chunk`` steps so a wall-clock budget can stop it cleanly.
# The layout phase's caption mixture (sixth session; the stream's default is uniform over the
# kinds): positions and relations are what both families still draw at chance.
LAYOUT_MIXTURE = {"single": 0.1, "position": 0.4, "two_objects": 0.1, "relation": 0.25, "counting": 0.15}
# The same phases for the generic loop's stages, whose caption mixture is ``shapes_mixture``.
RANGE_PHASE = {**{k: v for k, v in BASE_RANGE_PHASE.items() if k != "mixture"}, "shapes_mixture": RANGE_MIXTURE}
CONSOLIDATION_PHASE = dict(lr=2e-4, timestep_bias_strategy="later", timestep_bias_multiplier=10.0,
                           timestep_bias_portion=0.2, timestep_bias_begin=0, timestep_bias_end=None,
                           shapes_mixture=LAYOUT_MIXTURE)  # fmt: skip

DALLE2_PLAN: tuple[dict, ...] = (
    dict(stage="clip", max_steps=600, batch_size=64, lr=5e-4),
    dict(stage="prior", max_steps=2000, batch_size=32, lr=5e-4),
    # Karlo's SR UNets run at full 256px resolution (no pixel-unshuffle): small batches of small
    # crops (64..96 px high-res) keep a step near 2 s on one core. SR learns from real images
    # only, so it goes before the decoder, which is the long stage and continues run after run.
    # x0 prediction (SMALL_UNCLIP's SR): 400 epsilon-prediction steps had left a grey, noisy
    # background; the x0 SR got 600 steps. At 600 it left the empty regions of a 256 px image
    # off-white with white halos around the shapes (DALL-E 2 scored 6.7% at 256 px against
    # 12.5% at 64 px), so the third session extended the stage to 1,500 steps.
    dict(stage="sr", max_steps=1500, batch_size=8, lr=5e-4, sr_crop=(16, 24)),
    # lr 5e-4 to step 3,200 (the third ship), then 1e-4: the drop that broke the Imagen base's
    # stall (issue #10's report, and 14% -> 27% here); ``lr_drops`` maps a stage step (shipped
    # offset included) to the peak lr from there on (the generic loop rescales the schedule).
    # snr_floor 1 (stages.snr_floor_weight) from the fifth session's restart (step 9,300 onwards;
    # the steps before had 0, plain min-SNR): min-SNR alone left the high-noise steps, where the
    # layout is decided, with ~zero loss weight -- positions at chance in both families.
    # The layout phase (sixth session): lr 2e-4 from step 11,700, timesteps biased to high noise
    # and more position/relation captions -- the signal the regular mixture diluted (model card).
    # 11,700-11,900: "later" 0.3 x 3 (56% of the draws at t >= 700); from 11,900: "later" 0.2 x 10
    # (71% at t >= 800, 36% at t >= 900 instead of 10%).
    # The range phase (tenth session): the recipe that broke positions open in the Imagen base
    # (sixth session: 20% -> 85% after its consolidation), which the decoder's milder "later"
    # phase had not (positions 14% at 14,200): timesteps from [850, 1000) x 30 (84% of draws
    # there), position and relation captions only, lr 5e-4. Planned 14,200 -> 15,600; at 15,600
    # the raw weights still placed no better than the shipped ones (13 / 60 position prompts
    # against 12 / 60), so after 200 steps of consolidation the run went back to the range phase
    # from 15,800. At 16,400 still nothing (12 / 60; the ink centroid of "on the right" minus "on
    # the left" +0.001 image widths): the decoder barely reads position words, which its frozen
    # CLIP text tower hardly separates (model card). So the range phase ended at 16,800, and the
    # rest of the budget went to consolidation, the recipe of 11,700 -> 14,200: LAYOUT_MIXTURE,
    # "later" 0.2 x 10, lr 2e-4, and 1e-4 from 18,000 (docs/model_card.md, "Tenth session").
    dict(stage="decoder", max_steps=18800, batch_size=32, lr=5e-4, lr_drops={3200: 1e-4, 11700: 2e-4}, snr_floor=1.0,
         timestep_bias_strategy="later", timestep_bias_multiplier=10.0, timestep_bias_portion=0.2,
         shapes_mixture=LAYOUT_MIXTURE,
         phases={14200: RANGE_PHASE, 15600: CONSOLIDATION_PHASE, 15800: RANGE_PHASE, 16800: CONSOLIDATION_PHASE,
                 18000: dict(lr=1e-4)}),
)

# The DALL-E 2 v2 lineage (eleventh session): the v1 CLIP is blind to position (tenth session),
# so no decoder on it could place objects. v2 trains a CLIP with hard negatives (contrast groups
# of 4: a position/relation caption with its variants in one batch; 1,500 steps of it retrieved
# the right position 16/16 where v1's CLIP gets chance, model card "Eleventh session"), longer
# for relations, and a prior on it. The decoder does not start from scratch (8.4 wall hours in
# v1): it is grafted -- v1's trained decoder, text_proj and (text-free) SR UNets put on the new
# CLIP and prior -- and fine-tuned from v1's step 18,800: 600 steps to re-learn its
# conditioning (the consolidation recipe), the range phase that made the Imagen base place
# objects (1,400), then consolidation at lr 1e-4. The grafted stages' steps and hours stay in
# the lineage's count (``graft`` below; ``dalle2_training_state``).
CLIP_V2_MIXTURE = {"position": 0.45, "relation": 0.3, "single": 0.1, "two_objects": 0.1, "counting": 0.05}
GRAFT_COMPONENTS = ("decoder", "text_proj", "super_res_first", "super_res_last")
# Thirteenth session: v2's decoder shipped at 21,800 after a 1,000-step consolidation, with two objects
# 59 -> 44% and counting 62.5 -> 46% against v1 (positions 23 -> 78%). A longer one, 21,800 -> 26,000, with
# those kinds weighted up and a milder high-noise bias (the v2 Imagen base's "later" 0.25 x 2: binding and
# counts are not all decided at t >= 800) and lr 1e-4. The fourteenth session ran the same phase on to
# 29,000 (0.43 wall hours): 70.8% against 69.5% on the standard 600 images, 70.0 against 69.5 on 600
# more (pooled paired 106 / 93, z +0.9): equal, not shipped, so the plan stops at 26,000 (model card).
V2_DECODER_CONSOLIDATION = dict(lr=1e-4, timestep_bias_strategy="later", timestep_bias_multiplier=2.0,
                                timestep_bias_portion=0.25, timestep_bias_begin=0, timestep_bias_end=None,
                                shapes_mixture={"single": 0.1, "position": 0.2, "two_objects": 0.25, "relation": 0.2,
                                                "counting": 0.25})  # fmt: skip
DALLE2_V2_PLAN: tuple[dict, ...] = (
    dict(stage="clip", max_steps=4000, batch_size=64, lr=5e-4, shapes_contrast_group=4, shapes_mixture=CLIP_V2_MIXTURE),
    dict(stage="prior", max_steps=2000, batch_size=32, lr=5e-4),
    dict(stage="decoder", max_steps=26000, batch_size=32, lr=2e-4, snr_floor=1.0, timestep_bias_strategy="later",
         timestep_bias_multiplier=10.0, timestep_bias_portion=0.2, shapes_mixture=LAYOUT_MIXTURE,
         # "shipped": the package's DALL-E 2 default when the stage starts, which must be v1's (v2 first ran
         # on v1 at commit 0a619d9; since v2 ships, a rerun needs a v1 directory as the source)
         graft=dict(source="shipped", recipe="v1", components=GRAFT_COMPONENTS, stages=("decoder", "sr")),
         phases={19400: RANGE_PHASE, 20800: {**CONSOLIDATION_PHASE, "lr": 1e-4}, 21800: V2_DECODER_CONSOLIDATION}),
)
# v2e (eighteenth session): v2 with its decoder fine-tuned on from the shipped 26,000 in the same
# consolidation phase, but with ``image_embed_dropout`` 0.3: beyond the caption-dropped tenth, 30% of
# the samples get the learned unconditional CLIP image embedding while their caption stays, so the
# decoder must draw from the CLIP text tokens alone. Why: DALL-E 2 v2 swaps colours between shapes as
# often with a true image embedding as with the prior's (the CLIP image tower binds 60%, chance 43%),
# while its text tower binds (probe 1.00) and the decoder ignored it (model card, "Sixteenth session").
# Not a new lineage of weights: CLIP, prior and SR are v2's; the decoder continues v2's steps and hours.
# Run with ``--recipe v2e --warm-start imagen_lite/weights/dalle2`` (the v2 weights in the package).
# Result (31,600, 0.95 wall hours): 70.7% against v2's 69.5% on the standard 600 images, paired z +0.7,
# binding swaps 25 -> 27; not shipped (model card, "Eighteenth session").
V2E_DECODER = {**V2_DECODER_CONSOLIDATION, "image_embed_dropout": 0.3}
DALLE2_V2E_PLAN: tuple[dict, ...] = (
    *DALLE2_V2_PLAN[:2],
    {**DALLE2_V2_PLAN[2], "max_steps": 32000, "phases": {**DALLE2_V2_PLAN[2]["phases"], 26000: V2E_DECODER}},
)
# v3 (twenty-first session): a new DALL-E 2 decoder lineage, trained from step 0 on v2's CLIP, prior
# and SR (``fresh``: those stages' weights, steps and hours come from the v2 default; the decoder
# and its text_proj start from new random weights). Why a new decoder and not more of v2's:
# - v2's decoder is 26,000 steps of v1's, grafted and fine-tuned through four recipes (9.58 wall
#   hours, 4.21 reference hours, the largest share of the 8): a decoder trained from step 0
#   with the recipe that the Imagen base needed 2.09 reference hours for (v4: 80.7% against
#   DALL-E 2's 69.5%) may match it for less and free the rest of its hours;
# - it reads its CLIP text tokens from step 0: ``image_embed_dropout`` 0.3 (beyond the
#   caption-dropped tenth, 30% of the samples get the learned unconditional image embedding and
#   keep their caption). The CLIP text tower binds colours to shapes (probe 1.00) where the image
#   tower hardly does (60%, chance 43%), and v2's decoder ignores its text tokens; the same
#   dropout as a fine-tune of the trained decoder (v2e) did not change that, as a late binding loss
#   had not reached the Imagen v2 base's images while one from step 0 did (v3).
# Recipe otherwise the Imagen base v4's (``BASE_RECIPES["v4"]``, bf16, snr_floor 1, "later" 0.25 x
# 2, its caption mixture; the range phase at 6,200, consolidation at 8,600, lr 1e-4 from 10,600),
# on the decoder's own architecture (SMALL_UNCLIP, 4x4 patches, 7.41M). Its ceiling: the hours of
# the decoder it would replace (decision in docs/model_card.md, "Twenty-first session").
V3_CONSOLIDATION_PHASE = {**{k: v for k, v in BASE_CONSOLIDATION_PHASE.items() if k != "mixture"},
                          "shapes_mixture": BASE_CONSOLIDATION_PHASE["mixture"]}  # fmt: skip
FRESH_DECODER = dict(source="shipped", recipe="v2", components=("decoder", "text_proj"), stages=("clip", "prior", "sr"))
DALLE2_V3_PLAN: tuple[dict, ...] = (
    dict(stage="decoder", max_steps=24000, batch_size=32, lr=5e-4, mixed_precision="bf16", snr_floor=1.0,
         timestep_bias_strategy="later", timestep_bias_multiplier=2.0, timestep_bias_portion=0.25,
         shapes_mixture=V2_MIXTURE, image_embed_dropout=0.3, fresh=FRESH_DECODER,
         phases={6200: RANGE_PHASE, 8600: V3_CONSOLIDATION_PHASE, 10600: {"lr": 1e-4}}),
)
DALLE2_PLANS = {"v1": DALLE2_PLAN, "v2": DALLE2_V2_PLAN, "v2e": DALLE2_V2E_PLAN, "v3": DALLE2_V3_PLAN}
PLAN_ONLY_KEYS = ("lr_drops", "phases", "graft", "fresh")  # plan entries that are not TrainConfig fields


def settings_at(item: dict, step: int) -> dict:
    """The run settings that plan ``item`` changes at stage step ``step``: ``lr`` from its
    ``lr_drops`` ({step: lr}), then every field of its ``phases`` ({step: {field: value}}; only
    fields a run may change on resume, ``config.RESUMABLE_CHANGES``) whose step is at or before
    ``step``, in step order (a later change wins). Empty before the first drop or phase."""
    events = [(int(at), {"lr": lr}) for at, lr in (item.get("lr_drops") or {}).items()]
    events += [(int(at), dict(fields)) for at, fields in (item.get("phases") or {}).items()]
    out = {}
    for at, fields in sorted(events, key=lambda e: e[0]):
        if step >= at:
            out.update(fields)
    return out


def phase_starts(item: dict) -> list[int]:
    """The stage steps where plan ``item`` changes settings (its lr drops and phases)."""
    return sorted({int(at) for at in [*(item.get("lr_drops") or {}), *(item.get("phases") or {})]})


def dalle2_stage_config(plan: dict, cache: Path, previous: str):
    from .config import RESUMABLE_CHANGES, TrainConfig

    common = dict(family="dalle2", data="shapes", model=previous, warmup_steps=100, lr_schedule="constant_with_warmup",
                  caption_dropout=0.1, ema_decay=0.999, min_snr_gamma=5.0, checkpoint_every=100, keep_checkpoints=2,
                  log_every=50, resume="latest")  # fmt: skip
    bad = {f for fields in (plan.get("phases") or {}).values() for f in fields} - RESUMABLE_CHANGES
    if bad:
        raise ValueError(f"plan {plan['stage']!r}: phases may change only {sorted(RESUMABLE_CHANGES)}, not {sorted(bad)}")
    common.update({k: v for k, v in plan.items() if k not in PLAN_ONLY_KEYS})
    return TrainConfig(out=str(Path(cache) / plan["stage"]), **common)


def dalle2_seed(out: Path, shipped: dict | None = None, stage: str | None = None, warm_start=None) -> dict | None:
    """Where a DALL-E 2 stage starts when it is seeded by shipped weights: ``{"step", "from",
    "cpu_hours"}`` (the shipped stage's step and wall hours, so a later ship adds this cache's
    hours to them instead of losing them). Recorded in ``out/warm_start.json`` on first use, so
    later runs keep counting from it; a stage with its own checkpoints and no record was trained
    from scratch here. Without ``shipped``/``warm_start`` only the record is read (None: not
    seeded)."""
    from .loop import latest_step

    record = _read_json(Path(out) / WARM_START_FILE)
    if record:
        return record
    if warm_start is None or stage not in (shipped or {}) or latest_step(out) is not None:
        return None
    return {"step": int(shipped[stage]["step"]), "from": str(warm_start),
            "cpu_hours": float(shipped[stage].get("cpu_hours", 0.0))}  # fmt: skip


def _start_source(spec: dict, out: Path, kind: str, builds: str, hint: str = "") -> tuple[Path, dict]:
    """The trained DALL-E 2 pipeline a graft or fresh start takes weights from (``spec["source"]``:
    a directory, or "shipped" for the package's default) and its training state, checked before
    anything is written: it must hold lineage ``spec["recipe"]`` (when the plan names one) and a
    record of every stage in ``spec["stages"]``. ``kind``/``builds``/``hint`` word the errors."""
    from .. import presets

    source = presets.WEIGHTS_DIR / "dalle2" if spec["source"] == "shipped" else Path(spec["source"])
    state = read_training_state(source)
    stage = Path(out).name
    want, have = spec.get("recipe"), recipe_of(state, stage)
    if want and state and have != want:
        raise ValueError(f"{kind} source {str(source)!r} holds lineage {have!r}, but the plan {builds.format(want=want)}; "
                         f"pass a directory of {want!r} weights as the {kind} source{hint}")  # fmt: skip
    missing = [s for s in spec["stages"] if s not in state]
    if missing:
        raise ValueError(f"{kind} source {str(source)!r} has no {TRAINING_STATE_FILE} record of {missing}; "
                         f"it cannot seed the {stage} stage")  # fmt: skip
    return source, state


def _write_start(base, out: Path, suffix: str, edit) -> Path:
    """Copy pipeline ``base`` to ``out.parent / f"{stage}-{suffix}"``, changed by ``edit(folder)``
    on a hidden temp copy that is renamed into place: the folder is complete or absent, a kill
    mid-copy leaves only the temp folder."""
    target = Path(out).parent / f"{Path(out).name}-{suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    shutil.copytree(base, tmp, dirs_exist_ok=True)
    edit(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def graft_start(graft: dict, previous: str, out: Path) -> dict:
    """Start a stage from the pipeline ``previous`` with ``graft["components"]`` taken from another
    trained DALL-E 2 pipeline (``graft["source"]``: a directory, or "shipped" for the package's
    default): writes ``out.parent / f"{stage}-graft"`` (float32) and returns the stage's seed,
    ``{"step", "from", "cpu_hours", "grafted"}`` -- step and hours of the source's record for
    this stage, and in ``grafted`` the records of the other stages it brings (``graft["stages"]``),
    so the lineage keeps counting their hours."""
    from ..pipelines.unclip import UnCLIPLitePipeline

    stage = Path(out).name
    source, state = _start_source(graft, out, "graft", "grafts {want!r}'s " + stage,
                                  hint=" (the last v1 DALL-E 2 default is in git: "
                                       "`git archive 0a619d9 imagen_lite/weights/dalle2 | tar -x -C DIR`)")  # fmt: skip

    def put_donor_components(folder: Path) -> None:
        donor = UnCLIPLitePipeline.from_pretrained(source, torch_dtype=torch.float32, use_safetensors=True)
        for name in graft["components"]:
            shutil.rmtree(folder / name, ignore_errors=True)
            getattr(donor, name).save_pretrained(folder / name, safe_serialization=True)

    target = _write_start(previous, out, "graft", put_donor_components)
    record = {s: {"step": int(state[s]["step"]), "cpu_hours": float(state[s].get("cpu_hours", 0.0))} for s in graft["stages"]}
    return {"step": record[stage]["step"], "cpu_hours": record[stage]["cpu_hours"], "from": str(target),
            "grafted": {"source": str(source), "stages": {s: r for s, r in record.items() if s != stage}}}  # fmt: skip


def fresh_start(fresh: dict, out: Path, seed: int = 0) -> dict:
    """Start a stage from another trained DALL-E 2 pipeline (``fresh["source"]``: a directory, or
    "shipped" for the package's default) with ``fresh["components"]`` given new random weights
    (their own configs, torch seeded with ``seed``): writes ``out.parent / f"{stage}-fresh"`` and
    returns the stage's seed, ``{"step": 0, "cpu_hours": 0.0, "from", "grafted"}``, ``grafted``
    holding the source's records of ``fresh["stages"]`` (the stages it brings trained, with their
    own recipe), so the lineage keeps counting their hours and says whose they are."""
    from ..pipelines.unclip import UnCLIPLitePipeline

    source, state = _start_source(fresh, out, "fresh-start", "builds on {want!r}")

    def renew_components(folder: Path) -> None:
        for name in (TRAINING_STATE_FILE, "imagen_lite_defaults.json"):  # a start point, not a default
            (folder / name).unlink(missing_ok=True)
        donor = UnCLIPLitePipeline.from_pretrained(source, torch_dtype=torch.float32, use_safetensors=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name in fresh["components"]:
                old = getattr(donor, name)
                shutil.rmtree(folder / name, ignore_errors=True)
                type(old).from_config(old.config).save_pretrained(folder / name, safe_serialization=True)

    target = _write_start(source, out, "fresh", renew_components)
    return {"step": 0, "cpu_hours": 0.0, "from": str(target),
            "grafted": {"source": str(source), "stages": brought_records(state, fresh["stages"])}}  # fmt: skip


def brought_records(state: dict, stages) -> dict:
    """The training-state records (step, hours, recipe) of ``stages`` that a lineage brings trained
    from another one, as ``dalle2_training_state`` ships them; stages ``state`` lacks are left out."""
    return {s: {"step": int(state[s]["step"]), "cpu_hours": float(state[s].get("cpu_hours", 0.0)),
                "recipe": recipe_of(state, s)} for s in stages if s in state}  # fmt: skip


def dalle2_hours(cache: Path) -> dict:
    """Wall hours per DALL-E 2 stage, as ``train_dalle2`` adds them up in ``cache/hours.json``."""
    return _read_json(Path(cache) / "hours.json")


ACCOUNTED_FILE = "hours_steps.json"  # {stage: the step up to which hours.json counts that stage's hours}


def _add_dalle2_hours(cache: Path, stage: str, hours: float, step: int | None = None) -> None:
    total = dalle2_hours(cache)
    total[stage] = round(total.get(stage, 0.0) + hours, 4)
    (Path(cache) / "hours.json").write_text(json.dumps(total, indent=2))
    if step is not None:
        accounted = _read_json(Path(cache) / ACCOUNTED_FILE)
        (Path(cache) / ACCOUNTED_FILE).write_text(json.dumps({**accounted, stage: int(step)}, indent=2))


def _count_killed_chunk(cache: Path, stage: str, out: Path) -> None:
    """Hours adds a chunk's wall time when the chunk returns; a run killed mid-chunk left
    checkpoints that no hours counted. Their ``run_seconds`` (the killed call's time up to the
    newest checkpoint) is added here, once. A stage with no accounted step yet (caches from
    before this record) starts being accounted from its newest checkpoint."""
    accounted = _read_json(Path(cache) / ACCOUNTED_FILE).get(stage)
    ckpts = list_checkpoints(Path(out) / "checkpoints")
    if not ckpts:
        return
    state = torch.load(ckpts[-1] / "state.pt", weights_only=True)
    if accounted is None:
        _add_dalle2_hours(cache, stage, 0.0, state["step"])
        return
    if state["step"] <= accounted:
        return
    seconds = float(state.get("extra", {}).get("run_seconds", 0.0))
    logger.warning("dalle2 %s: steps %d..%d were checkpointed by a run that did not return; adding its %.2f h",
                   stage, accounted, state["step"], seconds / 3600)  # fmt: skip
    _add_dalle2_hours(cache, stage, seconds / 3600, state["step"])


def train_dalle2(cache: Path, minutes: float, chunk: int = 200, plan=DALLE2_PLAN, start: str = "small",
                 warm_start: Path | None = None) -> dict:
    """Continue the DALL-E 2 default's training for ``minutes``; returns the steps per stage
    reached (stages after the first unfinished one are absent).

    With ``warm_start`` (a shipped dalle2 directory with ``training_state.json``), a stage with
    no checkpoint in ``cache`` starts from the shipped pipeline at its recorded step: stages
    the shipped weights finished are skipped, the first unfinished one trains its remaining
    steps (fresh AdamW and warm-up; the generic loop counts them from 0, ``warm_start.json``
    in the stage folder keeps the offset).
    """
    from .loop import latest_step, train

    deadline = time.monotonic() + 60 * minutes
    previous, steps = start, {}
    shipped = read_training_state(warm_start) if warm_start is not None else {}
    Path(cache).mkdir(parents=True, exist_ok=True)
    for item in plan:
        cfg = dalle2_stage_config(item, cache, previous)
        seed = dalle2_seed(Path(cfg.out), shipped, cfg.stage, warm_start)
        if seed is not None and item.get("fresh") and "grafted" not in seed:
            # a fresh-start lineage resumed from its own export (wip/dalle2-v3 on a new machine):
            # the stages its fresh start brought are recorded there, and stay in its count
            seed = {**seed, "grafted": {"source": str(warm_start), "stages": brought_records(shipped, item["fresh"]["stages"])}}
        if seed is None and item.get("graft") and latest_step(cfg.out) is None:
            seed = graft_start(item["graft"], previous, Path(cfg.out))
        if seed is None and item.get("fresh") and latest_step(cfg.out) is None:
            seed = fresh_start(item["fresh"], Path(cfg.out), cfg.seed)
        offset = seed["step"] if seed else 0
        if seed:  # recorded even for a stage the shipped weights finished, so its step and hours ship again
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out) / WARM_START_FILE).write_text(json.dumps(seed))
        if offset >= cfg.max_steps:  # the shipped weights finished this stage
            steps[cfg.stage], previous = offset, seed["from"]
            continue
        if seed:
            cfg = cfg.replace(model=seed["from"], max_steps=cfg.max_steps - offset)
        _count_killed_chunk(cache, cfg.stage, Path(cfg.out))
        done = latest_step(cfg.out) or 0
        while done < cfg.max_steps and time.monotonic() < deadline:
            t0 = time.monotonic()
            # a chunk never crosses an lr drop or a phase start; the settings in force at its first step run it
            starts = [at - offset for at in phase_starts(item) if at - offset > done]
            stop = min([cfg.max_steps, done + chunk, *starts])
            train(cfg.replace(stop_at=stop, **{"lr": cfg.lr, **settings_at(item, offset + done)}))
            done = latest_step(cfg.out) or 0
            _add_dalle2_hours(cache, cfg.stage, (time.monotonic() - t0) / 3600, done)
            logger.info("dalle2 %s: step %d/%d", cfg.stage, offset + done, offset + cfg.max_steps)
        steps[cfg.stage] = offset + done
        if done < cfg.max_steps:
            break
        previous = cfg.out
    return steps


def export_dalle2_checkpoint(cache: Path, out_dir: Path, checkpoint: str = "latest", defaults: dict | None = None,
                             plan=DALLE2_PLAN) -> Path:  # fmt: skip
    """Export a decoder checkpoint of the DALL-E 2 chain in ``cache`` (``train_default/dalle2``)
    as one float16 pipeline directory: its EMA decoder on top of the pipeline the decoder stage
    started from (CLIP, prior, text_proj, SR), plus the CLIP vision tower (``image_encoder/``)
    for ``encode_images`` and CLIP scores, ``imagen_lite_defaults.json`` (``defaults``) and
    ``training_state.json``. ``checkpoint``: ``"latest"`` or a ``step_*`` directory (one copied
    out of the cache too, for the evaluation of an earlier step). Read-only on the cache. For a
    checkpoint other than the newest, the decoder's recorded step is the checkpoint's and its
    hours are the cache's total so far (an upper bound)."""
    from transformers import CLIPVisionModelWithProjection

    from .. import presets
    from ..pipelines.unclip import UnCLIPLitePipeline
    from .loop import train

    item = {p["stage"]: p for p in plan}["decoder"]
    cfg = dalle2_stage_config(item, cache, "")
    seed = dalle2_seed(Path(cfg.out))  # a decoder seeded by shipped weights: its step counts from theirs
    ckpt = resolve_resume(Path(cfg.out) / "checkpoints", checkpoint)
    if ckpt is None:
        raise FileNotFoundError(f"no decoder checkpoint under {cfg.out}; train with scripts/train_default.py --stage dalle2")
    # the pipeline the stage started from (the sr stage's, or the shipped weights that seeded it)
    cfg = cfg.replace(model=json.loads((ckpt / "config.json").read_text())["model"])
    step = int(torch.load(ckpt / "state.pt", weights_only=True)["step"])
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as work:
        # a run resumed at its checkpoint's step with max_steps = that step trains nothing and
        # writes the EMA pipeline into its out (here a scratch folder, not the cache)
        train(cfg.replace(out=work, resume=str(ckpt), max_steps=step))
        pipe = UnCLIPLitePipeline.from_pretrained(work, **runtime.dtype_kwargs(torch.float16), use_safetensors=True)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        encoder = CLIPVisionModelWithProjection.from_pretrained(Path(work) / "image_encoder", use_safetensors=True)
        encoder.to(torch.float16).save_pretrained(out_dir / "image_encoder", safe_serialization=True)
        shutil.copytree(Path(work) / "feature_extractor", out_dir / "feature_extractor", dirs_exist_ok=True)
    if defaults is not None:
        (out_dir / presets.DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2))
    state = dalle2_training_state(cache, plan)
    state["decoder"]["step"] = (seed or {}).get("step", 0) + step
    write_training_state(out_dir, state)
    return out_dir


def dalle2_training_state(cache: Path, plan=DALLE2_PLAN) -> dict:
    """``training_state.json`` entries of the DALL-E 2 chain in ``cache``: per stage the step
    reached and the wall hours, the shipped weights' included for a stage they seeded, and the
    stage recipe."""
    from .loop import latest_step

    hours, state = dalle2_hours(cache), {}
    for item in plan:
        out = Path(cache) / item["stage"]
        seed = dalle2_seed(out) or {}
        state[item["stage"]] = {"step": seed.get("step", 0) + (latest_step(out) or 0),
                                "cpu_hours": round(seed.get("cpu_hours", 0.0) + hours.get(item["stage"], 0.0), 4),
                                "config": _comparable(item)}  # fmt: skip
        grafted = seed.get("grafted") or {}
        for stage, record in grafted.get("stages", {}).items():  # trained elsewhere, shipped with this lineage
            state[stage] = {**record, "config": {"grafted_from": grafted["source"]}}
    return state


SR_RUN_FIELDS = ("model", "max_steps", "batch_size", "lr", "warmup_steps", "sr_crop", "ema_decay", "mixed_precision",
                 "caption_dropout", "sr_noise_level_max", "seed")  # fmt: skip
# per family: the pipeline class, the SR components (their diffusers class) and the SR's training-state record
SR_PARTS = {"dalle2": ("UnCLIPLitePipeline", {"super_res_first": "UNet2DModel", "super_res_last": "UNet2DModel"}, "sr"),
            "imagen": ("ImagenPipeline", {"sr_unet": "UNet2DConditionModel"}, "imagen-sr")}  # fmt: skip


def put_sr_run(directory, sr_run, recipe: str | None = None) -> dict:
    """Put the SR UNet(s) of ``sr_run`` into the pipeline ``directory`` of the same family
    (float16) and record them; returns the SR's new record in its ``training_state.json``
    (``"sr"`` for DALL-E 2, ``"imagen-sr"`` for Imagen).

    ``sr_run`` is the output folder of ``imagen-lite train --family F --stage sr --model M`` with
    its pipeline written (the run reached ``--max-steps``, or was exported at a checkpoint by
    rerunning the command with ``--max-steps STEP --resume DIR/checkpoints/step_STEP``). M must be
    a directory of that family with an SR record (the shipped default): the SR keeps counting from
    it, step = M's + the run's newest checkpoint's, wall hours = M's + that checkpoint's
    ``run_seconds`` (the wall time of the call that wrote it: a run trained in one call, as
    ``ship_default.py --sr-from`` documents). ``recipe``: the record's lineage (default: M's).
    Shipping the same run again into M itself counts from M's record before it (kept in the
    record's ``finetuned_from``). Why a generic run and not a ``train_default`` stage: the
    twenty-third session's fine-tunes of the shipped SRs on full canvases (docs/model_card.md) are
    short runs of the user-facing fine-tuning command, which already resumes and checkpoints.
    Checked before ``directory`` is touched."""
    import diffusers

    from .loop import CONFIG_FILE

    sr_run, directory = Path(sr_run), Path(directory)
    config = _read_json(sr_run / CONFIG_FILE)
    family = config.get("family")
    if config.get("stage") != "sr" or family not in SR_PARTS:
        raise ValueError(f"--sr-from {sr_run}: not the output of `imagen-lite train --family imagen|dalle2 --stage sr` "
                         f"(its {CONFIG_FILE} says family={family!r}, stage={config.get('stage')!r})")  # fmt: skip
    pipeline_class, parts, key = SR_PARTS[family]
    from .. import presets

    have = presets.pipeline_class_of(directory)
    if have != pipeline_class:
        raise ValueError(f"--sr-from {sr_run}: a {family} SR run, but {str(directory)!r} is a {have} (a {pipeline_class} is needed)")
    if not all((sr_run / name / "config.json").is_file() for name in parts):
        raise ValueError(f"--sr-from {sr_run}: no {' and '.join(n + '/' for n in parts)} written there yet; export a "
                         f"checkpoint by rerunning its command with --max-steps STEP --resume {sr_run}/checkpoints/step_STEP")  # fmt: skip
    start = read_training_state(config.get("model", "")).get(key)
    if start is not None and start.get("config", {}).get("source") == str(sr_run.resolve()):
        start = start["config"]["finetuned_from"]  # M is the directory this run was shipped into: count from before
    if start is None:
        raise ValueError(f"--sr-from {sr_run}: it started from {config.get('model')!r}, which has no {TRAINING_STATE_FILE} "
                         f"{key!r} record to count its steps and hours from (start the run from a shipped {family} directory)")  # fmt: skip
    ckpts = list_checkpoints(sr_run / "checkpoints")
    if not ckpts:
        raise ValueError(f"--sr-from {sr_run}: no checkpoint under {sr_run / 'checkpoints'} to read its step and hours from")
    state = torch.load(ckpts[-1] / "state.pt", weights_only=True)
    hours = float(state.get("extra", {}).get("run_seconds", 0.0)) / 3600
    record = {"step": int(start["step"]) + int(state["step"]), "cpu_hours": round(float(start.get("cpu_hours", 0.0)) + hours, 4),
              "recipe": recipe or recipe_of({key: start}, key),
              "config": {"finetuned_from": {k: start[k] for k in ("step", "cpu_hours", "recipe") if k in start},
                         "source": str(sr_run.resolve()), "run": {k: config[k] for k in SR_RUN_FIELDS if k in config}}}  # fmt: skip
    for name, cls in parts.items():
        unet = getattr(diffusers, cls).from_pretrained(sr_run / name, torch_dtype=torch.float32)
        shutil.rmtree(directory / name, ignore_errors=True)
        unet.to(torch.float16).save_pretrained(directory / name, safe_serialization=True)
    write_training_state(directory, {key: record})
    return record
