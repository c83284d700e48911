"""From a folder of your own captioned images to generated samples, in one script.

    python examples/finetune_custom_captions.py --images MY_PHOTOS --out runs/mine
    python examples/finetune_custom_captions.py --out runs/demo            # demo folder of shapes
    python examples/finetune_custom_captions.py --images MY_PHOTOS --model imagen_lite/weights/imagen --lora

The folder holds images with captions either as ``metadata.jsonl`` (Hugging Face
``imagefolder``: one ``{"file_name": "cat.png", "text": "a cat"}`` per line) or as a ``.txt``
beside each image (``cat.png`` + ``cat.txt``). Without ``--images`` the script writes a demo
folder of 64 captioned shapes images so it runs anywhere.

Steps (each is also one shell command, printed as the script runs):

1. train (or fine-tune) the Imagen-family 64px base stage on the folder
   (``imagen-lite train --family imagen --stage base --data DIR --out OUT/base ...``);
2. optionally the 64->256 super-resolution stage on the same folder, starting from step 1's
   pipeline (``--stage sr --model OUT/base``);
3. generate samples for the first captions with ``imagen_lite.generate(model=OUT/...)`` and
   write them as PNGs.

``--model tiny``/``small`` trains from scratch (the T5 trains jointly with the base, since no
pretrained T5 exists offline); a pipeline directory (a DeepFloyd IF download, the embedded
default, a previous run) fine-tunes it, fully or with ``--lora`` adapters. Re-running the same
command resumes from the newest checkpoint in ``OUT/*/checkpoints``. See docs/training.md.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import imagen_lite
from imagen_lite.data.shapes import write_imagefolder
from imagen_lite.training.config import TrainConfig
from imagen_lite.training.data import open_source
from imagen_lite.training.loop import train


def run_stage(stage: str, data: str, out: Path, model: str, args) -> Path:
    cfg = TrainConfig(
        family="imagen", stage=stage, data=data, out=str(out), model=model,
        finetune="lora" if args.lora else "full", max_steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, warmup_steps=min(100, args.steps // 10), checkpoint_every=max(1, args.steps // 4),
        resume="latest",
    )  # fmt: skip
    flags = (f"--family imagen --stage {stage} --data {shlex.quote(data)} --out {shlex.quote(str(out))} "
             f"--model {shlex.quote(model)} --finetune {cfg.finetune} --max-steps {cfg.max_steps} "
             f"--batch-size {cfg.batch_size} --lr {cfg.lr} --resume latest")  # fmt: skip
    print(f"[{stage}] imagen-lite train {flags}")
    return Path(train(cfg))


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=None, help="your captioned image folder (default: a demo folder)")
    p.add_argument("--out", type=Path, default=Path("runs/finetune"))
    p.add_argument("--model", default="tiny", help="'tiny'/'small' from scratch, or a pipeline dir to fine-tune")
    p.add_argument("--lora", action="store_true", help="LoRA adapters instead of full fine-tuning (needs peft)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per stage")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="default: 5e-4 from scratch, 1e-4 fine-tuning")
    p.add_argument("--sr", action="store_true", help="also train the 64->256 super-resolution stage")
    p.add_argument("--samples", type=int, default=4, help="captions of the folder to generate")
    p.add_argument("--sample-steps", type=int, default=25)
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 5e-4 if args.model in ("tiny", "small") else 1e-4

    data = args.images
    if data is None:
        data = args.out / "demo_images"
        if not (data / "metadata.jsonl").is_file():
            write_imagefolder(data, 64, seed=0, size=64)
        print(f"no --images given: wrote a demo folder of 64 captioned images to {data}")
    captions = open_source(str(data)).captions(args.samples)  # checks the folder before any training

    model = run_stage("base", str(data), args.out / "base", args.model, args)
    if args.sr:
        model = run_stage("sr", str(data), args.out / "sr", str(model), args)

    written = []
    sample_dir = args.out / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        image = imagen_lite.generate(caption, pipeline="imagen", model=str(model), seed=i,
                                     num_inference_steps=args.sample_steps)[0]  # the cascade's last stage  # fmt: skip
        path = sample_dir / f"{i:02d}.png"
        image.save(path)
        written.append(path)
        print(f"{path}: {caption!r}")
    return written


if __name__ == "__main__":
    main()
