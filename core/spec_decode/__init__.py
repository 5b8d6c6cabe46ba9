"""Speculative decoding: proposers (n-gram prompt lookup) and the rejection sampler that verifies their
proposals against the target model in one ragged step."""
from pageport.core.spec_decode.config import SpeculativeConfig
from pageport.core.spec_decode.ngram import NgramProposer

__all__ = ["SpeculativeConfig", "NgramProposer"]
