"""llama.cpp's multimodal library (mtmd) as the runtime for the projector GGUF, through llama-cpp-python's
`llama_cpp.mtmd_cpp`: the text GGUF and its mmproj loaded as llama.cpp's apps load them.

It gives the image and audio embeddings clip.cpp computes (mtmd_encode_chunk, then mtmd_get_output_embd), and a
greedy generation from a prompt holding media: mtmd tokenizes the prompt (the media marker becomes llama.cpp's own
`<|image>` ... `<image|>` chunk), the text chunks run through llama.cpp and the media chunks through
mtmd_helper_eval_chunk_single, then tokens are chosen by argmax as the text validation does. `placeholder_ids` gives
the same prompt as token ids with the model's image / audio token in each media position: the ids transformers is
given for the comparison.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .. import llama_log
from ..errors import Gemma4ExportError
from .llamacpp import LlamaCppRunner


class MtmdRunner:
    name = "llama.cpp mtmd"

    def __init__(self, text_gguf: str | Path, mmproj: str | Path, n_ctx: int = 1024, device: str = "cpu",
                 threads: int | None = None, image_id: int = -1, audio_id: int = -1):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._m = mtmd_cpp
        self._image_id, self._audio_id = image_id, audio_id
        self._llama_cpp = llama_cpp
        self.text = LlamaCppRunner(text_gguf, n_ctx, device, threads=threads)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = self.text.device == "gpu"
        params.print_timings = False
        params.warmup = False
        if threads:
            params.n_threads = threads
        llama_log.capture_mtmd()
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self.text.llm.model, params)
        if not self.ctx:
            self.text.close()
            raise Gemma4ExportError(f"llama.cpp's mtmd could not load {mmproj} with {text_gguf}\n{llama_log.recent()}")
        from ..targets.gguf_file import read_gguf

        # which of validate.towers.TOWER_LIMITS applies: the projector's matrices quantized or not
        self.limits = "q8_0" if read_gguf(mmproj, arrays=False).metadata.get("general.file_type") == 7 else "float"
        self.vision = bool(mtmd_cpp.mtmd_support_vision(self.ctx))
        self.audio = bool(mtmd_cpp.mtmd_support_audio(self.ctx))
        self.marker = (mtmd_cpp.mtmd_default_marker() or b"<__media__>").decode()
        self.n_embd = self.text.llm.n_embd()

    def describe(self) -> dict:
        return {"runtime": f"llama.cpp mtmd (llama-cpp-python {self._llama_cpp.__version__})",
                "device": self.text.device, "vision": self.vision, "audio": self.audio}

    # ---- media -------------------------------------------------------------------------------------------------

    def _bitmap(self, media: np.ndarray):
        m = self._m
        if media.ndim == 3:  # an RGB image, uint8 [H, W, 3]
            h, w, _ = media.shape
            data = np.ascontiguousarray(media, dtype=np.uint8)
            bmp = m.mtmd_bitmap_init(w, h, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        else:  # mono PCM, float32 at the projector's sample rate
            data = np.ascontiguousarray(media, dtype=np.float32)
            bmp = m.mtmd_bitmap_init_from_audio(data.size, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        if not bmp:
            raise Gemma4ExportError("mtmd could not make a bitmap of this input")
        return bmp

    def _tokenize(self, text: str, media: list[np.ndarray]):
        m = self._m
        bitmaps = [self._bitmap(x) for x in media]
        chunks = m.mtmd_input_chunks_init()
        try:
            inp = m.mtmd_input_text()
            raw = text.encode("utf-8")
            inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), False, True
            arr = (m.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                m.mtmd_input_chunks_free(chunks)
                raise Gemma4ExportError(f"mtmd could not tokenize the prompt (error {rc}): {llama_log.recent()}")
        finally:
            for b in bitmaps:
                m.mtmd_bitmap_free(b)
        return chunks

    def _chunks(self, chunks):
        """(type, text tokens or None, chunk) for each chunk."""
        m = self._m
        for i in range(m.mtmd_input_chunks_size(chunks)):
            c = m.mtmd_input_chunks_get(chunks, i)
            kind = m.mtmd_input_chunk_get_type(c)
            if kind == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = m.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                yield "text", [int(ptr[j]) for j in range(n.value)], c
            else:
                yield ("image" if kind == m.MTMD_INPUT_CHUNK_TYPE_IMAGE else "audio"), None, c

    def embeddings(self, media: np.ndarray) -> np.ndarray:
        """[tokens, text width] float32: what the projector gives the text model for one image or clip."""
        m = self._m
        chunks = self._tokenize(self.marker, [media])
        parts = []
        try:  # every media chunk, in order (mtmd may cut a long clip into several)
            for kind, _, c in self._chunks(chunks):
                if kind == "text":
                    continue
                n = m.mtmd_input_chunk_get_n_tokens(c)
                if m.mtmd_encode_chunk(self.ctx, c) != 0:
                    raise Gemma4ExportError(f"mtmd could not encode the {kind}: {llama_log.recent()}")
                out = m.mtmd_get_output_embd(self.ctx)
                parts.append(np.ctypeslib.as_array(out, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy())
        finally:
            m.mtmd_input_chunks_free(chunks)
        if not parts:
            raise Gemma4ExportError("mtmd made no media chunk of this input")
        return np.concatenate(parts)

    def placeholder_ids(self, text: str, media: list[np.ndarray], image_id: int, audio_id: int) -> list[int]:
        """The prompt as mtmd tokenizes it, each media position holding the model's image or audio token id."""
        chunks = self._tokenize(text, media)
        try:
            ids: list[int] = []
            for kind, toks, c in self._chunks(chunks):
                if kind == "text":
                    ids += toks
                else:
                    ids += [image_id if kind == "image" else audio_id] * self._m.mtmd_input_chunk_get_n_tokens(c)
            return ids
        finally:
            self._m.mtmd_input_chunks_free(chunks)

    def greedy(self, text: str, media: list[np.ndarray], n: int) -> list[int]:
        """n tokens chosen by argmax after the prompt `text` (one marker per item of `media`)."""
        m, lc, llm = self._m, self._llama_cpp, self.text.llm
        chunks = self._tokenize(text, media)
        try:
            llm.reset()
            llm._ctx.kv_cache_clear()
            for kind, toks, c in self._chunks(chunks):
                if kind == "text":
                    llm.eval(toks)
                    continue
                new_past = lc.llama_pos(0)
                rc = m.mtmd_helper_eval_chunk_single(self.ctx, llm._ctx.ctx, c, lc.llama_pos(llm.n_tokens),
                                                     lc.llama_seq_id(0), llm.n_batch, False, ctypes.byref(new_past))
                if rc != 0:
                    raise Gemma4ExportError(f"mtmd could not evaluate the {kind} (error {rc}): {llama_log.recent()}")
                llm.n_tokens = new_past.value
        finally:
            m.mtmd_input_chunks_free(chunks)
        out: list[int] = []
        while len(out) < n:
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            if len(out) < n:
                llm.eval([nxt])
        return out

    # the interface of validate.towers.tower_checks
    def media_prompt(self, kind: str, media: np.ndarray) -> list[int]:
        from .towers import MEDIA_PROMPT

        return self.placeholder_ids(MEDIA_PROMPT.format(media=self.marker), [media], self._image_id, self._audio_id)

    def media_greedy(self, kind: str, media: np.ndarray, n: int) -> list[int]:
        from .towers import MEDIA_PROMPT

        return self.greedy(MEDIA_PROMPT.format(media=self.marker), [media], n)

    def close(self) -> None:
        if self.ctx:
            self._m.mtmd_free(self.ctx)
            self.ctx = None
        self.text.close()
