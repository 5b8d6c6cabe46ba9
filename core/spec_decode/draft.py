"""Draft-model proposals: a smaller model with the target's vocabulary proposes each request's next k tokens.

The draft shares the target's block pool: its KV cache has as many blocks as the target's and a request's block
table indexes both, so the scheduler's allocation (a request's tokens plus its proposals) covers the draft's
writes too and nothing more is bookkept. `Request.num_draft_computed` counts the tokens whose draft KV is
written; it never runs ahead of the target's (a verify cuts it back to the accepted tokens, a preemption to 0),
so KV written for proposals the target turned down is rewritten later, as the target's is.

The core gives each request it speculates for a row of placeholder proposals when it schedules the step; the
draft fills them in just before the target's forward pass:

- round 0: every prefilling row's new chunk (so the draft keeps pace with the prompt) and every proposing row's
  tokens the draft has not seen (one or two after a verify); the proposing rows take d_1 from the last one;
- rounds 1 .. k-1: each proposing row's last proposal in, the next one out.

Greedy rows take the draft's argmax. Sampled rows draw from the draft's distribution under their own sampling
parameters and keep it (q, on the request) for the rejection sampler, which then keeps the target's
distribution exactly.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import numpy as np
import torch

from pageport.core.sampler import random_sample
from pageport.core.spec_decode.rejection import processed_probs

logger = logging.getLogger(__name__)


class DraftProposer:
    def __init__(self, config, platform, spec: dict):
        from pageport.core.model_runner import ModelRunner
        from pageport.models import load_model

        self.k = spec["num_speculative_tokens"]
        # the draft's own engine options: its checkpoint and format, no adapters, no speculation of its own
        dcfg = dataclasses.replace(config, model=spec["model"], quantization=spec.get("quantization"),
                                   speculative_config=None, enable_lora=False, tokenizer=None)
        self.loaded = load_model(dcfg, platform)
        self.runner = ModelRunner(dcfg, platform, self.loaded.model)
        self.model = self.loaded.model
        self.device = platform.device
        self.block_size = config.block_size
        self.max_tokens = config.max_num_batched_tokens  # the most tokens one draft pass reads (a long catch-up waits)
        self.vocab_size: Optional[int] = None  # the target's, set by the core: draft logits are cut or padded to it
        logger.info("speculative decoding: draft model %s (%s), %d tokens a step", self.loaded.source,
                    spec.get("quantization") or self.loaded.load_format, self.k)

    def check_vocab(self, target_hf_config, target_tokenizer) -> None:
        """The draft must spell tokens as the target does: the same tokenizer vocabulary (sizes may differ by
        padding rows)."""
        dt, tt = self.loaded.tokenizer, target_tokenizer
        if dt is not None and tt is not None and len(dt) != len(tt):
            raise ValueError(f"speculative_config: the draft model's tokenizer has {len(dt)} tokens, the target's "
                             f"{len(tt)}: a draft must share the target's vocabulary")
        self.vocab_size = target_hf_config.vocab_size

    # one step -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, sched, kv, follows: Callable) -> None:
        """Fill the placeholder proposals of the step's speculating rows (`s.spec_token_ids`, in place); `follows`
        (request -> bool) says which other rows' tokens the draft reads along (those it may later propose for).
        A row further behind than one pass reads (a prefix-cache hit, speculation back on after a pause) catches
        up over several steps and decodes plainly meanwhile."""
        bs = self.block_size
        tables: list[np.ndarray] = []
        rows = []  # (request, first token to feed, end, proposals to make, scheduled entry)
        left = self.max_tokens
        for s in sched.scheduled:
            r = s.request
            if s.spec_token_ids:
                end, m = len(r.token_ids), len(s.spec_token_ids)
            elif follows(r):
                end, m = min(r.num_computed_tokens + s.num_tokens, len(r.token_ids)), 0
            else:
                continue
            start = r.num_draft_computed
            if end - start > left:  # read what fits; no proposals this step
                end, m = start + left, 0
                if s.spec_token_ids:
                    s.num_tokens, s.spec_token_ids = 1, []
            if start >= end:
                continue
            left -= end - start
            rows.append((r, start, end, m, s))
            tables.append(np.asarray(kv.block_ids(r), dtype=np.int64))
        if not rows:
            return
        proposing = [i for i, row in enumerate(rows) if row[3]]
        lens = [end - start for _, start, end, _, _ in rows]
        if self.runner.graphs is not None and len(proposing) == len(rows) and max(lens) <= 2:
            # round 0 in one-token passes, which replay the decode graphs (the usual step: one or two new tokens)
            two = [i for i, n in enumerate(lens) if n == 2]
            if two:
                p = np.array([rows[i][1] for i in two])
                self._forward([rows[i][0].token_ids[rows[i][1]] for i in two], p,
                              [tables[i][q // bs] * bs + q % bs for i, q in zip(two, p)], [1] * len(two),
                              (p + 1).tolist(), [tables[i] for i in two], None)
            p = np.array([end - 1 for _, _, end, _, _ in rows])
            logits = self._forward([r.token_ids[-1] for r, *_ in rows], p,
                                   [t[q // bs] * bs + q % bs for t, q in zip(tables, p)], [1] * len(rows),
                                   (p + 1).tolist(), tables, np.arange(len(rows)))
        else:  # round 0: the unseen tokens of every row, ragged
            ids, pos, slots = [], [], []
            for (r, start, end, _, _), table in zip(rows, tables):
                q = np.arange(start, end)
                ids += r.token_ids[start:end]
                pos.append(q)
                slots.append(table[q // bs] * bs + q % bs)
            last = np.cumsum(lens) - 1
            logits = self._forward(ids, np.concatenate(pos), np.concatenate(slots), lens,
                                   [end for _, _, end, _, _ in rows], tables, last[proposing] if proposing else None)
        for (r, _, end, m, _) in rows:
            r.num_draft_computed = end + m - 1 if m else end
        if not proposing:
            return
        rows = [rows[i] for i in proposing]
        tables = [tables[i] for i in proposing]
        k = max(row[3] for row in rows)
        drafts = torch.zeros(len(rows), k, dtype=torch.long, device=self.device)  # read on the host once, at the end
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        live = list(range(len(rows)))
        for i in range(k):
            toks = self._draw(logits, [rows[j][0] for j in live], [probs[j] for j in live])
            drafts[live, i] = toks
            keep = [n for n, j in enumerate(live) if rows[j][3] > i + 1]  # rows with more proposals to make
            if len(keep) != len(live):
                live = [live[n] for n in keep]
                toks = toks[keep]
            if not live or i + 1 == k:
                break
            # round i + 1: the proposal just made goes in at position end - 1 + (i + 1)
            p = np.array([rows[j][2] + i for j in live])
            slots = np.array([tables[j][q // bs] * bs + q % bs for j, q in zip(live, p)])
            logits = self._forward(toks, p, slots, [1] * len(live), (p + 1).tolist(), [tables[j] for j in live],
                                   np.arange(len(live)))
        for (r, _, _, m, s), d, q in zip(rows, drafts.tolist(), probs):
            s.spec_token_ids[:] = d[:m]
            r.spec_probs = torch.stack(q) if q else None

    def _forward(self, ids, pos, slots, qlens, seq_lens, tables, logit_rows) -> Optional[torch.Tensor]:
        """One ragged forward pass of the draft; float32 logits of `logit_rows` (None: no logits), cut or padded
        to the target's vocabulary."""
        hidden = self._pass(ids, pos, slots, qlens, seq_lens, tables, logit_rows)
        return None if hidden is None else self._logits(hidden)

    def _pass(self, ids, pos, slots, qlens, seq_lens, tables, logit_rows, features=None) -> Optional[torch.Tensor]:
        """The pass itself: the hidden states of `logit_rows` (None: none). Its integer inputs go to the device
        in one copy; `features`: the rows' input features (an EAGLE head's)."""
        dev, bs = self.device, self.block_size
        n_tok, n_rows = len(pos), len(qlens)
        width = max(-(-n // bs) for n in seq_lens)
        table = np.zeros((n_rows, width), dtype=np.int64)
        for i, t in enumerate(tables):
            n = min(len(t), width)
            table[i, :n] = t[:n]
        qsl = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(qlens, out=qsl[1:])
        host_ids = not isinstance(ids, torch.Tensor)
        parts = [pos, slots, seq_lens, qsl, table.ravel()]
        parts += ([ids] if host_ids else []) + ([logit_rows] if logit_rows is not None else [])
        buf = torch.from_numpy(np.concatenate([np.asarray(x, dtype=np.int64).ravel() for x in parts]))
        if self.runner.async_copies:
            buf = buf.pin_memory().to(dev, non_blocking=True)
        views, o = [], 0
        for x in parts:
            n = np.size(x)
            views.append(buf[o:o + n])
            o += n
        positions, slot_mapping = views[0], views[1]
        from pageport.platforms import AttentionMetadata
        md = AttentionMetadata(
            num_actual_tokens=n_tok, query_start_loc=views[3].to(torch.int32),
            seq_lens=views[2].to(torch.int32), block_table=views[4].view(n_rows, width).to(torch.int32),
            slot_mapping=slot_mapping, max_query_len=max(qlens), max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=list(seq_lens), block_size=bs)
        m = self.model
        if host_ids:
            ids = views[5]
        graphs = self.runner.graphs  # the platform's decode graphs (passes of one token a row)
        hidden = graphs.run(ids, positions, md) if graphs is not None else None
        if hidden is None:
            extra = () if features is None else (features,)
            hidden = m(ids, positions, self.runner.kv_caches, m.attn_backend.build_metadata(md), *extra)
        if logit_rows is None:
            return None
        return hidden[views[-1]] if len(logit_rows) != hidden.shape[0] else hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.compute_logits(hidden).float()
        v = self.vocab_size or logits.shape[-1]
        if logits.shape[-1] > v:
            logits = logits[:, :v]
        elif logits.shape[-1] < v:  # tokens the draft cannot produce
            logits = torch.nn.functional.pad(logits, (0, v - logits.shape[-1]), value=float("-inf"))
        return logits

    def _draw(self, logits, reqs, probs) -> torch.Tensor:
        """Each row's next proposal, on the device: the argmax for greedy requests, else a draw from the draft's
        distribution under the request's sampling parameters (kept for the rejection sampler)."""
        toks = logits.argmax(dim=-1)
        sampled = [j for j, r in enumerate(reqs) if not r.params.greedy]
        if sampled:
            q = processed_probs(logits[torch.tensor(sampled, device=logits.device)], [reqs[j].params for j in sampled])
            gens = {}
            for n, j in enumerate(sampled):
                r = reqs[j]
                if r.params.seed is not None:  # its own stream: the target's draws stay as without a draft
                    if r.draft_generator is None:
                        r.draft_generator = torch.Generator(device=logits.device)
                        r.draft_generator.manual_seed((r.params.seed + 1) % 2**63)
                    gens[n] = r.draft_generator
            toks[sampled] = random_sample(q, gens)
            for n, j in enumerate(sampled):
                probs[j].append(q[n])
        return toks
