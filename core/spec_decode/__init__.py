"""Speculative decoding: proposers (n-gram prompt lookup, `ngram.py`; a draft model, `draft.py`; an EAGLE head,
`eagle.py`), the rejection
sampler that verifies their proposals against the target model in one ragged step (`rejection.py`), and the switch
that turns speculation off while it does not pay (`switch.py`)."""
from pageport.core.spec_decode.config import SpeculativeConfig
from pageport.core.spec_decode.ngram import NgramProposer

__all__ = ["SpeculativeConfig", "NgramProposer"]
