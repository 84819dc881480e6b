"""Weights read from the checkpoint while their module runs, for the streamed model (validate/streamed.py).

The streamed model loads one decoder layer at a time in float32, but some single layers are large: 26B-A4B's MoE
layer holds 128 experts (3.1 GB), 31B's dense layer 2.1 GB (its MLP 1.4 GB), 12B's 1.0 GB. The modules here take
the place of transformers' module in such a layer and hold none of its weights between calls: each call reads the
weights it needs from the checkpoint (the page cache, after the first sequence) into reused float32 buffers (the
staging buffer of those reads is let go when the layer has run over every sequence).

- StreamedExperts, for a MoE layer's experts: for each expert the tokens were routed to, it reads that expert's rows
  of both 3-D tensors (24 MB for 26B-A4B), runs its tokens and moves on. The arithmetic is that of transformers'
  grouped_mm experts forward, expert by expert: the (token, slot) pairs sorted by expert, each expert's rows through
  its gate-up projection, the gate, its down projection, then weighted by the router and summed over each token's
  slots in slot order. Calibration watches each expert's inputs through `watch` (the inputs of its gate-up
  projection, its tokens in token order, and of its down projection, the gated activations) without a second read.
- StreamedLinear, for a large bias-free linear layer: its weight's rows in blocks of at most BLOCK_BYTES, each block
  giving its own output columns. Every output is still one dot product over the whole input, as in the whole
  matrix product.

Both give bitwise what transformers' modules give with the weights loaded (tested, at the tiny and the published
widths).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


# Float32 bytes of weight rows a StreamedLinear reads and multiplies at a time.
BLOCK_BYTES = 16 << 20


class StreamedLinear(torch.nn.Module):
    def __init__(self, model, like: torch.nn.Module, name: str):
        """`model`: the StreamedModel whose checkpoint holds `name`, the weight [out, in] of `like` (a bias-free
        nn.Linear, replaced by this module)."""
        super().__init__()
        if like.bias is not None:
            raise ValueError(f"{name}: a linear layer with a bias is not streamed")
        self._model = model
        self.in_features, self.out_features = like.in_features, like.out_features
        self.weight_name = name
        self.rows = max(1, min(self.out_features, BLOCK_BYTES // (4 * self.in_features)))

    @property
    def scratch_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The buffer it reads its weight into: the model's scratch of BLOCK_BYTES, flat, which every streamed linear
        layer of every shape shares (one per shape held 48 MB for 26B-A4B's three)."""
        return ((max(BLOCK_BYTES // 4, self.rows * self.in_features),),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._model
        out = x.new_empty(*x.shape[:-1], self.out_features)
        w = m.scratch(self.scratch_shapes[0])[: self.rows * self.in_features].view(self.rows, self.in_features)
        for r in range(0, self.out_features, self.rows):
            r1 = min(self.out_features, r + self.rows)
            blk = m.read_rows(self.weight_name, r, r1, w[: r1 - r])
            out[..., r:r1] = torch.nn.functional.linear(x, blk)
        return out


class StreamedExperts(torch.nn.Module):
    def __init__(self, model, like: torch.nn.Module, gate_up: str, down: str):
        """`model`: the StreamedModel whose checkpoint holds the tensors `gate_up` [E, 2I, H] and `down` [E, H, I];
        `like`: the transformers experts module it replaces (its sizes and activation)."""
        super().__init__()
        self._model = model  # not a module: no parameters of it are registered here
        self.num_experts = like.num_experts
        self.hidden_dim, self.intermediate_dim = like.hidden_dim, like.intermediate_dim
        self.act_fn = like.act_fn
        self.gate_up_name, self.down_name = gate_up, down
        self.observe = None  # calibration: observe(e, x_e, h_e)

    def watch(self, fn):
        """Calls fn(expert, inputs, down_inputs) for each expert as it runs; returns a handle whose remove() stops
        it, as a forward hook's does."""
        self.observe = fn
        return SimpleNamespace(remove=lambda: setattr(self, "observe", None))

    @property
    def scratch_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The buffers one expert's two matrices are read into."""
        return ((2 * self.intermediate_dim, self.hidden_dim), (self.hidden_dim, self.intermediate_dim))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        m = self._model
        n_tok, k = top_k_index.shape
        two_i, h = 2 * self.intermediate_dim, self.hidden_dim
        ids = top_k_index.reshape(-1)
        ids_g, perm = torch.sort(ids, stable=True)  # each expert's (token, slot) pairs, in token order
        counts = torch.bincount(ids_g, minlength=self.num_experts).tolist()
        weights = top_k_weights.reshape(-1)
        # each pair's weighted output at its own (token, slot) place, where grouped_mm's inverse permutation puts
        # it: no copy of the inputs in expert order, and no permuted copy of the outputs (92 MB each for a
        # 1,024-token chunk of 26B-A4B)
        out = torch.zeros(n_tok * k, h, dtype=hidden_states.dtype, device=hidden_states.device)
        w_gu, w_d = (m.scratch(shape) for shape in self.scratch_shapes)
        start = 0
        for e, c in enumerate(counts[: self.num_experts]):
            if not c:
                continue
            pairs = perm[start:start + c]
            start += c
            m.read_rows(self.gate_up_name, e * two_i, (e + 1) * two_i, w_gu)
            m.read_rows(self.down_name, e * h, (e + 1) * h, w_d)
            x = hidden_states[pairs // k]
            gate, up = torch.mm(x, w_gu.transpose(0, 1)).chunk(2, dim=-1)
            act = self.act_fn(gate) * up
            out[pairs] = torch.mm(act, w_d.transpose(0, 1)) * weights[pairs].unsqueeze(-1)
            if self.observe is not None:
                self.observe(e, x, act)
        return out.view(n_tok, k, h).sum(dim=1).to(hidden_states.dtype)
