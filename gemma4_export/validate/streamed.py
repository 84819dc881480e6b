"""The fp32 reference, streamed: transformers' own Gemma 4 modules, driven one decoder layer at a time.

The text model is built on PyTorch's meta device (no memory), and each decoder layer gets its weights only while it
runs: read from the safetensors shards by the checkpoint reader, upcast to float32, applied to every sequence, and
freed (or kept, while a memory budget allows, for the next pass). Embedding and per-layer-embedding rows are read
only for the token ids in use, the output head runs in blocks of vocabulary rows that are reduced at once, and the
vision and audio towers are never read. The math is transformers' own: its decoder layers, attention, MLP and MoE,
its PLE methods, rotary embedding, masks and norms; this module only feeds them, as the model's forward does. Where a
single layer is large (26B-A4B's experts, 3.1 GB of float32; 31B's and 12B's MLP and attention matrices), its large
weights are read as they run instead (validate/lazy.py: the experts one at a time with the arithmetic of
transformers' grouped_mm forward, the linear layers in blocks of rows), bitwise equal to the loaded modules.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError, Gemma4ExportError
from ..exporter.tensors import HF_NAMES, Role, Tensor, hf_name

# Decoder-layer weights kept in memory between passes (greedy decoding runs every layer once per token).
DEFAULT_KEEP_BYTES = 512 << 20
# Vocabulary rows of the output head computed per block: with E2B's width, 8192 rows are 50 MB of float32.
HEAD_BLOCK_ROWS = 8192
# Layers ahead whose tensor shapes the pool of released layer memory keeps (Gemma 4 repeats its attention types
# every 5 or 6 layers).
POOL_LOOKAHEAD = 6
# Allocations of at least this many bytes get their own mapping, given back when freed (_return_freed_memory).
MMAP_THRESHOLD = 1 << 20
# Checkpoint bytes read per step into the staging buffer (then upcast into float32 memory).
STAGE_BYTES = 16 << 20
# Tokens a dense MLP runs on at a time (it acts on each token alone): E2B's double-wide MLP over a 1,024-token
# calibration chunk makes three 50 MB intermediates at once.
MLP_ROWS = 256
# Weights read from the checkpoint as their module runs instead of loaded with their layer (validate/lazy.py): a
# layer's MoE experts over STREAM_EXPERTS_BYTES in float32 (26B-A4B's are 3.1 GB, one expert 24 MB) and linear layers
# over STREAM_LINEAR_BYTES (31B's MLP matrices are 462 MB each, its full layers' query and output 352 MB; 12B's MLP
# 236 MB; none of E2B's or E4B's).
STREAM_EXPERTS_BYTES = 256 << 20
STREAM_LINEAR_BYTES = 128 << 20
# In a layer whose experts are streamed, linear layers over this many bytes are streamed too: 26B-A4B's attention
# (its full layers' query and output 92 MB each, its sliding layers' 46 MB) was otherwise most of what its layer held,
# and took calibration's peak over 1 GB (1.11 GB; 0.96 GB with it streamed, on two real-width layers). None of the
# dense models has such a layer, so their MLPs (E2B's double-wide 75 MB, E4B's 105 MB) stay loaded and fast to decode.
STREAM_LINEAR_BESIDE_EXPERTS_BYTES = 32 << 20


@functools.cache
def _return_freed_memory() -> None:
    """Ask glibc to map every allocation of 1 MB or more on its own (and so give it back when freed), unless the
    user set MALLOC_MMAP_THRESHOLD_. Its default threshold grows to 32 MB, so the hidden states, masks and
    activations of the sequences (1-32 MB each, freed and made anew at every layer) came from heaps that cannot
    shrink past what still lives above them: calibrating E2B on 16 chunks of 1,024 tokens held under 1.1 GB of
    tensors and 2.4 GB resident by its 15th layer. Once per process; a no-op where the C library is not glibc."""
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL(None)
        if hasattr(libc, "gnu_get_libc_version"):
            libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _by_rows(forward, x):
    """A token-wise module's forward over [..., T, H], MLP_ROWS tokens at a time."""
    if x.shape[-2] <= MLP_ROWS:
        return forward(x)
    import torch

    return torch.cat([forward(x[..., r:r + MLP_ROWS, :]) for r in range(0, x.shape[-2], MLP_ROWS)], dim=-2)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise Gemma4ExportError("--device cuda: torch sees no CUDA device")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise Gemma4ExportError("--device mps: torch sees no Metal device")
    if device not in ("cpu", "cuda", "mps"):
        raise Gemma4ExportError(f"--device {device}: use cpu, cuda, mps or auto")
    return device


