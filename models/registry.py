"""Architecture name (config.architectures[i]) -> model class: built-ins plus plugin models."""
from __future__ import annotations

import importlib
import logging
from typing import Sequence, Union

logger = logging.getLogger(__name__)

# Imported on first use, so listing architectures costs nothing.
_BUILTIN: dict[str, str] = {
    "LlamaForCausalLM": "pageport.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "pageport.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "pageport.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "pageport.models.llama:LlamaForCausalLM",
    "Phi3ForCausalLM": "pageport.models.llama:LlamaForCausalLM",
    "MixtralForCausalLM": "pageport.models.llama:LlamaForCausalLM",
    "Qwen2MoeForCausalLM": "pageport.models.llama:LlamaForCausalLM",
    "Qwen3MoeForCausalLM": "pageport.models.llama:LlamaForCausalLM",
    "Gemma2ForCausalLM": "pageport.models.gemma:GemmaForCausalLM",
    "Gemma3ForCausalLM": "pageport.models.gemma:GemmaForCausalLM",
    "DeepseekV2ForCausalLM": "pageport.models.deepseek:DeepseekForCausalLM",
    "DeepseekV3ForCausalLM": "pageport.models.deepseek:DeepseekForCausalLM",
    # encoders, for the pooling runner
    "BertModel": "pageport.models.bert:BertModel",
    "BertForSequenceClassification": "pageport.models.bert:BertForSequenceClassification",
    "RobertaModel": "pageport.models.bert:RobertaModel",
    "RobertaForSequenceClassification": "pageport.models.bert:RobertaForSequenceClassification",
    "XLMRobertaModel": "pageport.models.bert:RobertaModel",
    "XLMRobertaForSequenceClassification": "pageport.models.bert:RobertaForSequenceClassification",
    # decoders with a classification head (`score`): the Llama family under --runner pooling
    "LlamaForSequenceClassification": "pageport.models.llama:LlamaForCausalLM",
    "MistralForSequenceClassification": "pageport.models.llama:LlamaForCausalLM",
    "Qwen2ForSequenceClassification": "pageport.models.llama:LlamaForCausalLM",
    "Qwen3ForSequenceClassification": "pageport.models.llama:LlamaForCausalLM",
    "LlavaForConditionalGeneration": "pageport.models.llava:LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "pageport.models.llava_next:LlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "pageport.models.qwen2_vl:Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "pageport.models.qwen2_vl:Qwen2_5_VLForConditionalGeneration",
}


def _plugin_models() -> dict[str, type]:
    from pageport.plugins import get_plugin_manager

    models: dict[str, type] = {}
    for result in get_plugin_manager().hook.pageport_models():
        if not isinstance(result, dict):
            logger.warning("a plugin's pageport_models() returned %s, not a dict; ignored", type(result).__name__)
            continue
        models.update(result)
    return models


def supported_architectures() -> list[str]:
    return sorted({*_BUILTIN, *_plugin_models()})


def get_model_class(architectures: Union[str, Sequence[str]]) -> type:
    """The class for the first known name in `architectures` (plugins override built-ins)."""
    names = [architectures] if isinstance(architectures, str) else list(architectures or [])
    plugins = _plugin_models()
    for name in names:
        if name in plugins:
            if name in _BUILTIN:
                logger.info("architecture %s: using the plugin's %r over the built-in", name, plugins[name])
            return plugins[name]
        if name in _BUILTIN:
            module, _, attr = _BUILTIN[name].partition(":")
            return getattr(importlib.import_module(module), attr)
    raise ValueError(f"unsupported model architecture {', '.join(names) or '(none given in the config)'}; "
                     f"supported: {', '.join(supported_architectures())}")
