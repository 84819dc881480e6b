"""The towers' fp32 reference and the image and audio inputs every runtime is given.

The reference is transformers' own vision and audio towers and their embedders (Gemma4VisionModel,
Gemma4AudioModel, Gemma4MultimodalEmbedder), built from the checkpoint's config and given only the tower tensors, in
float32: the text decoder is never read (E2B's towers are 0.3B parameters, the 31B's 0.4B). The features are what
Gemma4Model.get_image_features / get_audio_features return, computed by those methods themselves.

Inputs are made by code (no downloads): an image of smooth colour fields and shapes, at a size that no runtime's
preprocessing resizes (llama.cpp keeps any image aligned to patch x pooling within its 70..1120-token budget), patched
exactly as transformers' Gemma4ImageProcessor patches it; and a waveform of tones and a chirp, turned into log-mel
features by transformers' own Gemma4AudioFeatureExtractor with the checkpoint's processor settings.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import CheckpointError, Gemma4ExportError
from ..exporter.arch import head_architecture, load_config
from ..exporter.checkpoint import Checkpoint
from ..exporter.processor import processor_config

# The smallest image llama.cpp's gemma4v preprocessing takes unchanged is 70 soft tokens; 7 x 10 tokens of 3 x 3
# patches of 16 pixels is 336 x 480.
DEFAULT_IMAGE_TOKENS = (7, 10)
AUDIO_SAMPLE_RATE = 16000


def test_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB image (uint8, [H, W, 3]): two colour gradients, a disc and a bar, placed by the seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c = rng.uniform(0.2, 0.8, size=(3, 3)).astype(np.float32)
    img = np.stack([c[i, 0] + c[i, 1] * x / width - c[i, 2] * y / height for i in range(3)], axis=-1)
    cy, cx, r = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width, rng.uniform(0.15, 0.3) * min(height, width)
    img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 1, size=3)
    top = int(rng.uniform(0.05, 0.8) * height)
    img[top : top + max(2, height // 12), :] = rng.uniform(0, 1, size=3)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def image_size_for(vision: dict, tokens: tuple[int, int] = DEFAULT_IMAGE_TOKENS) -> tuple[int, int]:
    """(height, width) of an image that is `tokens` soft tokens high and wide for this vision config."""
    if vision.get("model_type") == "gemma4_unified_vision":
        side = vision.get("patch_size", 16) * vision.get("pooling_kernel_size", 3)
    else:
        side = vision["patch_size"] * vision["pooling_kernel_size"]
    return tokens[0] * side, tokens[1] * side


def image_patches(image: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """pixel_values [1, N, p*p*3] (float32, rescaled by 1/255, no normalisation) and pixel_position_ids [1, N, 2]
    (column, row), as Gemma4ImageProcessor makes them for an image it does not resize, without padding."""
    h, w, _ = image.shape
    if h % patch_size or w % patch_size:
        raise Gemma4ExportError(f"image {h}x{w} is not a whole number of {patch_size}-pixel patches")
    ph, pw = h // patch_size, w // patch_size
    px = image.astype(np.float32) * np.float32(1 / 255)
    # (ph, p, pw, p, C) -> (ph, pw, p, p, C): each patch flattened row by row, channels last
    patches = px.reshape(ph, patch_size, pw, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)
    cols, rows = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    pos = np.stack([cols, rows], axis=-1).reshape(ph * pw, 2).astype(np.int64)
    return patches[None], pos[None]


def test_audio(seconds: float = 2.0, sr: int = AUDIO_SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """A deterministic mono waveform (float32 in [-1, 1]): a chord that changes halfway, a chirp and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr), dtype=np.float64) / sr
    f = rng.uniform(180, 900, size=4)
    half = t < seconds / 2
    wave = np.where(half, np.sin(2 * np.pi * f[0] * t) + 0.5 * np.sin(2 * np.pi * f[1] * t),
                    np.sin(2 * np.pi * f[2] * t) + 0.5 * np.sin(2 * np.pi * f[3] * t))
    wave += 0.4 * np.sin(2 * np.pi * (300 + 1500 * t / seconds) * t) + 0.02 * rng.standard_normal(t.size)
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def audio_features(wave: np.ndarray, directory: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """input_features [1, T, mel] (float32) and input_features_mask [1, T] (bool), by transformers' own feature
    extractor with the checkpoint's settings (its defaults where the checkpoint has none)."""
    fe_cfg = dict(processor_config(directory).get("feature_extractor") or {})
    fe_cfg.pop("feature_extractor_type", None)
    if load_config(directory).get("model_type") == "gemma4_unified":  # raw waveform frames, no mel
        from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
            Gemma4UnifiedAudioFeatureExtractor as Extractor,
        )
    else:
        from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor as Extractor
    fe = Extractor(**fe_cfg)
    out = fe([wave], sampling_rate=fe.sampling_rate, return_tensors="np", return_attention_mask=True)
    return out["input_features"].astype(np.float32), out["input_features_mask"].astype(bool)