@dataclass
class _Seq:
    """One sequence on its way through the layers."""

    ids: list[int]
    hidden: object  # torch [1, T, H]
    ple: list | None  # per layer, torch [1, T, P]: the per-layer inputs, projected (None once used)
    positions: object  # torch [1, T]
    masks: dict
    rotary: dict
    shared: object  # transformers' KVSharingDict for this forward
    cache: object | None  # a DynamicCache while generating, else None


class StreamedModel:
    """A Gemma 4 checkpoint's text model in float32, one layer in memory at a time (plus what `keep_bytes` allows)."""

    def __init__(self, directory, device: str = "cpu", adapter=None, keep_bytes: int = DEFAULT_KEEP_BYTES,
                 stream: bool = True):
        """stream: MoE experts over STREAM_EXPERTS_BYTES and linear layers over STREAM_LINEAR_BYTES are read from
        the checkpoint as they run (validate/lazy.py); False loads every weight with its layer, as parameters that
        can be swapped (quant/sensitivity.py does)."""
        import torch
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        from ..exporter.checkpoint import Checkpoint

        self.torch = torch
        self.device = pick_device(device)
        _return_freed_memory()
        ck = Checkpoint(directory)
        if adapter is not None:
            from ..exporter.adapter import AdaptedCheckpoint, Adapter

            try:
                ck = AdaptedCheckpoint(ck, Adapter.load(adapter, ck))
            except BaseException:
                ck.close()
                raise
        self.ck = ck
        self.arch = ck.arch
        self.prefix = ck.text_prefix
        config = transformers.AutoConfig.from_pretrained(directory)  # config only: never remote code
        text = config.get_text_config()
        text._attn_implementation = "sdpa"  # what from_pretrained picks for the whole-model class
        self.config = text
        self._kv_unread = self._kv_unread_after()
        self._top_config = config  # the media token ids and the model type (whose mask functions media prompts use)
        try:
            cls = MODEL_MAPPING[type(text)]
        except KeyError:
            raise Gemma4ExportError(f"{directory}: transformers {transformers.__version__} has no text model for "
                                    f"{type(text).__name__}") from None
        with torch.device("meta"):
            self.shell = cls(text)  # the modules, with no memory behind them
        for layer in self.shell.layers:
            if isinstance(getattr(layer, "mlp", None), torch.nn.Module):
                layer.mlp.forward = functools.partial(_by_rows, layer.mlp.forward)
        # layer -> {its parameter (relative name) -> the module that reads it as it runs}
        self._streamed: dict[int, dict[str, torch.nn.Module]] = {}
        if stream:
            for i in range(len(self.shell.layers)):
                self._stream_large(i, ck)
        self._embedding_cls = type(self.shell.embed_tokens)
        self.has_ple = bool(getattr(self.shell, "hidden_size_per_layer_input", 0))
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.keep_bytes = keep_bytes
        self._stage = np.empty(0, dtype=np.uint8)  # the bytes of the tensor being read
        self._scratch: dict[tuple[int, ...], object] = {}  # float32 buffers for streamed weights, one per shape
        self._pool: dict[tuple[int, ...], list] = {}  # float32 tensors of released layers, by shape
        self._layer_shapes: dict[int, list] = {}
        self._kept: dict[int, object] = {}
        self._kept_bytes = 0
        self._head: object | None = None
        self.head_name = hf_name(Tensor.OUTPUT) if not self.arch.tie_word_embeddings else \
            hf_name(Tensor.TOKEN_EMBD, prefix=self.prefix)
        self.vocab = self.ck.info(self.head_name).shape[0]
        # the final norm stays; the PLE projection and its norm are read by `start` (and stay only where layers may)
        self._load(self.shell.norm, {"weight": Tensor.OUTPUT_NORM})
        self.rotary = type(self.shell.rotary_emb)(config=text, device=self.device)
        self.layers_read = 0  # layer loads from the checkpoint (a pass over a kept layer reads nothing)
        # (checkpoint name, float32 tensor) -> tensor: applied to lookup rows and head blocks as they are read
        # (quant/sensitivity.py quantizes them there); None for the fp32 model itself
        self.transform = None

    # ---- weights -------------------------------------------------------------------------------------------------
    def _tensor(self, name: str, out=None, rows: tuple[int, int] | None = None):
        """One checkpoint tensor (or rows of its 2-D form) as float32 on the device: read into a reused staging
        buffer of at most STAGE_BYTES at a time and upcast into `out`, or into a float32 tensor of its shape from
        the pool (memory that released layers gave back). New memory for every read costs page faults that take
        longer than the upcast itself, and one staging block bounds the bytes in flight (an expert tensor of 26B-A4B
        is 1 GB of bf16)."""
        torch = self.torch
        info = self.ck.info(name)
        width = info.shape[-1] if info.shape else 1
        start, stop = rows if rows is not None else (0, info.numel // width if width else 0)
        shape = info.shape if rows is None else (stop - start, width)
        if out is None:
            free = self._pool.get(tuple(shape))
            out = free.pop() if free else torch.empty(shape, dtype=torch.float32, device=self.device)
        flat = out.view(-1, width) if info.shape else out.view(1, 1)
        per = max(1, STAGE_BYTES // max(1, width * info.nbytes // max(1, info.numel)))
        for r in range(start, stop, per):
            r1 = min(stop, r + per)
            need = (r1 - r) * width * info.nbytes // max(1, info.numel)
            if self._stage.nbytes < need:
                self._stage = np.empty(need, dtype=np.uint8)
            arr = self.ck.read_into(name, self._stage, (r, r1)) if info.shape else \
                self.ck.read_into(name, self._stage).reshape(1, 1)
            src = torch.from_numpy(arr)
            if arr.dtype == np.uint16:  # bf16 bit patterns
                src = src.view(torch.bfloat16)
            flat[r - start: r1 - start].copy_(src.reshape(r1 - r, width))
        return out

    def _load(self, module, names: dict[str, Tensor | str], bid: int | None = None) -> int:
        """Give `module` its weights: param name -> canonical key (or checkpoint name). Returns the bytes."""
        state = {}
        for pname, key in names.items():
            cname = hf_name(key, bid, self.prefix) if isinstance(key, Tensor) else key
            state[pname] = self._tensor(cname)
        module.load_state_dict(state, strict=True, assign=True)
        return sum(t.numel() * 4 for t in state.values())

    def _layer_names(self, i: int) -> dict[str, Tensor]:
        """Decoder layer i's parameters (relative module path -> canonical key), streamed weights included."""
        lead = f"layers.{i}."
        out = {}
        for spec in self.ck.expected:
            if spec.layer != i or spec.role == Role.KV_SHARED_UNUSED or spec.key is None:
                continue
            rel = HF_NAMES[spec.key].format(bid=i)
            out[rel[len(lead):]] = spec.key
        return out

    def _loaded_names(self, i: int) -> dict[str, Tensor]:
        """What loading decoder layer i reads: its parameters less the weights it streams."""
        streamed = self._streamed.get(i, {})
        return {r: k for r, k in self._layer_names(i).items() if r not in streamed}

    # ---- weights read as they run (validate/lazy.py) --------------------------------------------------------------
    def _stream_large(self, i: int, ck) -> None:
        """Put StreamedExperts and StreamedLinear in place of decoder layer i's large experts and linear layers."""
        from .lazy import StreamedExperts, StreamedLinear

        torch = self.torch
        layer = self.shell.layers[i]
        names = self._layer_names(i)
        streamed: dict[str, torch.nn.Module] = {}

        def large_experts(mod) -> bool:
            return hasattr(mod, "gate_up_proj") and hasattr(mod, "num_experts") and \
                4 * (mod.gate_up_proj.numel() + mod.down_proj.numel()) > STREAM_EXPERTS_BYTES

        linear_bytes = STREAM_LINEAR_BYTES
        if any(large_experts(mod) for mod in layer.modules()):
            linear_bytes = min(linear_bytes, STREAM_LINEAR_BESIDE_EXPERTS_BYTES)
        for mname, mod in list(layer.named_modules()):
            if not mname:
                continue
            parent, _, child = mname.rpartition(".")
            if isinstance(mod, torch.nn.Linear) and mod.bias is None and f"{mname}.weight" in names and \
                    4 * mod.weight.numel() > linear_bytes:
                new = StreamedLinear(self, mod, hf_name(names[f"{mname}.weight"], i, ck.text_prefix))
                streamed[f"{mname}.weight"] = new
            elif large_experts(mod):
                new = StreamedExperts(self, mod, hf_name(Tensor.EXPERTS_GATE_UP, i, ck.text_prefix),
                                      hf_name(Tensor.EXPERTS_DOWN, i, ck.text_prefix))
                streamed[f"{mname}.gate_up_proj"] = streamed[f"{mname}.down_proj"] = new
            else:
                continue
            setattr(layer.get_submodule(parent) if parent else layer, child, new)
        if streamed:
            self._streamed[i] = streamed

    def scratch(self, shape: tuple[int, ...]):
        """A float32 buffer of this shape, the same one at every call (an expert's matrix or a block of rows)."""
        if shape not in self._scratch:
            self._scratch[shape] = self.torch.empty(shape, dtype=self.torch.float32, device=self.device)
        return self._scratch[shape]

    def read_rows(self, name: str, start: int, stop: int, out):
        """Rows [start, stop) of checkpoint tensor `name` in its 2-D form, as float32 into `out`."""
        return self._tensor(name, out, (start, stop))

    def drop_stage(self) -> None:
        self._stage = np.empty(0, dtype=np.uint8)

    def layer(self, i: int):
        """Decoder layer i with its weights in memory."""
        if i in self._kept:
            return self._kept[i]
        layer = self.shell.layers[i]
        self._trim_pool(i)  # before the load: E2B's first double-wide layer would load beside 113 MB of narrow MLP
        try:
            size = self._load(layer, self._loaded_names(i), i)
        except (RuntimeError, KeyError) as e:  # strict loading: the module and the checkpoint disagree
            raise CheckpointError(f"{self.ck.dir}: layer {i} does not match transformers' "
                                  f"{type(layer).__name__}: {e}") from None
        self.layers_read += 1
        self._trim_pool(i + 1)
        self.drop_stage()  # not held while the layer runs
        if self._kept_bytes + size <= self.keep_bytes:
            self._kept[i] = layer
            self._kept_bytes += size
        return layer

    def _shapes(self, i: int) -> list[tuple[int, ...]]:
        """The shapes of decoder layer i's checkpoint tensors."""
        if i not in self._layer_shapes:
            self._layer_shapes[i] = [tuple(self.ck.info(hf_name(k, i, self.prefix)).shape)
                                     for k in self._loaded_names(i).values()]
        return self._layer_shapes[i]

    def layer_bytes(self) -> int:
        """The float32 bytes of the largest decoder layer: what one loaded layer holds (with the buffers its
        streamed weights are read into: one expert, one block of rows)."""
        def held(i: int) -> int:
            buffers = {m.scratch_shapes for m in self._streamed.get(i, {}).values()}
            return 4 * sum(math.prod(s) for s in self._shapes(i)) + 4 * sum(math.prod(s) for b in buffers for s in b)

        return max((held(i) for i in range(self.config.num_hidden_layers)), default=0)

    def token_bytes(self) -> int:
        """The float32 bytes a fresh sequence holds per token between layers: its hidden state, its per-layer inputs,
        and the keys and values its KV-shared layers read (one source layer of each attention type)."""
        cfg = self.config
        per = cfg.hidden_size
        if self.has_ple:
            per += cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
        if getattr(cfg, "num_kv_shared_layers", 0):
            widths: dict[str, int] = {}  # attention type -> its key projection's rows (heads x head width)
            for i, kind in enumerate(cfg.layer_types):
                if Tensor.ATTN_K in self._layer_names(i).values():
                    rows = self.ck.info(hf_name(Tensor.ATTN_K, i, self.prefix)).shape[0]
                    widths[kind] = max(widths.get(kind, 0), rows)
            per += 2 * sum(widths.values())
        return 4 * per

    def _trim_pool(self, first: int) -> None:
        """Let go of pooled tensors that the POOL_LOOKAHEAD layers from `first` on cannot use: once a layer is
        loaded, the shapes of the layers behind (E2B's ordinary MLPs, 140 MB, once its double-wide layers begin)
        would otherwise be held to the end; after the last layer, those the next pass does not begin with (E2B's
        double-wide MLP, 270 MB beside the next calibration group's new sequences)."""
        if not self._pool:
            return
        want: dict[tuple[int, ...], int] = {}
        for j in range(first, min(first + POOL_LOOKAHEAD, self.config.num_hidden_layers)):
            for shape, n in Counter(self._shapes(j)).items():
                want[shape] = max(want.get(shape, 0), n)
        for shape in list(self._pool):
            free = self._pool[shape]
            del free[want.get(shape, 0):]
            if not free:
                del self._pool[shape]

    def release(self, i: int) -> None:
        """Drop layer i's weights (unless kept); their memory goes to the pool for the next layer's tensors."""
        if i in self._kept:
            return
        layer = self.shell.layers[i]
        for t in list(layer.parameters()) + list(layer.buffers()):
            if t.device.type != "meta":
                self._pool.setdefault(tuple(t.shape), []).append(t.data)
        layer.to("meta")

    def head_blocks(self) -> Iterator[tuple[int, object]]:
        """(first row, float32 block of the output head's rows) over the vocabulary."""
        if self._head is not None:
            yield 0, self._head
            return
        info = self.ck.info(self.head_name)
        if info.numel * 4 <= self.keep_bytes - self._kept_bytes:
            self._head = self._tensor(self.head_name)
            self._kept_bytes += info.numel * 4
            yield 0, self._head
            return
        buf = self.torch.empty(min(HEAD_BLOCK_ROWS, self.vocab), info.shape[1], device=self.device)
        for r in range(0, self.vocab, HEAD_BLOCK_ROWS):  # one buffer: a block is used before the next is read
            stop = min(self.vocab, r + HEAD_BLOCK_ROWS)
            yield r, self._rows(self.head_name, r, stop, buf[: stop - r])

    def _rows(self, name: str, start: int, stop: int, out=None):
        t = self._tensor(name, out, (start, stop))
        return t if self.transform is None else self.transform(name, t)

    def _gather(self, key: Tensor, ids: np.ndarray):
        """Rows `ids` (sorted, unique) of a lookup table, read in runs of consecutive ids."""
        torch = self.torch
        name = hf_name(key, prefix=self.prefix)
        parts, i = [], 0
        while i < len(ids):
            j = i + 1
            while j < len(ids) and ids[j] == ids[j - 1] + 1:
                j += 1
            parts.append(self._rows(name, int(ids[i]), int(ids[j - 1]) + 1))
            i = j
        return torch.cat(parts) if parts else torch.zeros(0, device=self.device)

    def _embedding(self, key: Tensor, ids: np.ndarray, dim: int, scale: float):
        """transformers' scaled embedding module over just the rows `ids`."""
        with self.torch.device("meta"):
            emb = self._embedding_cls(len(ids), dim, None, embed_scale=scale)
        emb.load_state_dict({"weight": self._gather(key, ids)}, strict=False, assign=True)
        emb.embed_scale = self.torch.tensor(scale, device=self.device)  # its non-persistent buffer
        return emb

    # ---- the forward ---------------------------------------------------------------------------------------------
    def start(self, sequences: list[list[int]], caches: list | None = None, media: list | None = None
              ) -> list[_Seq]:
        """Embed each sequence (its tokens continue its cache, when it has one) and prepare its masks and rotary
        embeddings, as Gemma 4's text model does before its layers. `media` gives, per sequence, None or
        {placeholder token id: features [n, hidden]} (a tower's soft tokens): as Gemma4Model's forward merges them,
        the placeholders are looked up as the pad token (in the per-layer table too), their embeddings replaced by
        the features in order, and an image's tokens attend to each other on the sliding layers where the model
        has bidirectional vision attention."""
        torch = self.torch
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        caches = caches or [None] * len(sequences)
        media = media or [None] * len(sequences)
        cfg = self.config
        lookups = []
        for ids, med in zip(sequences, media):
            arr = np.asarray(ids, dtype=np.int64)
            lookups.append(np.where(np.isin(arr, list(med)), cfg.pad_token_id, arr) if med else arr)
        used = np.unique(np.concatenate(lookups)) if lookups else np.empty(0, np.int64)
        if used.size and (used[0] < 0 or used[-1] >= self.arch.vocab_size):
            raise Gemma4ExportError(f"token id {int(used[-1])} is outside the vocabulary ({self.arch.vocab_size})")
        shell = self.shell
        shell.embed_tokens = self._embedding(Tensor.TOKEN_EMBD, used, cfg.hidden_size, cfg.hidden_size ** 0.5)
        if self.has_ple:
            if shell.per_layer_model_projection.weight.device.type == "meta":
                self._load(shell.per_layer_model_projection, {"weight": Tensor.PLE_MODEL_PROJ})
                self._load(shell.per_layer_projection_norm, {"weight": Tensor.PLE_PROJ_NORM})
            p = cfg.hidden_size_per_layer_input
            shell.embed_tokens_per_layer = self._embedding(Tensor.PLE_TABLE, used, cfg.num_hidden_layers * p,
                                                           p ** 0.5)
        out = []
        same_length: dict[int, tuple] = {}
        with torch.no_grad():
            for ids, lookup, cache, med in zip(sequences, lookups, caches, media):
                local = torch.as_tensor(np.searchsorted(used, lookup), device=self.device)[None]
                x = shell.embed_tokens(local)
                arr = np.asarray(ids, dtype=np.int64)
                for token, feats in (med or {}).items():
                    at = np.flatnonzero(arr == token)
                    if len(at) != len(feats):
                        raise Gemma4ExportError(f"{len(at)} placeholders of token {token} for {len(feats)} soft "
                                                "tokens")
                    x[0, torch.as_tensor(at, device=self.device)] = torch.as_tensor(
                        np.asarray(feats), dtype=x.dtype, device=self.device)
                ple = None
                if self.has_ple:  # one tensor per layer, so run_layers can let each go once its layer has run
                    ple = [p.clone() for p in
                           shell.project_per_layer_inputs(x, shell.get_per_layer_inputs(local, x)).unbind(2)]
                # fresh text sequences of one length share their positions, masks and rotary tables (the layers
                # only read them): 16 calibration chunks of E2B held 96 MB of identical rotary tables
                shared_key = x.shape[1] if cache is None and not med else None
                if shared_key in same_length:
                    pos, masks, rot = same_length[shared_key]
                else:
                    past = cache.get_seq_length() if cache is not None else 0
                    pos = (torch.arange(x.shape[1], device=self.device) + past)[None]
                    kw = {"config": cfg, "inputs_embeds": x, "attention_mask": None, "cache": cache,
                          "position_ids": pos}
                    image = getattr(self._top_config, "image_token_id", None)
                    if med and image in med and getattr(cfg, "use_bidirectional_attention", None) == "vision":
                        masks = self._vision_masks(kw, torch.as_tensor((arr == image).astype(np.int64))[None])
                    else:
                        masks = {"full_attention": create_causal_mask(**kw),
                                 "sliding_attention": create_sliding_window_causal_mask(**kw)}
                    rot = {t: self.rotary(x, pos, t) for t in set(cfg.layer_types)}
                    if shared_key is not None:
                        same_length[shared_key] = (pos, masks, rot)
                out.append(_Seq(list(ids), x, ple, pos, masks, rot, _kv_sharing_dict(), cache))
        shell.embed_tokens = shell.embed_tokens_per_layer = None
        if self.has_ple and not self.keep_bytes:  # one pass (calibration): E2B's projection is 52 MB of float32
            shell.per_layer_model_projection.to("meta")
            shell.per_layer_projection_norm.to("meta")
        return out

    def _vision_masks(self, kw: dict, image_types) -> dict:
        """The masks of a prompt holding images, as the model's forward builds them (image_types: 1 at image
        placeholders): Gemma4Model keeps the full-attention layers causal and lets each image's tokens see each
        other on the sliding ones (create_masks_for_vision_model); the unified model's forward passes the image
        blocks to transformers' create_masks_for_generate, which opens them on every layer."""
        import importlib

        kind = self._top_config.model_type
        module = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
        blocks = module.get_block_sequence_ids_for_mask(image_types, device=self.device)
        if kind == "gemma4_unified":
            from transformers.masking_utils import create_masks_for_generate

            return create_masks_for_generate(block_sequence_ids=blocks, **kw)
        return module.create_masks_for_vision_model(block_sequence_ids=blocks, **kw)

    def run_layer(self, i: int, layer, seqs: list[_Seq]) -> None:
        """Decoder layer i (loaded) over the sequences."""
        t = self.config.layer_types[i]
        unread = self._kv_unread[i]
        with self.torch.no_grad():
            for s in seqs:
                kw = {"shared_kv_states": s.shared, "position_embeddings": s.rotary[t], "attention_mask": s.masks[t],
                      "position_ids": s.positions, "cache": s.cache}
                if self.has_ple:
                    kw["per_layer_input"] = s.ple[i]
                s.hidden = layer(s.hidden, **kw)
                for kind in unread & set(s.shared or ()):  # before the next sequence stores its own
                    del s.shared[kind]
        if i in self._streamed:
            self.drop_stage()  # its streamed weights' reads staged through it

    def finish(self, seqs: list[_Seq]) -> None:
        """The final norm, after the last layer."""
        for s in seqs:
            with self.torch.no_grad():
                s.hidden = self.shell.norm(s.hidden)
            s.ple = s.masks = s.rotary = s.shared = None

    def run_layers(self, seqs: list[_Seq], on_layer=None) -> None:
        """Every decoder layer over every sequence, loading each layer once; on_layer(i) after each."""
        for i in range(self.config.num_hidden_layers):
            self.run_layer(i, self.layer(i), seqs)
            self.release(i)
            for s in seqs:
                if s.ple is not None:
                    s.ple[i] = None  # the per-layer inputs go as their layer is done (16 chunks of E2B: 587 MB)
            if on_layer is not None:
                on_layer(i)
        self._trim_pool(0)  # a next pass begins at layer 0
        self.finish(seqs)

    def _kv_unread_after(self) -> list[set[str]]:
        """Per layer, the attention types whose stored keys and values no later layer reads. transformers' last
        layer of each type stores its own for assistant models even where no layer shares them (26B-A4B, 31B: up to
        48 MB per 1,024-token sequence, held to the end); KV-shared layers read theirs to the last layer."""
        cfg = self.config
        n = cfg.num_hidden_layers
        modes = getattr(cfg, "kv_sharing_modes", None)
        if modes is None:
            return [set() for _ in range(n)]
        types = set(cfg.layer_types)
        return [types - {cfg.layer_types[j] for j in range(i + 1, n) if modes[j] == "reuse"} for i in range(n)]

    def final_hidden(self, sequences: list[list[int]], caches: list | None = None) -> list:
        """The final normed hidden states [T, H] of each sequence."""
        seqs = self.start(sequences, caches)
        self.run_layers(seqs)
        return [s.hidden[0] for s in seqs]

    # ---- the head ------------------------------------------------------------------------------------------------
    def _logits(self, h, w):
        z = h @ w.T
        if self.softcap is not None:  # as transformers' Gemma 4 heads apply it
            z = z / self.softcap
            z = self.torch.tanh(z)
            z = z * self.softcap
        return z

    def logits(self, h) -> np.ndarray:
        """Full-vocabulary logits [T, V] (for small vocabularies and tests: V x T float32 in memory)."""
        with self.torch.no_grad():
            return self.torch.cat([self._logits(h, w) for _, w in self.head_blocks()], dim=1).cpu().numpy()

    def reduce(self, h, targets: np.ndarray | None, top: int) -> dict[str, np.ndarray]:
        """The head over hidden states h [T, H], reduced block by block: per row the log-sum-exp, the `top` largest
        logits with their ids (largest first; equal logits by id, as argmax picks) and, with targets, each row's
        logit of its target. A block only enters the running top-k where it beats a row's current k-th logit."""
        torch = self.torch
        n = h.shape[0]
        acc = torch.float32 if self.device == "mps" else torch.float64  # Metal has no float64
        lse = torch.full((n,), -math.inf, dtype=acc, device=self.device)
        best_v = torch.empty(n, 0, device=self.device)
        best_i = torch.empty(n, 0, dtype=torch.int64, device=self.device)
        tgt = torch.as_tensor(targets, device=self.device) if targets is not None else None
        tgt_logit = torch.zeros(n, dtype=acc, device=self.device)
        with torch.no_grad():
            for v0, w in self.head_blocks():
                z = self._logits(h, w)
                lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1).to(acc))
                if tgt is not None:
                    inside = (tgt >= v0) & (tgt < v0 + z.shape[1])
                    rows = inside.nonzero().flatten()
                    tgt_logit[rows] = z[rows, tgt[rows] - v0].to(acc)
                cols = torch.arange(v0, v0 + z.shape[1], device=self.device)
                if best_v.shape[1] >= top:  # only columns that beat some row's k-th logit can enter
                    keep = (z >= best_v.min(dim=1).values[:, None]).any(dim=0).nonzero().flatten()
                    if keep.numel() == 0:
                        continue
                    z, cols = z[:, keep], cols[keep]
                cand_v = torch.cat([best_v, z], dim=1)
                cand_i = torch.cat([best_i, cols.expand(n, -1)], dim=1)
                k = min(top, cand_v.shape[1])
                best_v, idx = cand_v.topk(k, dim=1, sorted=False)
                best_i = cand_i.gather(1, idx)
            by_id = best_i.argsort(dim=1)
            best_v, best_i = best_v.gather(1, by_id), best_i.gather(1, by_id)
            order = torch.sort(best_v, dim=1, descending=True, stable=True).indices
            best_v, best_i = best_v.gather(1, order), best_i.gather(1, order)
        out = {"lse": lse.cpu().double().numpy(), "top_logits": best_v.cpu().numpy(),
               "top_ids": best_i.cpu().numpy().astype(np.int32)}
        if tgt is not None:
            out["target_logit"] = tgt_logit.cpu().double().numpy()
        return out

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def close(self) -> None:
        self._kept.clear()
        self._pool.clear()
        self._scratch.clear()
        self._head = None
        self.ck.close()


def _kv_sharing_dict():
    """A fresh store for the KV-shared layers' donor keys and values (transformers' own type where it has one)."""
    try:
        from transformers.models.gemma4.modeling_gemma4 import KVSharingDict
    except ImportError:  # pragma: no cover - older layouts of the module
        return {}
    return KVSharingDict(None)
