"""Decoder models for the pooling runner (`--convert embed|classify|reward`), as vLLM's model adapters.

`as_pooling_model(cls, convert, hf_config)` subclasses a decoder architecture: its LM head is dropped (a pooling
model never computes logits over the vocabulary) and, for classify/reward, a `score` head (hidden -> num_labels,
as Transformers' *ForSequenceClassification checkpoints store it) is added. Encoder classes come back unchanged.
"""
from __future__ import annotations

from typing import Iterable

import torch

from pageport.models.bert import SequenceScoreHead


def as_pooling_model(cls: type, convert: str, hf_config) -> type:
    if getattr(cls, "is_encoder", False):
        return cls
    with_score = convert in ("classify", "reward")

    class PoolingDecoder(cls):
        is_encoder = False
        default_pooling_type = "LAST"  # causal attention: the last token has seen the whole prompt

        def __init__(self, hf_config, platform, dtype: torch.dtype):
            super().__init__(hf_config, platform, dtype)
            self.lm_head = None
            self.hidden_size = hf_config.hidden_size
            self.num_labels = int(getattr(hf_config, "num_labels", 2)) if with_score else 0
            self.score_head = (SequenceScoreHead(hf_config.hidden_size, self.num_labels, platform.device, dtype)
                               if with_score else None)

        def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("a pooling model computes no token logits")

        def classify(self, hidden: torch.Tensor) -> torch.Tensor:
            if self.score_head is None:
                raise ValueError("this model has no classification head (start it with --convert classify)")
            return self.score_head(hidden)

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            score = []

            def body():
                for name, w in weights:
                    if name == "score.weight":
                        score.append(w)
                    elif name != "lm_head.weight":
                        yield name, w

            # the head is not the decoder's: load it apart, so the decoder's own check sees only its weights
            head, self.score_head = self.score_head, None
            try:
                loaded = super().load_weights(body())
            finally:
                self.score_head = head
            if head is not None:
                if not score:
                    raise ValueError(f"--convert {convert} needs a classification head (`score.weight`, as in "
                                     f"*ForSequenceClassification checkpoints); this checkpoint has none")
                head.score.weight_loader(head.score.weight, score[0])
                loaded.add("score_head.score.weight")
            return loaded

    PoolingDecoder.__name__ = PoolingDecoder.__qualname__ = f"{cls.__name__}ForPooling"
    return PoolingDecoder
