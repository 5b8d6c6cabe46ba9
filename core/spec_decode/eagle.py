"""EAGLE proposals: a draft head that reads the target's hidden states (models/eagle.py).

The head's KV shares the target's block pool as a draft model's does (core/spec_decode/draft.py). Its input at
position p is (token p + 1, the target's hidden state at p), so it runs one step behind the target: every target
pass keeps the hidden states of the rows the head follows on their request (`stash`, called by the runner after
the forward pass), and the next step's round 0 feeds them, from the first position the head has not read up to
the last one the target computed, whose output proposes the token after the newest. Rounds 1 .. k-1 feed the
last proposal with the head's own output in place of the target's state. The head's KV for those positions is
rewritten from the target's states in the next step (`num_draft_computed` stays at the target's count).
Positions whose states were never kept (a prefix-cache hit, steps while the speculation switch was off) are
skipped: proposals may suffer, the output not.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np
import torch

from pageport.core.spec_decode.draft import DraftProposer

logger = logging.getLogger(__name__)


class EagleProposer(DraftProposer):
    kind = "EAGLE"

    def __init__(self, config, platform, spec: dict, target: torch.nn.Module, follows: Callable,
                 active: Callable[[], bool] = lambda: True):
        import transformers

        from pageport.core.model_runner import ModelRunner
        from pageport.models.eagle import read_eagle_weights
        from pageport.models.loader import resolve_model_path

        self.k = spec["num_speculative_tokens"]
        folder = resolve_model_path(spec["model"])
        hf = transformers.AutoConfig.from_pretrained(folder)
        self.device = platform.device
        self.model = self._make_head(hf, read_eagle_weights(folder), platform, config, target)
        self.model.eval()
        # its own pass takes the target's states: no decode graphs of its own
        dcfg = dataclasses.replace(config, model=str(folder), quantization=None, speculative_config=None,
                                   enable_lora=False, tokenizer=None, enforce_eager=True)
        self.runner = ModelRunner(dcfg, platform, self.model)
        self.block_size = config.block_size
        self.max_tokens = config.max_num_batched_tokens
        self.vocab_size = target.config.vocab_size
        self.follows = follows
        self.active = active  # speculation on: while the switch keeps it off nothing is kept (nothing reads it)
        logger.info("speculative decoding: %s head %s (%d layer(s)), %d tokens a step", self.kind, folder,
                    hf.num_hidden_layers, self.k)

    def _make_head(self, hf, weights: dict, platform, config, target) -> torch.nn.Module:
        from pageport.models.eagle import EagleLlamaForCausalLM

        hf.eagle_fc_bias = any(n.removeprefix("model.") == "fc.bias" for n in weights)
        model = EagleLlamaForCausalLM(hf, platform, config.dtype)
        model.share(target)
        model.load_weights(weights.items())
        return model

    def check_vocab(self, target_hf_config, target_tokenizer) -> None:
        pass  # the head writes in the target's token ids (its share() checked them)

    def stash(self, hidden: torch.Tensor, scheduled, qsl) -> None:
        """After a target pass: keep each followed row's hidden states, at positions num_computed_tokens on
        (what a verify turns down is cut when the next pass appends at the accepted count)."""
        if not self.active():
            return
        for i, s in enumerate(scheduled):
            if s.spec_token_ids or self.follows(s.request):
                self._keep(s.request, hidden[int(qsl[i]):int(qsl[i]) + s.num_tokens])

    @staticmethod
    def _keep(r, h: torch.Tensor) -> None:
        """Append a pass's states h of request r (at its positions num_computed_tokens on) to what it keeps."""
        p0, old = r.num_computed_tokens, r.eagle_hidden
        if old is not None and old[0] <= p0 <= old[0] + len(old[1]):
            r.eagle_hidden = (old[0], torch.cat([old[1][:p0 - old[0]], h]))
        else:
            r.eagle_hidden = (p0, h.clone())  # graph outputs are rewritten by the next replay

    @torch.inference_mode()
    def run(self, sched, kv, follows: Callable) -> None:
        bs = self.block_size
        rows, feats, tables = [], [], []  # (request, start, end, proposals, scheduled entry)
        left = self.max_tokens
        for s in sched.scheduled:
            r = s.request
            if not (s.spec_token_ids or follows(r)) or r.eagle_hidden is None:
                if s.spec_token_ids:
                    s.num_tokens, s.spec_token_ids = 1, []
                continue
            h0, h = r.eagle_hidden
            c = r.num_computed_tokens  # the target's states are kept below c
            start = max(r.num_draft_computed, h0)
            end = min(c, h0 + len(h), start + left)
            m = len(s.spec_token_ids) if end == c else 0
            if s.spec_token_ids and not m:  # still catching up: decodes plainly this step
                s.num_tokens, s.spec_token_ids = 1, []
            if start >= end:
                continue
            left -= end - start
            rows.append((r, start, end, m, s))
            feats.append(h[start - h0:end - h0])
            tables.append(np.asarray(kv.block_ids(r), dtype=np.int64))
        if not rows:
            return
        ids, pos, slots, lens = [], [], [], []
        for (r, start, end, _, _), table in zip(rows, tables):
            q = np.arange(start, end)
            ids += r.token_ids[start + 1:end + 1]
            pos.append(q)
            slots.append(table[q // bs] * bs + q % bs)
            lens.append(end - start)
        proposing = [i for i, row in enumerate(rows) if row[3]]
        last = np.cumsum(lens) - 1
        g = self._pass(ids, np.concatenate(pos), np.concatenate(slots), lens, [end for _, _, end, _, _ in rows],
                       tables, last[proposing] if proposing else None, torch.cat(feats))
        for r, _, end, _, _ in rows:
            r.num_draft_computed = end
            h0, h = r.eagle_hidden
            r.eagle_hidden = (end, h[end - h0:])  # read: only what the head has not seen stays
        if not proposing:
            return
        rows = [rows[i] for i in proposing]
        tables = [tables[i] for i in proposing]
        k = max(row[3] for row in rows)
        drafts = torch.zeros(len(rows), k, dtype=torch.long, device=self.device)
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        live = list(range(len(rows)))
        for i in range(k):
            toks = self._draw(self._logits(g), [rows[j][0] for j in live], [probs[j] for j in live])
            drafts[live, i] = toks
            keep = [n for n, j in enumerate(live) if rows[j][3] > i + 1]
            if len(keep) != len(live):
                live = [live[n] for n in keep]
                toks, g = toks[keep], g[keep]
            if not live or i + 1 == k:
                break
            # round i + 1: proposal i + 1 (at position c + i) with the head's own output for position c - 1 + i
            p = np.array([rows[j][2] + i for j in live])
            slots = np.array([tables[j][q // bs] * bs + q % bs for j, q in zip(live, p)])
            g = self._pass(toks, p, slots, [1] * len(live), (p + 1).tolist(), [tables[j] for j in live],
                           np.arange(len(live)), g)
        for (r, _, _, m, s), d, q in zip(rows, drafts.tolist(), probs):
            s.spec_token_ids[:] = d[:m]
            r.spec_probs = torch.stack(q) if q else None
