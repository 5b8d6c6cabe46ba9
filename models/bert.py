"""Encoder models for the pooling runner: BERT, RoBERTa and XLM-RoBERTa (bidirectional attention, no KV cache).

Engine interface (`is_encoder = True`): forward(input_ids [T], positions [T], token_type_ids [T], seq_lens) ->
hidden [T, H] over a ragged batch of whole sequences (flattened, as the decoder models take them); the linear
layers run on the T real tokens only, attention pads the batch to its longest sequence. `classify(pooled [N, H])`
-> logits [N, num_labels] for the *ForSequenceClassification heads. Parameter names follow Hugging Face's
(`bert.` / `roberta.` prefixes dropped), so checkpoints load name for name; q|k|v are fused into one matmul.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pageport.models.layers import (ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear,
                                    VocabParallelEmbedding, _all_gather_last_dim, default_dtype, get_tensor_parallel)

logger = logging.getLogger(__name__)


def _activation(name: str):
    from transformers.activations import ACT2FN
    if name not in ACT2FN:
        raise ValueError(f"unsupported hidden_act {name!r}")
    return ACT2FN[name]


class _LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose parameters load from checkpoints like every other (weight_loader)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps=eps)
        for p in (self.weight, self.bias):
            p.requires_grad_(False)


class BertEmbeddings(nn.Module):
    def __init__(self, config, position_offset: int):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(max(1, config.type_vocab_size), config.hidden_size)
        self.LayerNorm = _LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.position_offset = position_offset  # RoBERTa counts positions from padding_idx + 1
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {config.position_embedding_type!r} is not supported "
                             "(absolute is)")

    def forward(self, input_ids, positions, token_type_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        if self.token_type_embeddings.num_embeddings == 1:  # RoBERTa: one segment type, whatever the tokenizer says
            token_type_ids = torch.zeros_like(token_type_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        _, tp = get_tensor_parallel()
        self.head_size = config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads // tp
        self.qkv = QKVParallelLinear(config.hidden_size, self.head_size, config.num_attention_heads, bias=True)


class _AttentionOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, bias=True)
        self.LayerNorm = _LayerNorm(config.hidden_size, config.layer_norm_eps)


class _Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = _SelfAttention(config)
        self.output = _AttentionOutput(config)


class _Intermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.act = _activation(config.hidden_act)


class _Output(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True)
        self.LayerNorm = _LayerNorm(config.hidden_size, config.layer_norm_eps)


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _Output(config)

    def forward(self, x: torch.Tensor, batch: "_Ragged") -> torch.Tensor:
        a = self.attention
        sa = a.self
        ctx = batch.attend(sa.qkv(x).view(-1, 3, sa.num_heads, sa.head_size))
        x = a.output.LayerNorm(a.output.dense(ctx) + x)
        h = self.intermediate.act(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(h) + x)


class _Ragged:
    """A step's sequences for bidirectional attention: padded to the longest, keys past a sequence's end masked."""

    def __init__(self, seq_lens: list[int], device: torch.device):
        self.seq_lens = seq_lens
        self.num = len(seq_lens)
        self.max_len = max(seq_lens)
        self.uniform = all(n == self.max_len for n in seq_lens)
        if not self.uniform:
            lens = torch.tensor(seq_lens, device=device)
            within = torch.arange(self.max_len, device=device)[None, :] < lens[:, None]  # [B, L]
            self.index = within.reshape(-1).nonzero().squeeze(1)  # packed token -> padded slot
            self.mask = within[:, None, None, :]  # [B, 1, 1, L]: which keys each query may see

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [T, 3, heads, d] -> [T, heads * d]. One scatter moves q, k and v into the padded layout at once."""
        _, _, h, d = qkv.shape
        b, n = self.num, self.max_len
        mask = None
        if not self.uniform:
            # zeros, not garbage, in the padding: a masked key's weight is 0, and 0 * NaN would still be NaN
            qkv = qkv.new_zeros(b * n, 3, h, d).index_copy_(0, self.index, qkv)
            mask = self.mask
        qkv = qkv.view(b, n, 3, h, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, h, L, d] views
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b * n, h * d)
        return out if self.uniform else out.index_select(0, self.index)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class _Pooler(nn.Module):
    """BERT's pooler: tanh(W h_cls + b), the input of its classifier."""

    def __init__(self, config):
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, bias=True)


class _RobertaClassificationHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, bias=True)
        self.out_proj = ReplicatedLinear(config.hidden_size, config.num_labels, bias=True)


