"""The offline API, named as in vLLM: LLM(...).generate / .chat / .beam_search."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from tqdm.auto import tqdm

from pageport.core.config import EngineConfig
from pageport.core.engine import LLMEngine, PromptType
from pageport.core.outputs import RequestOutput
from pageport.core.pooling_engine import PoolingAPI
from pageport.core.sampling_params import RequestOutputKind, SamplingParams

Conversation = list[dict[str, Any]]


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self):
        if self.beam_width < 1 or self.max_tokens < 1:
            raise ValueError("beam_width and max_tokens must be >= 1")


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finished: bool = False


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence] = field(default_factory=list)


class LLM(PoolingAPI):  # embed / classify / score / encode / reward: core/pooling_engine.py
    def __init__(self, model: Optional[str] = None, **kwargs):
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        """`lora_request`: one LoRARequest for every prompt, or a list of them (None: the base model)."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        # only finished outputs are returned: the engine need not assemble the ones in between (as vLLM's LLM)
        final = {id(p): p.clone(output_kind=RequestOutputKind.FINAL_ONLY) for p in params
                 if p.output_kind == "cumulative"}
        params = [final.get(id(p), p) for p in params]
        loras = lora_request if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(loras)} LoRA requests")
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                ids.append(self.engine.add_request(f"llm-{next(self._ids)}", prompt, p, lora_request=lora))
        except Exception:
            self.engine.abort_request(ids)  # all or nothing
            self._drain()
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 2,
                   dynamic_ncols=True)
        wanted = set(ids)
        out_tokens = 0
        while len(done) < len(ids) and self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.engine_request_id in wanted:
                    done[out.engine_request_id] = out
                    out_tokens += sum(len(o.token_ids) for o in out.outputs)
                    bar.update(1)
                    bar.set_postfix_str(f"output {out_tokens / max(bar.format_dict['elapsed'], 1e-9):.1f} tok/s")
        bar.close()
        return [done[i] for i in ids]

    def _drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def chat(self, messages: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None,
             add_generation_prompt: bool = True, lora_request=None, **template_kwargs) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for c in conversations:
            images = None
            if any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in c) and \
                    hasattr(self.engine.hf_config, "vision_config"):  # image parts: the model's image token
                from pageport.models.multimodal.inputs import split_chat_images

                tok = self.engine.tokenizer
                c, images = split_chat_images(c, self.engine.multimodal().chat_image_text(tok))
            p = self.render_chat(c, chat_template, add_generation_prompt, **template_kwargs)
            if images:
                p["multi_modal_data"] = {"image": images}
            prompts.append(p)
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def render_chat(self, conversation: Conversation, chat_template: Optional[str] = None,
                    add_generation_prompt: bool = True, **template_kwargs) -> dict:
        """The conversation through the tokenizer's chat template, as prompt text and token ids."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        text = tok.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **template_kwargs)
        # the template already holds the special tokens
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search on top of the engine: each step extends every live beam by one token;
        prefix caching makes re-sending the beams cheap."""
        tok = self.engine.tokenizer
        eos = self.engine.eos_token_id
        width = params.beam_width
        step_params = SamplingParams(max_tokens=1, logprobs=2 * width, temperature=params.temperature,
                                     ignore_eos=True)

        def score(seq: BeamSearchSequence, prompt_len: int) -> float:
            return seq.cum_logprob / max(1, len(seq.tokens) - prompt_len) ** params.length_penalty

        results = []
        for prompt in prompts:
            _, prompt_ids = self.engine.tokenize(prompt)
            beams = [BeamSearchSequence(list(prompt_ids))]
            finished: list[BeamSearchSequence] = []
            for _ in range(params.max_tokens):
                outs = self.generate([b.tokens for b in beams], step_params, use_tqdm=False)
                candidates = []
                for beam, out in zip(beams, outs):
                    for tid, lp in out.outputs[0].logprobs[0].items():
                        seq = BeamSearchSequence(beam.tokens + [tid], beam.cum_logprob + lp.logprob)
                        if tid == eos and not params.ignore_eos:
                            seq.finished = True
                            finished.append(seq)
                        else:
                            candidates.append(seq)
                candidates.sort(key=lambda s: s.cum_logprob, reverse=True)
                beams = candidates[:width]
                if not beams:
                    break
            best = sorted(finished + beams, key=lambda s: score(s, len(prompt_ids)), reverse=True)[:width]
            for seq in best:
                if tok is not None:
                    seq.text = tok.decode(seq.tokens[len(prompt_ids):], skip_special_tokens=True)
            results.append(BeamSearchOutput(best))
        return results