class TowerReference:
    """transformers' Gemma 4 towers and embedders in float32, loaded with the checkpoint's tower tensors only:
    Gemma4VisionModel / Gemma4AudioModel and their embedders, or the unified 12B's Gemma4UnifiedVisionEmbedder and
    audio embedder."""

    def __init__(self, directory: str | Path):
        import torch
        import transformers

        self.dir = Path(directory)
        raw = load_config(self.dir)
        arch = head_architecture(raw) or (raw.get("architectures") or ["?"])[0]
        if arch not in ("Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration"):
            raise Gemma4ExportError(f"{self.dir}: {arch} has no towers")
        self.unified = arch.startswith("Gemma4Unified")
        cfg = transformers.AutoConfig.from_pretrained(self.dir)
        self.config = cfg
        self._torch = torch
        # the attribute names, config and methods of Gemma4Model (Gemma4UnifiedModel), holding the towers alone
        m = SimpleNamespace(config=cfg, vision_tower=None, embed_vision=None, audio_tower=None, embed_audio=None)
        if self.unified:
            from transformers.models.gemma4_unified import modeling_gemma4_unified as mu

            self._cls = mu.Gemma4UnifiedModel
            if cfg.vision_config is not None:
                m.embed_vision = mu.Gemma4UnifiedVisionEmbedder(cfg.vision_config, cfg.text_config).float().eval()
            if cfg.audio_config is not None:
                m.embed_audio = mu.Gemma4UnifiedMultimodalEmbedder(cfg.audio_config, cfg.text_config).float().eval()
        else:
            from transformers.models.gemma4 import modeling_gemma4 as mg

            self._cls = mg.Gemma4Model
            if cfg.vision_config is not None:
                m.vision_tower = transformers.AutoModel.from_config(cfg.vision_config).float().eval()
                m.embed_vision = mg.Gemma4MultimodalEmbedder(cfg.vision_config, cfg.text_config).float().eval()
            if cfg.audio_config is not None:
                m.audio_tower = transformers.AutoModel.from_config(cfg.audio_config).float().eval()
                m.embed_audio = mg.Gemma4MultimodalEmbedder(cfg.audio_config, cfg.text_config).float().eval()
        self.model = m
        self._load()

    def _names(self, ck: Checkpoint) -> dict[str, str]:
        """{checkpoint tensor: module attribute path}: transformers' names, and for the unified model the hub's too
        (vision_embedder.*, embed_vision.embedding_projection), which transformers renames on load."""
        out = {}
        for name in ck.tensors:
            short = name.removeprefix("model.")
            if self.unified:
                if short.startswith("vision_embedder."):
                    short = "embed_vision." + short[len("vision_embedder."):]
                elif short == "embed_vision.embedding_projection.weight":
                    short = "embed_vision.multimodal_embedder.embedding_projection.weight"
            out[name] = short
        return out

    def _load(self) -> None:
        torch = self._torch
        with Checkpoint(self.dir) as ck:
            names = self._names(ck)
            for attr in ("vision_tower", "embed_vision", "audio_tower", "embed_audio"):
                mod = getattr(self.model, attr)
                if mod is None:
                    continue
                prefix = f"{attr}."
                want = mod.state_dict()  # tensors sharing the parameters' and persistent buffers' memory
                got = {short[len(prefix):]: name for name, short in names.items() if short.startswith(prefix)}
                missing = [k for k in want if k not in got and not _buffer(mod, k)]
                extra = [k for k in got if k not in want]
                if missing or extra:
                    raise CheckpointError(f"{self.dir}: tower tensors under {prefix} do not match transformers' "
                                          f"{type(mod).__name__}: missing {missing[:3]}, unexpected {extra[:3]}")
                # one tensor at a time into the module's own memory: no second copy of the towers (2 GB on E2B)
                with torch.no_grad():
                    for key, name in got.items():
                        value = torch.from_numpy(_f32(ck, name))
                        if value.shape != want[key].shape:
                            raise CheckpointError(f"{self.dir}: {name} is {list(value.shape)}, transformers' "
                                                  f"{type(mod).__name__} wants {list(want[key].shape)}")
                        want[key].copy_(value)

    @property
    def has_vision(self) -> bool:
        return self.model.embed_vision is not None

    @property
    def has_audio(self) -> bool:
        return self.model.embed_audio is not None

    @property
    def patch_size(self) -> int:
        """The side of the patches pixel_values holds: 16, or the unified model's merged 48."""
        v = self.config.vision_config
        return v.model_patch_size if self.unified else v.patch_size

    def image_features(self, pixel_values: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """[soft tokens, text hidden] for one image, by Gemma4Model.get_image_features."""
        torch = self._torch
        with torch.no_grad():
            out = self._cls.get_image_features(self.model, torch.from_numpy(np.ascontiguousarray(pixel_values)),
                                               torch.from_numpy(np.ascontiguousarray(position_ids)))
        return torch.cat(list(out.pooler_output), 0).reshape(-1, self.config.text_config.hidden_size).numpy()

    def audio_features(self, input_features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """[soft tokens, text hidden] for one clip: the valid frames of Gemma4Model.get_audio_features."""
        torch = self._torch
        with torch.no_grad():
            out = self._cls.get_audio_features(self.model, torch.from_numpy(np.ascontiguousarray(input_features)),
                                               torch.from_numpy(np.ascontiguousarray(mask)))
        feats = out.pooler_output[0]
        keep = out.attention_mask[0] if getattr(out, "attention_mask", None) is not None else None
        if keep is not None:
            feats = feats[keep.bool()]
        return feats.numpy()


def _buffer(mod, key: str) -> bool:
    return key in dict(mod.named_buffers())


def _f32(ck: Checkpoint, name: str) -> np.ndarray:
    from ..exporter.checkpoint import to_f32

    info = ck.info(name)
    return np.array(to_f32(ck.raw(name), info.dtype), dtype=np.float32).reshape(info.shape)


# ---- comparing a runtime's towers with the reference ---------------------------------------------------------

# What a tower artifact's embeddings may differ from the fp32 reference by: (min per-token cosine, relative error
# ||a - b|| / ||b|| over the whole image or clip). Measured on tiny-e2b's towers (untrained then) through llama.cpp's
# mtmd (image / audio): f32 projector 0.99997 / 0.0077 and 0.99998 / 0.0032, f16 the same to 4 digits, q8_0 0.99989
# / 0.0134 and 0.99936 / 0.0246; each limit is about twice the worst measured error. The trained towers measure
# lower (f32 0.99993 / 0.0035 and 0.9999997 / 0.0003; q8_0 0.99991 / 0.0045 and 0.99992 / 0.0046); at E2B's real
# width f16 comes to 0.99987 / 0.0155 (README).
TOWER_LIMITS: dict[str, tuple[float, float]] = {
    "float": (0.9998, 0.02),
    "q8_0": (0.998, 0.05),
}
MEDIA_NEW_TOKENS = 16
MEDIA_PROMPT = "<bos><|turn>user\n{media}Describe this.<turn|>\n<|turn>model\n"


def compare_features(got: np.ndarray, ref: np.ndarray) -> dict:
    """Per-token cosine (mean, min) and relative error of a runtime's embeddings against the reference's."""
    if got.shape != ref.shape:
        return {"tokens": int(got.shape[0]), "reference_tokens": int(ref.shape[0]), "cos_mean": 0.0, "cos_min": 0.0,
                "rel_error": float("inf")}
    a, b = got.astype(np.float64), ref.astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"tokens": int(a.shape[0]), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "rel_error": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))}


