"""What the shipped tiny checkpoints' towers are trained to say, and a check that they say it.

The tiny text models were trained on Python only, so they cannot be taught to caption an image (an earlier attempt,
through the frozen text model, moved its loss almost only on the answer's fixed parts). The towers are trained
instead to put into every soft token a text embedding that names what is there: each image token becomes the
embedding (as the text model scales its own) of one token standing for the colour that covers most of its patch
region, each audio token the embedding of a token standing for what its 40 ms hold: quiet, a low beep or a high
beep. The text model then reads an image as a row-by-row colour map and a clip as a timeline, in tokens it knows.

Inputs are made by code, like the validation's: one shape (a disc or a bar) of one colour on another, with a little
pixel noise; one or two beeps, low (150-350 Hz) or high (1.5-3 kHz), on faint noise. `grounding_accuracy` decodes the
towers' outputs on held-out inputs by the nearest class embedding; untrained towers score about chance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 215), "yellow": (230, 205, 40),
           "black": (25, 25, 25), "white": (240, 240, 240)}
SHAPES = ("disc", "bar")
SOUNDS = ("quiet", "low", "high")
# The token that stands for each class: one the tiny tokenizer has (its 1,024 tokens are Python's), a piece of the
# class's name that no other class's name shares.
CLASS_TOKENS = {"image": {"red": 431, "green": 474, "blue": 533, "yellow": 452, "black": 843, "white": 641},
                "audio": {"quiet": 546, "low": 799, "high": 804}}
SAMPLE_RATE = 16000
HOP = 640  # 40 ms: one audio soft token (E2B's tower subsamples 10 ms frames 4x; the unified model's frames are 640)


def code_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """An image of one shape of one colour on another (uint8 [h, w, 3]) and its caption, e.g. "red disc on blue"."""
    fg, bg = rng.choice(list(COLOURS), size=2, replace=False)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    img = np.empty((h, w, 3), np.float32)
    img[:] = COLOURS[bg]
    y, x = np.mgrid[0:h, 0:w]
    if shape == "disc":
        r = rng.uniform(0.2, 0.35) * min(h, w)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = COLOURS[fg]
    else:
        top = int(rng.uniform(0.1, 0.6) * h)
        img[top : top + int(rng.uniform(0.15, 0.3) * h)] = COLOURS[fg]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), f"{fg} {shape} on {bg}"


def code_clip(rng: np.random.Generator, seconds: float = 2.0) -> tuple[np.ndarray, str]:
    """A clip of one or two beeps, low or high, and its caption, e.g. "two high beeps"."""
    n = int(rng.integers(1, 3))
    high = bool(rng.integers(2))
    f = rng.uniform(1500, 3000) if high else rng.uniform(150, 350)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = 0.01 * rng.standard_normal(t.size)
    for k in range(n):
        start = rng.uniform(0.05, 0.2) * seconds + k * seconds / 2
        on = (t >= start) & (t < start + rng.uniform(0.15, 0.25) * seconds)
        wave[on] += 0.5 * np.sin(2 * np.pi * f * t[on])
    words = f"{'one' if n == 1 else 'two'} {'high' if high else 'low'} beep{'s' if n > 1 else ''}"
    return wave.astype(np.float32), words


def image_labels(img: np.ndarray, side: int) -> np.ndarray:
    """The class (index into COLOURS) of each soft token, row by row: the colour nearest most pixels of its
    side x side region (the order transformers' pooler gives the tokens)."""
    cols = np.array(list(COLOURS.values()), np.float32)
    nearest = ((img[..., None, :].astype(np.float32) - cols) ** 2).sum(-1).argmin(-1)
    h, w = nearest.shape
    return np.array([np.bincount(nearest[r : r + side, c : c + side].ravel(), minlength=len(cols)).argmax()
                     for r in range(0, h, side) for c in range(0, w, side)])


def clip_labels(wave: np.ndarray) -> np.ndarray:
    """The class (index into SOUNDS) of each 40 ms: quiet below an RMS of 0.15, else low or high by the strongest
    frequency (above 1 kHz is high)."""
    out = []
    for i in range(len(wave) // HOP):
        seg = wave[i * HOP : (i + 1) * HOP].astype(np.float64)
        if np.sqrt((seg**2).mean()) < 0.15:
            out.append(0)
            continue
        peak = np.abs(np.fft.rfft(seg)).argmax() * SAMPLE_RATE / HOP
        out.append(2 if peak > 1000 else 1)
    return np.array(out)


def class_embeddings(embed_tokens: np.ndarray, kind: str) -> np.ndarray:
    """[classes, hidden]: the class tokens' rows of the token embedding, scaled by sqrt(hidden) as Gemma's text
    model scales what it reads (the soft tokens replace scaled embeddings)."""
    ids = list(CLASS_TOKENS[kind].values())
    return embed_tokens[ids].astype(np.float32) * np.float32(embed_tokens.shape[1] ** 0.5)


def nearest_class(features: np.ndarray, classes: np.ndarray) -> np.ndarray:
    d = ((features[:, None, :].astype(np.float64) - classes[None].astype(np.float64)) ** 2).sum(-1)
    return d.argmin(-1)


def grounding_accuracy(directory: str | Path, examples: int = 8, seed: int = 12345) -> dict[str, float]:
    """Share of held-out soft tokens whose nearest class embedding is their true class, per tower (7 x 10-token
    images, 2-second clips), computed by transformers' towers in float32 (validate.towers.TowerReference)."""
    from ..exporter.checkpoint import Checkpoint
    from ..validate.towers import (DEFAULT_IMAGE_TOKENS, TowerReference, _f32, audio_features, image_patches,
                                   image_size_for)

    ref = TowerReference(directory)
    with Checkpoint(directory) as ck:
        embed = _f32(ck, next(n for n in ck.tensors if n.endswith("language_model.embed_tokens.weight")))
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    if ref.has_vision:
        vision = ref.config.vision_config.to_dict()
        h, w = image_size_for(vision, DEFAULT_IMAGE_TOKENS)
        side = h // DEFAULT_IMAGE_TOKENS[0]
        classes, right, total = class_embeddings(embed, "image"), 0, 0
        for _ in range(examples):
            img, _ = code_image(rng, h, w)
            feats = ref.image_features(*image_patches(img, ref.patch_size))
            lab = image_labels(img, side)
            right += int((nearest_class(feats, classes) == lab).sum())
            total += lab.size
        out["image"] = right / total
    if ref.has_audio:
        classes, right, total = class_embeddings(embed, "audio"), 0, 0
        for _ in range(examples):
            wave, _ = code_clip(rng)
            feats = ref.audio_features(*audio_features(wave, directory))
            lab = clip_labels(wave)
            n = min(len(lab), len(feats))
            right += int((nearest_class(feats[:n], classes) == lab[:n]).sum())
            total += n
        out["audio"] = right / total
    return out
