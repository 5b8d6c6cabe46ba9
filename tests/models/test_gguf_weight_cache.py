"""The GGUF cache's dequantized weights: used on the second load, bit-identical to a fresh conversion, rebuilt when
the file changes (mtime, size) or the entry is damaged. A tiny Llama GGUF (Q8_0, Q4_1 and F32 tensors) written
with the gguf package."""
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from pageport.models import gguf_loader  # noqa: E402
from pageport.models.gguf_loader import PlainConfig, open_gguf  # noqa: E402

H, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 64, 2, 4, 2, 128, 96


def write_tiny_llama(path) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(H // HEADS)
    w.add_vocab_size(VOCAB)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([gguf.TokenType.NORMAL] * VOCAB)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    hd = H // HEADS

    def add(name, shape, qtype=None):
        x = rng.standard_normal(shape).astype(np.float32) * 0.1
        if qtype is None:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    Q8, Q41 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
    add("token_embd.weight", (VOCAB, H), Q8)
    add("output_norm.weight", (H,))
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (H,))
        add(f"blk.{i}.attn_q.weight", (HEADS * hd, H), Q8)
        add(f"blk.{i}.attn_k.weight", (KV_HEADS * hd, H), Q41)
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * hd, H), Q8)
        add(f"blk.{i}.attn_output.weight", (H, HEADS * hd), Q41)
        add(f"blk.{i}.ffn_norm.weight", (H,))
        add(f"blk.{i}.ffn_gate.weight", (INTER, H), Q41)
        add(f"blk.{i}.ffn_up.weight", (INTER, H), Q8)
        add(f"blk.{i}.ffn_down.weight", (H, INTER), Q41)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEPORT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    return path


def stats():
    return dict(gguf_loader.weight_cache_stats)


def fresh(path):
    """A conversion that never touches the cache."""
    gg = open_gguf(path, tokenizer=False)
    return list(gg._convert())


def assert_identical(a, b):
    assert [n for n, _ in a] == [n for n, _ in b]
    for (name, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape, name
        assert torch.equal(x.view(torch.int32), y.view(torch.int32)), name  # bit for bit


def test_second_load_reads_the_cache_bit_identical(tiny):
    s0 = stats()
    cold = open_gguf(tiny, tokenizer=False)
    assert not cold.cached
    first = list(cold.weights())
    assert stats()["writes"] == s0["writes"] + 1 and stats()["hits"] == s0["hits"]
    assert (cold.cache_dir / gguf_loader._WEIGHTS_FILE).is_file()

    warm = open_gguf(tiny, tokenizer=False)
    assert warm.cached and warm.cache_dir == cold.cache_dir
    second = list(warm.weights())
    assert stats()["hits"] == s0["hits"] + 1 and stats()["writes"] == s0["writes"] + 1
    assert_identical(second, first)
    assert_identical(second, fresh(tiny))
    assert len(first) == 2 + 9 * LAYERS


def test_changed_file_is_a_new_entry(tiny):
    gg = open_gguf(tiny, tokenizer=False)
    list(gg.weights())
    old_dir = gg.cache_dir
    st = os.stat(tiny)
    os.utime(tiny, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # mtime only
    s0 = stats()
    touched = open_gguf(tiny, tokenizer=False)
    assert not touched.cached and touched.cache_dir != old_dir
    assert_identical(list(touched.weights()), fresh(tiny))
    assert stats()["writes"] == s0["writes"] + 1 and stats()["hits"] == s0["hits"]

    with open(tiny, "ab") as f:  # size only (the reader ignores bytes after the last tensor)
        f.write(b"\0" * 32)
    os.utime(tiny, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    grown = open_gguf(tiny, tokenizer=False)
    assert not grown.cached and grown.cache_dir not in (old_dir, touched.cache_dir)


@pytest.mark.parametrize("damage", ["flip a data byte", "truncate", "garbage header"])
def test_damaged_weights_are_rebuilt_never_trusted(tiny, damage):
    gg = open_gguf(tiny, tokenizer=False)
    list(gg.weights())
    file = gg.cache_dir / gguf_loader._WEIGHTS_FILE
    data = bytearray(file.read_bytes())
    if damage == "flip a data byte":
        data[-5] ^= 0x40  # inside the last tensor's data
    elif damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[8:40] = b"x" * 32
    file.write_bytes(bytes(data))

    s0 = stats()
    again = open_gguf(tiny, tokenizer=False)
    got = list(again.weights())
    assert stats()["rejected"] == s0["rejected"] + 1 and stats()["writes"] == s0["writes"] + 1
    assert_identical(got, fresh(tiny))  # the tensors given before the damage was found are not given twice
    s1 = stats()
    assert_identical(list(open_gguf(tiny, tokenizer=False).weights()), got)  # the rebuilt entry is read
    assert stats()["hits"] == s1["hits"] + 1 and stats()["rejected"] == s1["rejected"]


def test_plain_config_matches_transformers(tiny):
    from transformers import AutoConfig

    gg = open_gguf(tiny, tokenizer=False)
    assert isinstance(gg.hf_config, PlainConfig)
    ref = AutoConfig.from_pretrained(tiny.parent, gguf_file=tiny.name)
    for key, value in ref.to_dict().items():
        if key not in ("architectures", "transformers_version", "_name_or_path", "_model_name_or_path"):
            assert getattr(gg.hf_config, key) == value, key
    assert gg.hf_config.architectures == ["LlamaForCausalLM"]
    assert open_gguf(tiny, tokenizer=False).hf_config.to_dict() == gg.hf_config.to_dict()  # warm = cold


def test_cache_off_converts_every_time(tiny, monkeypatch):
    monkeypatch.setenv("PAGEPORT_CACHE_DIR", "off")
    s0 = stats()
    gg = open_gguf(tiny, tokenizer=False)
    assert gg.cache_dir is None
    assert_identical(list(gg.weights()), fresh(tiny))
    assert stats() == s0