class MediaReference:
    """The whole multimodal model in fp32 (transformers' Gemma4ForConditionalGeneration), for generations from a
    prompt holding an image or a clip: the text decoder runs on the embeddings its own towers put in the media
    positions. It loads the whole model, so it is for checkpoints that fit in memory in fp32 (the tiny ones; E2B
    needs about 20 GB)."""

    def __init__(self, directory: str | Path):
        import torch
        import transformers

        self._torch = torch
        self.dir = Path(directory)
        arch = head_architecture(load_config(self.dir)) or "Gemma4ForConditionalGeneration"
        self.model = getattr(transformers, arch).from_pretrained(self.dir, dtype=torch.float32,
                                                                 use_safetensors=True).eval()
        self.unified = arch.startswith("Gemma4Unified")
        self.config = self.model.config

    def greedy(self, ids: list[int], n: int, image: np.ndarray | None = None, audio: np.ndarray | None = None
               ) -> tuple[list[int], list[float]]:
        """n tokens by argmax, and the reference's top-2 margin (in probability) at each."""
        torch = self._torch
        kw: dict = {}
        if image is not None:
            v = self.config.vision_config
            pv, pos = image_patches(image, v.model_patch_size if self.unified else v.patch_size)
            kw.update(pixel_values=torch.from_numpy(pv), image_position_ids=torch.from_numpy(pos))
        if audio is not None:
            x, mask = audio_features(audio, self.dir)
            kw.update(input_features=torch.from_numpy(x), input_features_mask=torch.from_numpy(mask))
        out: list[int] = []
        margins: list[float] = []
        seq = list(ids)
        with torch.no_grad():
            for _ in range(n):  # without a cache: the prompts are short and the media stay in every step's input
                # the modality of each position, as Gemma4Processor gives it: the bidirectional attention over an
                # image's tokens (use_bidirectional_attention "vision": 12B, 26B-A4B, 31B) is built from it
                types = [1 if t == self.config.image_token_id else 3 if t == self.config.audio_token_id else 0
                         for t in seq]
                logits = self.model(input_ids=torch.tensor([seq]), mm_token_type_ids=torch.tensor([types]),
                                    **kw).logits[0, -1].double()
                p = torch.softmax(logits, -1)
                top = torch.topk(p, 2)
                out.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
                seq.append(out[-1])
        return out, margins


