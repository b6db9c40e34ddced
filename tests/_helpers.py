"""Test instruments that observe what really ran, independently of the engine's statistics."""

from __future__ import annotations

import inspect
from collections import defaultdict

from xslim_xdit.adapters import adapter_for


class AttentionCounter:
    """Counts, per transformer call, the self-attention calls (one per block that really computed)
    and the image-token query rows each received, with forward pre-hooks on the attention modules.

    Where a block's self-attention sees the text rows inside its ``hidden_states`` (FLUX's
    single-stream blocks), the text rows of that block call (read from the block's text stream by
    a pre-hook on the block) are not counted."""

    def __init__(self, model):
        self.adapter = adapter_for(model)
        self.calls: list[list[tuple[int, int]]] = []  # per transformer call: (block, image query rows)
        self.handles = [model.register_forward_pre_hook(self._new_call)]
        self._text_rows = 0  # text rows of the block call in progress
        g = 0
        for stack in self.adapter.stacks(model):
            for blk in stack.blocks:
                sig = inspect.signature(blk.forward)
                self.handles.append(
                    blk.register_forward_pre_hook(self._block_hook(stack, sig), with_kwargs=True)
                )
                attn = self.adapter.self_attention(blk)
                text_inside = stack.attn_text_position != "none"
                self.handles.append(
                    attn.register_forward_pre_hook(self._hook(g, text_inside), with_kwargs=True)
                )
                g += 1
        self.num_blocks = g

    def _new_call(self, *_):
        self.calls.append([])

    def _block_hook(self, stack, sig):
        def hook(_mod, args, kwargs):
            txt = self.adapter.parse_call(stack, sig, args, kwargs).txt
            self._text_rows = 0 if txt is None else txt.shape[1]

        return hook

    def _hook(self, g, text_inside):
        def hook(_mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            separate_text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            sub = self._text_rows if text_inside and separate_text is None else 0
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
