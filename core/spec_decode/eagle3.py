"""EAGLE-3 proposals (models/eagle3.py): the EAGLE proposer (core/spec_decode/eagle.py) with another input.

The head reads, in place of the target's final hidden state at p, the inputs of three of the target's layers at
p, fused by its `fc`. Forward pre-hooks on those layers keep them during the target's pass, for the token rows
`mark` picked just before it (the rows the head follows; none while the speculation switch is off, so other
rows cost an index check per hooked layer); `stash` fuses them after the pass and keeps the result on the request
as EAGLE keeps the final state, so the head's own rounds are EAGLE's: round 0 reads the fused states, later
rounds the head's own pre-norm output.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

from pageport.core.spec_decode.eagle import EagleProposer


class Eagle3Proposer(EagleProposer):
    kind = "EAGLE-3"

    def _make_head(self, hf, weights: dict, platform, config, target) -> torch.nn.Module:
        from pageport.models.eagle3 import Eagle3LlamaForCausalLM, aux_layer_ids

        layers = getattr(getattr(target, "model", None), "layers", None)
        if layers is None:
            raise ValueError("speculative_config: an EAGLE-3 head needs a Llama-family target (its decoder layers "
                             "under model.layers)")
        self.layer_ids = aux_layer_ids(hf, len(layers))
        own = any(n.removeprefix("model.") == "embed_tokens.weight" for n in weights)
        # positions up to the engine's longest sequence and its proposals, whatever the head's config says
        model = Eagle3LlamaForCausalLM(hf, platform, config.dtype, own_embedding=own,
                                       max_positions=config.max_model_len + self.k)
        model.share(target)
        model.load_weights(weights.items())
        self._rows: Optional[list[int]] = None  # the scheduled rows whose states the pass keeps
        self._tokens: Optional[torch.Tensor] = None  # their token rows in the pass, on the device
        self._aux: dict[int, torch.Tensor] = {}  # layer id -> its input at those tokens
        for j in sorted(set(self.layer_ids)):
            layers[j].register_forward_pre_hook(functools.partial(self._capture, j))
        return model

    def _capture(self, j: int, layer, args) -> None:
        """Pre-hook of target layer j, called (positions, hidden, residual, ...): the layer's input stream is
        hidden + residual (the embedding alone before the first layer)."""
        t = self._tokens
        if t is None:
            return
        hidden, residual = args[1], args[2]
        self._aux[j] = hidden[t] if residual is None else hidden[t] + residual[t]

    def mark(self, scheduled, qsl) -> bool:
        """Before a target pass (the runner's aux_hook): pick the followed rows; True if there are any."""
        self._rows = self._tokens = None
        self._aux = {}
        if not self.active():
            return False
        rows = [i for i, s in enumerate(scheduled) if s.spec_token_ids or self.follows(s.request)]
        if not rows:
            return False
        tokens = np.concatenate([np.arange(qsl[i], qsl[i] + scheduled[i].num_tokens) for i in rows])
        self._rows, self._tokens = rows, torch.from_numpy(tokens).to(self.device)
        return True

    def stash(self, hidden: torch.Tensor, scheduled, qsl) -> None:
        """After the pass: fuse the kept layer inputs and keep them on each marked row's request."""
        rows, aux = self._rows, self._aux
        self._rows, self._tokens, self._aux = None, None, {}
        if rows is None:
            return
        if len(aux) != len(set(self.layer_ids)):
            raise RuntimeError(f"EAGLE-3: the target's pass ran without the hooks of layers {list(self.layer_ids)}")
        fused = self.model.combine(torch.cat([aux[j] for j in self.layer_ids], dim=-1))
        o = 0
        for i in rows:
            n = scheduled[i].num_tokens
            self._keep(scheduled[i].request, fused[o:o + n])
            o += n