class StreamedMediaReference:
    """MediaReference's generations for checkpoints too large to hold in fp32: given the media's soft tokens (from
    transformers' towers alone, TowerReference), merged into the prompt as Gemma4Model's forward merges them, the
    text model runs streamed one decoder layer at a time (validate/streamed.py) with a KV cache: each new token is
    one more pass over the layers. The towers need not stay in memory meanwhile."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def greedy(self, ids: list[int], n: int, features: dict[int, np.ndarray]) -> tuple[list[int], list[float]]:
        """n tokens by argmax after `ids`, whose placeholders (the keys of `features`: token ids) take the soft
        tokens in order, and the reference's top-2 margin (in probability) at each, as MediaReference gives them."""
        from .streamed import StreamedModel

        model = StreamedModel(self.dir)
        out: list[int] = []
        margins: list[float] = []
        try:
            cache = model.new_cache()
            seqs = model.start([list(ids)], [cache], [features])
            model.run_layers(seqs)
            h = seqs[0].hidden[0][-1:]
            while True:
                r = model.reduce(h, None, 2)
                v, lse = r["top_logits"][0].astype(np.float64), float(r["lse"][0])
                out.append(int(r["top_ids"][0][0]))
                margins.append(float(np.exp(v[0] - lse) - np.exp(v[1] - lse)))
                if len(out) == n:
                    return out, margins
                h = model.final_hidden([[out[-1]]], [cache])[0][-1:]
        finally:
            model.close()


