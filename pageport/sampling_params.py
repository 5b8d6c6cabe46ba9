"""`from pageport.sampling_params import ...`, where vLLM's scripts import these from."""
from pageport.core.llm import BeamSearchParams
from pageport.core.sampling_params import (GuidedDecodingParams, RequestOutputKind, SamplingParams,
                                           StructuredOutputsParams)

__all__ = ["BeamSearchParams", "GuidedDecodingParams", "RequestOutputKind", "SamplingParams",
           "StructuredOutputsParams"]
