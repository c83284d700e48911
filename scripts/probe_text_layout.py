#!/usr/bin/env python
"""Does a text encoder know which side each object of a relation caption goes to?

    python scripts/probe_text_layout.py imagen_lite/weights/imagen            # the T5 of a pipeline dir
    python scripts/probe_text_layout.py imagen_lite/weights/dalle2            # its CLIP text tower

Every relation caption of the shapes grammar ("a C1 S1 RELATION a C2 S2", 1,224 with distinct
objects; fewer is impossible, the grammar has 6 colours, 3 shapes, 4 relations) goes through the encoder; at each of its two shape words the output state is labelled
with the side that object takes ("A to the left of B": A left, B right; above / below
likewise: 4 classes, chance 25%). A linear probe (logistic regression, L2) is fitted on 70% of
the captions and scored on the other 30%. Sixteenth session: the Imagen base v3's T5 0.38, v4's
(layout loss, ``BaseRunConfig.layout_weight``) 1.00 after 2,000 steps. The binding probe of the
fourteenth session asked the same of colours.
"""

from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

import torch
import torch.nn.functional as F

SIDE = {"to the left of": 0, "to the right of": 1, "above": 2, "below": 3}
OPPOSITE = {0: 1, 1: 0, 2: 3, 3: 2}


def relation_captions() -> list[tuple[str, int]]:
    """Every relation caption with two distinct objects, and the side of its first object."""
    from imagen_lite.data import shapes

    art = lambda c: "an" if c == "orange" else "a"  # noqa: E731
    out = []
    for c1, s1, rel, c2, s2 in itertools.product(shapes.COLORS, shapes.SHAPES, shapes.RELATIONS, shapes.COLORS, shapes.SHAPES):
        if (c1, s1) != (c2, s2):
            out.append((f"{art(c1)} {c1} {s1} {rel} {art(c2)} {c2} {s2}", SIDE[rel]))
    return out


def load_text_encoder(directory: Path):
    """``(tokenizer, encode(list[str]) -> (states (B, L, D), input_ids))`` of a pipeline dir."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory / "tokenizer")
    config = (directory / "text_encoder" / "config.json").read_text()
    if '"t5"' in config:
        from transformers import T5EncoderModel as cls
    else:
        from transformers import CLIPTextModelWithProjection as cls
    enc = cls.from_pretrained(directory / "text_encoder").float().eval()

    @torch.no_grad()
    def encode(texts):
        ids = tok(texts, padding="max_length", max_length=min(tok.model_max_length, 32), truncation=True, return_tensors="pt")
        kwargs = {"attention_mask": ids.attention_mask} if '"t5"' in config else {}
        return enc(ids.input_ids, **kwargs).last_hidden_state, ids.input_ids

    return tok, encode


def shape_word_features(tok, encode, captions: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The output states at each caption's two shape words, and their sides."""
    from imagen_lite.data import shapes

    feats, labels = [], []
    for i in range(0, len(captions), 256):
        batch = captions[i:i + 256]
        states, ids = encode([c for c, _ in batch])
        for k, row in enumerate(ids.tolist()):
            words = [t.lstrip("\u2581").removesuffix("</w>") for t in tok.convert_ids_to_tokens(row)]
            at = [j for j, w in enumerate(words) if w in shapes.SHAPES]
            if len(at) != 2:
                raise ValueError(f"{batch[k][0]!r}: the tokenizer does not keep each shape word whole ({words})")
            side = batch[k][1]
            feats += [states[k, at[0]], states[k, at[1]]]
            labels += [side, OPPOSITE[side]]
    return torch.stack(feats), torch.tensor(labels)


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train_fraction: float = 0.7, steps: int = 500) -> float:
    """Test accuracy of a logistic-regression probe fitted on the first ``train_fraction``."""
    n = int(len(y) * train_fraction) // 2 * 2  # a caption's two words stay on one side of the split
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], 4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(x[:n] @ w + b, y[:n]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[n:] @ w + b).argmax(1) == y[n:]).float().mean().item()


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", type=Path, help="a pipeline directory with tokenizer/ and text_encoder/")
    p.add_argument("--seed", type=int, default=0, help="shuffles the captions before the split")
    args = p.parse_args(argv)
    captions = relation_captions()
    random.Random(args.seed).shuffle(captions)
    tok, encode = load_text_encoder(args.directory)
    x, y = shape_word_features(tok, encode, captions)
    acc = probe_accuracy(x, y)
    print(f"{args.directory}: side of each object at its shape word, probe test accuracy {acc:.3f} "
          f"(chance 0.25; {len(captions)} captions, 70/30 split)")  # fmt: skip
    return acc


if __name__ == "__main__":
    main()
