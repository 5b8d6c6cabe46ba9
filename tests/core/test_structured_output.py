"""StructuredOutputManager on the default model's tokenizer: grammars compiled off-thread, bitmasks applied to
logits tensors, outputs that match the spec in full, free rows untouched, eager errors for bad specs."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from pageport.core.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402
from pageport.core.structured_output import StructuredOutputManager, apply_bitmask, bitmask_width  # noqa: E402

VOCAB = 49152  # SmolLM2's
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module", params=["xgrammar", "guidance"])
def manager(default_tokenizer, request):
    if request.param == "guidance":
        pytest.importorskip("llguidance")
    m = StructuredOutputManager(default_tokenizer, VOCAB, backend=request.param)
    yield m
    m.shutdown()


def _wait_ready(m: StructuredOutputManager, ids, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not all(m.is_ready(r) for r in ids):
        assert time.monotonic() < deadline, "grammars did not compile"
        time.sleep(0.002)


def _decode_batch(m: StructuredOutputManager, tok, rows: list, steps: int = 120, seed: int = 0):
    """Greedy decoding on fresh random logits under the manager's masks, until every grammar terminates.
    Returns each constrained row's text and checks that free rows' logits are never touched."""
    gen = torch.Generator().manual_seed(seed)
    out = {r: [] for r in rows if r is not None}
    # random logits would wander in open-ended strings and numbers: lean towards closing them
    closers = [tok.eos_token_id] + [tok.convert_tokens_to_ids(s) for s in ('"', "}", ")", "]", '"}')]
    for _ in range(steps):
        live = [r if r is not None and not m.is_terminated(r) else None for r in rows]
        mask = m.bitmask(live)
        if mask is None:
            break
        assert mask.dtype == torch.int32 and mask.shape == (len(rows), bitmask_width(VOCAB))
        logits = torch.randn(len(rows), VOCAB, generator=gen)
        logits[:, closers] += 3.0
        before = logits.clone()
        apply_bitmask(logits, mask)
        for i, r in enumerate(live):
            if r is None:
                assert torch.equal(logits[i], before[i]), "a row without a grammar was changed"
                assert bool((mask[i] == -1).all())
                continue
            t = int(logits[i].argmax())
            assert m.accept(r, [t])
            out[r].append(t)
    unfinished = [r for r in out if not m.is_terminated(r)]
    assert not unfinished, f"grammars did not finish: {unfinished} {[tok.decode(out[r]) for r in unfinished]}"
    # xgrammar ends on the stop token; llguidance as soon as nothing else may follow
    eos = tok.eos_token_id
    texts = {}
    for r, ids in out.items():
        body = ids[:-1] if ids[-1] == eos else ids
        assert eos not in body
        texts[r] = tok.decode(body)
    return texts


def test_mixed_batch_matches_every_spec(manager, default_tokenizer):
    specs = {"choice": StructuredOutputsParams(choice=["yes", "no", "maybe \"so\""]),
             "regex": StructuredOutputsParams(regex=r"[A-Z]{2}-\d{3}"),
             "json": StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
             "ebnf": StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ("+" [0-9]+)? ")"'),
             "lark": StructuredOutputsParams(grammar='start: "go " DIR\nDIR: "north" | "south"'),
             "object": StructuredOutputsParams(json_object=True, disable_any_whitespace=True)}
    for seed in range(3):
        ids = [f"{k}-{seed}" for k in specs]
        for rid, p in zip(ids, specs.values()):
            manager.add_request(rid, p)
        _wait_ready(manager, ids)
        assert all(manager.error(r) is None for r in ids)
        rows = [ids[0], None, ids[1], ids[2], None, ids[3], ids[4], ids[5]]
        texts = _decode_batch(manager, default_tokenizer, rows, steps=300, seed=seed)
        got = dict(zip(specs, (texts[r] for r in ids)))
        assert got["choice"] in ("yes", "no", 'maybe "so"')
        assert re.fullmatch(r"[A-Z]{2}-\d{3}", got["regex"]), got["regex"]
        jsonschema.validate(json.loads(got["json"]), SCHEMA)
        assert re.fullmatch(r"\(\d+(\+\d+)?\)", got["ebnf"]), got["ebnf"]
        assert got["lark"] in ("go north", "go south")
        assert isinstance(json.loads(got["object"]), dict)
        for r in ids:
            manager.remove(r)


def test_first_step_allows_exactly_the_prefixes(manager, default_tokenizer):
    tok = default_tokenizer
    manager.add_request("pfx", StructuredOutputsParams(choice=["yes", "no"]))
    _wait_ready(manager, ["pfx"])
    mask = manager.bitmask(["pfx"])
    bits = ((mask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:VOCAB].bool()
    allowed = bits.nonzero().flatten().tolist()
    assert allowed
    for t in allowed:
        s = tok.decode([t])
        assert s and ("yes".startswith(s) or "no".startswith(s)), (t, s)
    # and every single token that spells a non-empty prefix is allowed
    for word in ("yes", "no"):
        for t in tok.encode(word, add_special_tokens=False)[:1]:
            assert t in allowed
    manager.remove("pfx")


def test_refused_token_leaves_the_matcher(manager, default_tokenizer):
    tok = default_tokenizer
    manager.add_request("r", StructuredOutputsParams(regex=r"\d+"))
    _wait_ready(manager, ["r"])
    first = manager.bitmask(["r"]).clone()
    letter = tok.encode("hello", add_special_tokens=False)[0]
    assert not manager.accept("r", [letter])
    assert torch.equal(manager.bitmask(["r"]), first)
    digit = tok.encode("7", add_special_tokens=False)[0]
    assert manager.accept("r", [digit])
    assert not manager.is_terminated("r")
    assert manager.accept("r", [tok.eos_token_id]) and manager.is_terminated("r")
    manager.remove("r")
    assert not manager.has_grammar("r") and manager.accept("r", [letter])  # unknown: no constraint


def test_advance_takes_a_step_of_tokens_at_once(manager, default_tokenizer):
    """advance (a batch's tokens in one call, xgrammar's batch accept) answers as accept + is_terminated would:
    a refused token leaves its matcher, a completed grammar says stop, and the other rows are unaffected."""
    tok = default_tokenizer
    for r in ("a", "b", "c"):
        manager.add_request(r, StructuredOutputsParams(regex=r"\d+"))
    _wait_ready(manager, ["a", "b", "c"])
    letter = tok.encode("hello", add_special_tokens=False)[0]
    digit = tok.encode("7", add_special_tokens=False)[0]
    before = manager.bitmask(["b"]).clone()
    assert manager.advance(["a", "b", "c"], [digit, letter, digit]) == [True, False, True]
    assert torch.equal(manager.bitmask(["b"]), before)  # b refused its token: unchanged
    assert manager.advance(["a", "b", "c"], [tok.eos_token_id, digit, digit]) == [False, True, True]
    assert manager.is_terminated("a") and not manager.is_terminated("c")
    for r in ("a", "b", "c"):
        manager.remove(r)


def test_spec_bitmask_masks_each_verified_position(manager, default_tokenizer):
    """A speculating row's masks: row i is what the grammar allows after proposals 0..i-1 (as a twin request
    advanced token by token says); the first refused proposal has probability 0 in its row, the rows after it
    allow everything; after a proposal that completes the grammar, likewise; the matcher stays where it was."""
    tok = default_tokenizer
    text = tok.encode('{"name": "Al", "age": 7, "ok": true}', add_special_tokens=False)
    for r in ("spec", "twin"):
        manager.add_request(r, StructuredOutputsParams(json=SCHEMA))
    _wait_ready(manager, ["spec", "twin"])
    bad = tok.encode("hello", add_special_tokens=False)[0]
    proposals = text[:3] + [bad] + text[3:5]
    start = manager.bitmask(["spec"]).clone()
    mask = manager.spec_bitmask("spec", proposals)
    assert mask.shape == (1 + len(proposals), bitmask_width(VOCAB))
    for i in range(4):  # the state after text[:i]
        assert torch.equal(mask[i], manager.bitmask(["twin"])[0]), i
        if i < 3:
            assert manager.accept("twin", [text[i]])
    assert not (mask[3, bad // 32] >> (bad % 32)) & 1  # refused: probability 0 there
    assert (mask[4:] == -1).all()  # never read: verification stops at row 3
    assert torch.equal(manager.bitmask(["spec"]), start)  # rolled back
    # a proposal that completes the grammar: the rows after it allow everything
    assert manager.accept("twin", text[3:])
    assert manager.accept("spec", text[:-1])
    mask = manager.spec_bitmask("spec", [text[-1], tok.eos_token_id, text[0]])
    assert (mask[0] != -1).any() and (mask[2:] == -1).all()
    # complete JSON: only EOS allowed next, or (llguidance) the matcher already stopped: nothing to mask
    assert manager.spec_bitmask("twin", [tok.eos_token_id]).ne(-1).any() != manager.is_terminated("twin")
    assert manager.accept("spec", [text[-1]])  # rolled back to before text[-1]
    assert manager.is_terminated("spec") == manager.is_terminated("twin")
    for r in ("spec", "twin"):
        manager.remove(r)


def test_no_grammar_rows_cost_nothing(manager):
    assert manager.bitmask([None, None, "never-added"]) is None
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    apply_bitmask(logits, torch.full((3, bitmask_width(VOCAB)), -1, dtype=torch.int32))
    assert torch.equal(logits, before)


def test_compiles_off_thread_once_per_spec(default_tokenizer):
    m = StructuredOutputManager(default_tokenizer, VOCAB)
    gate, calls = threading.Event(), []
    compile_ = m.backend.compile

    def slow_compile(params):
        calls.append(params.key())
        gate.wait(10)
        return compile_(params)

    m.backend.compile = slow_compile
    spec = {"type": "object", "properties": {"x": {"type": "integer"}}}
    m.add_request("a", StructuredOutputsParams(json=spec))
    m.add_request("b", StructuredOutputsParams(json=json.dumps(spec)))  # same schema as text: same key
    assert not m.is_ready("a") and not m.is_ready("b")  # the caller was not blocked
    assert m.bitmask(["a", "b"]) is None  # not compiled yet: no row is constrained
    gate.set()
    _wait_ready(m, ["a", "b"])
    assert len(calls) == 1
    assert m.bitmask(["a", "b"]).shape == (2, bitmask_width(VOCAB))
    m.shutdown()


def test_compile_error_is_reported_per_request(default_tokenizer):
    m = StructuredOutputManager(default_tokenizer, VOCAB)

    def failing(params):
        raise ValueError("the regex grammar did not compile: too large")

    m.backend.compile = failing
    m.add_request("bad", StructuredOutputsParams(regex="a+"))
    _wait_ready(m, ["bad"])
    assert m.error("bad") == "the regex grammar did not compile: too large"
    assert m.error("unknown") is None and m.bitmask(["bad"]) is None
    m.shutdown()


@pytest.mark.parametrize("kwargs, words", [
    (dict(json='{"type": "nonsense"}'), ["JSON schema", "nonsense"]),
    (dict(json="{not json"), ["not valid JSON"]),
    (dict(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), ["JSON schema", "missing"]),
    (dict(regex="[a-"), ["regex", "Unclosed"]),
    (dict(regex="(ab"), ["regex", "parenthesis"]),
    (dict(grammar='root ::= "a" | b'), ["grammar", '"b" is not defined']),
    (dict(grammar='start: "a" | x'), ["grammar", "x"]),
    (dict(choice=[]), ["choice"]),
    (dict(), ["exactly one"]),
    (dict(regex="a", choice=["a"]), ["exactly one", "regex, choice"]),
])
def test_invalid_specs_fail_when_made(kwargs, words):
    with pytest.raises(ValueError) as e:
        StructuredOutputsParams(**kwargs)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "project/cpp" not in str(e.value)  # xgrammar's source location is stripped


def test_sampling_params_takes_a_dict_and_pydantic_models():
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    p = SamplingParams(structured_outputs={"json": Person})
    assert p.structured_outputs.kind == "json" and p.structured_outputs.json["required"] == ["name", "age"]
    assert p.clone(seed=1).structured_outputs is p.structured_outputs


def test_unknown_backend_is_named(default_tokenizer):
    with pytest.raises(ValueError, match="'outlines' is not built into pageport yet; choose one of: xgrammar, guid"):
        StructuredOutputManager(default_tokenizer, VOCAB, backend="outlines")
    with pytest.raises(ValueError, match="'nope' is unknown"):
        StructuredOutputManager(default_tokenizer, VOCAB, backend="nope")


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_bitmask_matches_a_bit_by_bit_reference(dtype, kernel, monkeypatch):
    if kernel == "torch":  # the path every device without xgrammar's kernel takes
        import pageport.core.structured_output as so
        monkeypatch.setattr(so, "_xgrammar_kernel", lambda *a: False)
    gen = torch.Generator().manual_seed(1)
    rows, vocab = 5, 1000
    width = bitmask_width(vocab - 70)  # the mask covers fewer tokens than the logits: the rest is forbidden
    mask = torch.randint(-2 ** 31, 2 ** 31 - 1, (rows, width), generator=gen, dtype=torch.int64).to(torch.int32)
    mask[2] = -1  # a free row
    logits = torch.randn(rows, vocab, generator=gen).to(dtype)
    expected = logits.clone()
    for i in (0, 1, 3, 4):  # the free row stays whole, even past the mask's width
        for t in range(vocab):
            word = t // 32
            if word >= width or not (int(mask[i, word]) >> (t % 32)) & 1:
                expected[i, t] = float("-inf")
    apply_bitmask(logits, mask)
    assert torch.equal(logits, expected)
    with pytest.raises(ValueError, match="same rows"):
        apply_bitmask(logits, mask[:2])


def test_allowed_tokens_row_and_forbid():
    from pageport.core.structured_output.token_masks import allowed_tokens_row, forbid

    ids = [0, 5, 31, 32, 1000, VOCAB - 1]
    row = allowed_tokens_row(ids, VOCAB)
    assert row.dtype == torch.int32 and row.shape == (bitmask_width(VOCAB),)
    logits = torch.randn(2, VOCAB)
    before = logits.clone()
    apply_bitmask(logits, torch.stack([row, torch.full_like(row, -1)]))
    assert sorted(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == ids
    assert torch.equal(logits[0, ids], before[0, ids]) and torch.equal(logits[1], before[1])
    forbid(row, [31, 1000])
    logits = torch.randn(1, VOCAB)
    apply_bitmask(logits, row[None])
    assert sorted(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == [0, 5, 32, VOCAB - 1]
    with pytest.raises(ValueError, match="allowed_token_ids"):
        allowed_tokens_row([VOCAB], VOCAB)


def test_bad_words(default_tokenizer):
    from pageport.core.structured_output.token_masks import BadWords

    tok = default_tokenizer
    bw = BadWords(tok, ["Paris", "ineffable"])
    spaced = tok.encode(" ineffable", add_special_tokens=False)
    assert len(spaced) > 1  # a word of several tokens
    always = bw.banned([])
    for seq in bw.sequences:
        if len(seq) == 1:
            assert seq[0] in always  # one-token forms: never
    after = bw.banned(tok.encode("It is", add_special_tokens=False) + spaced[:-1])
    assert spaced[-1] in after  # the word's last token, right after the rest of it
    assert spaced[-1] not in bw.banned(tok.encode("It is", add_special_tokens=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_bitmask_on_cuda_matches_the_cpu(dtype):
    gen = torch.Generator().manual_seed(2)
    mask = torch.randint(-2 ** 31, 2 ** 31 - 1, (64, bitmask_width(VOCAB)), generator=gen,
                         dtype=torch.int64).to(torch.int32)
    mask[::3] = -1  # free rows among the constrained ones
    logits = torch.randn(64, VOCAB, generator=gen).to(dtype)
    on_gpu = logits.cuda()
    apply_bitmask(logits, mask)  # the CPU result is checked bit by bit above
    apply_bitmask(on_gpu, mask)  # the mask copied over by apply_bitmask itself
    assert torch.equal(on_gpu.cpu(), logits)
