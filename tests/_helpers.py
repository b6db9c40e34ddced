"""Test instruments that observe what really ran, independently of the engine's statistics."""

from __future__ import annotations

from collections import defaultdict

from xslim_xdit.adapters import adapter_for


class AttentionCounter:
    """Counts, per transformer call, the self-attention calls (one per block that really computed)
    and the image-token query rows each received, with forward pre-hooks on the attention modules."""

    def __init__(self, model, text_len: int = 0):
        self.adapter = adapter_for(model)
        self.calls: list[list[tuple[int, int]]] = []  # per transformer call: (block, image query rows)
        self.handles = [model.register_forward_pre_hook(self._new_call)]
        g = 0
        for stack in self.adapter.stacks(model):
            for blk in stack.blocks:
                attn = self.adapter.self_attention(blk)
                sub = text_len if stack.attn_text_position == "first" else 0
                self.handles.append(attn.register_forward_pre_hook(self._hook(g, sub), with_kwargs=True))
                g += 1
        self.num_blocks = g

    def _new_call(self, *_):
        self.calls.append([])

    def _hook(self, g, sub):
        def hook(_mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            self.calls[-1].append((g, h.shape[1] - sub))

        return hook

    def blocks_per_call(self):
        return [len(c) for c in self.calls]

    def rows_per_call(self):
        return [sum(r for _, r in c) for c in self.calls]

    def per_block(self, i):
        d = defaultdict(int)
        for g, r in self.calls[i]:
            d[g] += r
        return d

    def remove(self):
        for h in self.handles:
            h.remove()