def media_prompt_ids(encode, config: dict, kind: str, n: int) -> list[int]:
    """The validation's chat prompt as token ids, the image or clip expanded as Gemma4Processor expands it: its
    begin token, n placeholders (one per soft token), its end token. `encode` tokenizes text without specials."""
    head, tail = MEDIA_PROMPT.split("{media}")
    c = config
    if kind == "image":
        begin, token, end = c["boi_token_id"], c["image_token_id"], c["eoi_token_id"]
    else:
        begin, token, end = c["boa_token_id"], c["audio_token_id"], c.get("eoa_token_id", c.get("eoa_token_index"))
    return encode(head) + [begin] + [token] * n + [end] + encode(tail)


def media_generation(got: list[int], ref: list[int], margins: list[float]) -> dict:
    """Where a runtime's tokens first leave the reference's, and whether that was at a near-tie."""
    from .metrics import NEAR_TIE

    first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
    tie = first < len(ref) and margins[first] < NEAR_TIE
    return {"new_tokens": len(ref), "first_divergence": first, "near_tie": tie, "exact": first == len(ref)}


def tower_checks(runner, src_dir: str | Path, limits: tuple[float, float], whole: bool = True,
                 gen_exact: bool = True, new_tokens: int = MEDIA_NEW_TOKENS) -> dict[str, dict]:
    """The towers of a runtime against the fp32 reference, as report checks: for each modality the runtime has,
    its embeddings of the code-made image / clip against transformers' towers (cosine, relative error, within
    `limits`), and a greedy generation from a prompt holding that image / clip through the whole model against
    transformers' (the whole model in fp32 with `whole`, else streamed: StreamedMediaReference; with `gen_exact`, for
    a float text model, identical up to a near-tie divergence; else reported, not gated). `runner` has `vision`,
    `audio`, `embeddings(media)` and `media_prompt(kind, media) -> ids`, `media_greedy(kind, media, n)`."""
    ref = TowerReference(src_dir)
    cfg = ref.config
    checks: dict[str, dict] = {}
    media: dict[str, np.ndarray] = {}
    feats: dict[str, dict[int, np.ndarray]] = {}  # the reference's soft tokens, by placeholder token
    if ref.has_vision and runner.vision:
        img = test_image(*image_size_for(cfg.vision_config.to_dict()))
        media["image"] = img
        r = ref.image_features(*image_patches(img, ref.patch_size))
        feats["image"] = {cfg.image_token_id: r}
        checks["image_embeddings"] = compare_features(runner.embeddings(img), r)
    if ref.has_audio and runner.audio:
        wav = test_audio(2.0)
        media["audio"] = wav
        x, mask = audio_features(wav, src_dir)
        r = ref.audio_features(x, mask)
        feats["audio"] = {cfg.audio_token_id: r}
        checks["audio_embeddings"] = compare_features(runner.embeddings(wav), r)
    ref = None  # the towers in fp32 (2 GB on E2B) are not needed for the generations
    cos_min, rel = limits
    for name, c in checks.items():
        c["passed"] = c["cos_min"] >= cos_min and c["rel_error"] <= rel
        c["summary"] = (f"{c['tokens']} tokens: cosine min {c['cos_min']:.6f} (>= {cos_min}), relative error "
                        f"{c['rel_error']:.5f} (<= {rel})")
    if media:
        full = MediaReference(src_dir) if whole else StreamedMediaReference(src_dir)
        for kind, m in media.items():
            ids = runner.media_prompt(kind, m)
            ref_toks, margins = (full.greedy(ids, new_tokens, **{kind: m}) if whole
                                 else full.greedy(ids, new_tokens, feats[kind]))
            got = runner.media_greedy(kind, m, new_tokens)
            g = media_generation(got, ref_toks, margins)
            g["gated"] = gen_exact
            g["passed"] = not g["gated"] or g["exact"] or g["near_tie"]
            g["summary"] = (f"{new_tokens} greedy tokens after a prompt with the {kind}: "
                            + ("identical" if g["exact"] else f"first divergence at {g['first_divergence']}"
                               + (" (a near-tie)" if g["near_tie"] else ""))
                            + ("" if g["gated"] else " (reported, not gated: below float32 the text model's "
                               "generations are gated on the text prompts)"))
            g["prompt_tokens"] = len(ids)
            checks[f"{kind}_generation"] = g
    if not checks:
        raise Gemma4ExportError("neither the checkpoint nor the artifact has a tower both can run")
    return checks