class BertModel(nn.Module):
    """BertModel / RobertaModel / XLMRobertaModel, and with `with_classifier` their *ForSequenceClassification."""

    is_encoder = True
    default_pooling_type = "CLS"  # vLLM's default for encoder embedders without sentence-transformers files
    prefixes = ("bert.",)
    roberta = False

    def __init__(self, hf_config, platform, dtype: torch.dtype, with_classifier: bool = False):
        super().__init__()
        self.config = hf_config
        self.dtype = dtype
        self.hidden_size = hf_config.hidden_size
        self.num_labels = int(getattr(hf_config, "num_labels", 0)) if with_classifier else 0
        offset = (hf_config.pad_token_id + 1) if self.roberta else 0
        with torch.device(platform.device), default_dtype(dtype):
            self.embeddings = BertEmbeddings(hf_config, offset)
            self.encoder = BertEncoder(hf_config)
            if with_classifier and self.roberta:
                self.classifier = _RobertaClassificationHead(hf_config)
            elif with_classifier:
                self.pooler = _Pooler(hf_config)
                self.classifier = ReplicatedLinear(hf_config.hidden_size, self.num_labels, bias=True)

    # engine interface ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor,
                seq_lens: list[int]) -> torch.Tensor:
        x = self.embeddings(input_ids, positions, token_type_ids)
        batch = _Ragged(seq_lens, x.device)
        for layer in self.encoder.layer:
            x = layer(x, batch)
        return x

    def classify(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_labels] from each sequence's first-token hidden state (as Transformers' heads)."""
        if self.num_labels == 0:
            raise ValueError("this model has no classification head")
        if self.roberta:
            h = torch.tanh(self.classifier.dense(cls_hidden))
            return self.classifier.out_proj(h).float()
        return self.classifier(torch.tanh(self.pooler.dense(cls_hidden))).float()

    # weights -------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, w in weights:
            for prefix in self.prefixes:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    break
            if name.endswith(("position_ids", "token_type_ids")):  # buffers, not weights
                continue
            if name.startswith("pooler.") and "pooler.dense.weight" not in params:
                continue  # BertModel checkpoints carry the pooler; embeddings never use it
            shard = None
            for part in ("query", "key", "value"):
                if f".attention.self.{part}." in name:
                    name, shard = name.replace(f".self.{part}.", ".self.qkv."), part[0]
                    break
            name = name.replace(".gamma", ".weight").replace(".beta", ".bias")  # old BERT checkpoints
            param = params.get(name)
            if param is None:
                unexpected.append(name)
                continue
            loader = getattr(param, "weight_loader", None)
            if loader is None:  # nn.LayerNorm / nn.Embedding parameters
                if tuple(param.shape) != tuple(w.shape):
                    raise ValueError(f"{name}: checkpoint shape {tuple(w.shape)} != {tuple(param.shape)}")
                param.data.copy_(w)
            else:
                loader(param, w, shard)
            loaded.add(name if shard is None else f"{name}:{shard}")
        if unexpected:
            logger.warning("ignored %d checkpoint tensors the model does not have: %s", len(unexpected),
                           ", ".join(unexpected[:8]))
        missing = []
        for name in params:
            if name.endswith(".self.qkv.weight") or name.endswith(".self.qkv.bias"):
                if not all(f"{name}:{s}" in loaded for s in "qkv"):
                    missing.append(name)
            elif name not in loaded:
                missing.append(name)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights: {', '.join(missing[:8])}")
        return loaded


class BertForSequenceClassification(BertModel):
    def __init__(self, hf_config, platform, dtype: torch.dtype):
        super().__init__(hf_config, platform, dtype, with_classifier=True)


class RobertaModel(BertModel):
    prefixes = ("roberta.",)
    roberta = True


class RobertaForSequenceClassification(RobertaModel):
    def __init__(self, hf_config, platform, dtype: torch.dtype):
        super().__init__(hf_config, platform, dtype, with_classifier=True)


ENCODER_ARCHITECTURES = {
    "BertModel": BertModel, "BertForSequenceClassification": BertForSequenceClassification,
    "RobertaModel": RobertaModel, "RobertaForSequenceClassification": RobertaForSequenceClassification,
    "XLMRobertaModel": RobertaModel, "XLMRobertaForSequenceClassification": RobertaForSequenceClassification,
}


class SequenceScoreHead(nn.Module):
    """A decoder's classification head (`score`, as *ForSequenceClassification checkpoints name it): hidden ->
    num_labels logits, without bias. Used by `--convert classify|reward` on the Llama family."""

    def __init__(self, hidden_size: int, num_labels: int, device, dtype: torch.dtype):
        super().__init__()
        with torch.device(device), default_dtype(dtype):
            self.score = ColumnParallelLinear(hidden_size, num_labels, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _all_gather_last_dim(self.score(hidden)).float()

