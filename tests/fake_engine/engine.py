"""The fake engine itself (see the package docstring)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from runtime.engines.base import (
    AdapterRef,
    EmbedSpec,
    EngineDeadError,
    EngineError,
    EngineOutput,
    EngineRequestError,
    EngineSettings,
    EngineStats,
    SamplingSpec,
    SeqDelta,
    TokenInfo,
    max_position_embeddings,
)

EMBED_DIM = 16  # the fake's vectors; it has no Matryoshka dimensions (as vLLM refuses them for such a model)
FIRST_ID = 300  # generated ids stay clear of the special and single-byte tokens at the start of the vocabulary
KNOWN_EXTRA = {"logit_bias", "allowed_token_ids", "bad_words"}


class FakeEngine:
    name = "fake"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        cap = settings.extra.get("max_model_len_cap")
        self.max_model_len = settings.max_model_len or int(cap or max_position_embeddings(settings.model_dir) or 2048)
        self.token_delay = float(settings.extra.get("token_delay_s", 0.0))
        self.tokenizer: Any = None
        self.vocab = 0
        self.dead: str | None = None
        self.running: set[str] = set()
        self.aborted: set[str] = set()
        self.requests = 0  # every request the engine saw (tests count them)
        self.last_spec: SamplingSpec | None = None  # the spec of the latest request (tests look at what arrived)
        self.adapters: dict[int, AdapterRef] = {}  # loaded LoRA adapters by id
        self.removed: list[str] = []  # names of the adapters removed, in order
        self.spec_counts = [0, 0, 0]  # n-gram speculation since start: drafts, draft tokens, accepted tokens

    async def start(self) -> None:
        await asyncio.sleep(float(self.settings.extra.get("load_delay_s", 0.0)))
        # in a thread, as the real engines load: the server's event loop keeps answering /ping meanwhile
        self.tokenizer = await asyncio.to_thread(_tokenizer, str(self.settings.model_dir))
        self.vocab = len(self.tokenizer)

    def validate(self, spec: SamplingSpec) -> None:
        unknown = sorted(set(spec.extra) - KNOWN_EXTRA)
        if unknown:
            raise EngineRequestError(f"Unexpected keyword argument '{unknown[0]}'", param=unknown[0])
        if spec.n > 1 and spec.temperature == 0.0:
            raise EngineRequestError("n > 1 needs sampling (temperature > 0)", param="n")

    def _ids(self, prompt_ids: list[int], spec: SamplingSpec, index: int) -> list[int]:
        if "[utf8]" in self.tokenizer.decode(prompt_ids):
            # Byte tokens of multi-byte characters: the first bytes of each end inside a character (empty deltas).
            cycle = self.tokenizer("☃ é ☃", add_special_tokens=False)["input_ids"]
            return [cycle[i % len(cycle)] for i in range(spec.max_tokens)]
        span = max(self.vocab - FIRST_ID, 1)
        if spec.temperature > 0 and spec.seed is None:
            rng = random.Random()
            return [FIRST_ID + rng.randrange(span) for _ in range(spec.max_tokens)]
        base = sum(prompt_ids) * 31 + index * 977 + (spec.seed or 0) * 7919 * (spec.temperature > 0)
        if spec.adapter is not None:  # an adapter changes the output, by its name (as its weights would)
            base += 104729 * (1 + sum(map(ord, spec.adapter.name)))
        return [FIRST_ID + (base + 17 * i * i + 5 * i) % span for i in range(spec.max_tokens)]

    async def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> AsyncIterator[EngineOutput]:
        if self.dead:
            raise EngineDeadError(self.dead)
        self.validate(spec)
        self.requests += 1
        self.last_spec = spec
        self.running.add(request_id)
        prompt_text = self.tokenizer.decode(prompt_ids)
        delay = 0.2 if "[slow]" in prompt_text else self.token_delay
        masked = "[masked]" in prompt_text
        seqs = [_Seq(self, i, self._ids(prompt_ids, spec, i), spec, masked) for i in range(spec.n)]
        for seq in seqs:
            self._speculate(prompt_ids, seq.ids)
        try:
            for step in range(spec.max_tokens):
                await asyncio.sleep(delay)
                if request_id in self.aborted:
                    yield EngineOutput(tuple(s.abort() for s in seqs if not s.done), len(prompt_ids), True)
                    return
                if step == 2 and "[fail]" in prompt_text:
                    raise EngineError("the fake engine failed this request on purpose")
                if step == 2 and "[die]" in prompt_text:
                    self.dead = "the fake engine died on purpose"
                    raise EngineDeadError(self.dead)
                deltas = tuple(d for s in seqs if not s.done and (d := s.step(step)) is not None)
                done = all(s.done for s in seqs)
                prompt_lp = _prompt_logprobs(self, prompt_ids, spec, masked) if step == 0 else None
                yield EngineOutput(deltas, len(prompt_ids), done, prompt_logprobs=prompt_lp)
                if done:
                    return
        finally:
            self.running.discard(request_id)
            self.aborted.discard(request_id)

    async def embed(self, request_id: str, prompt_ids: list[int], spec: EmbedSpec) -> list[float]:
        """A deterministic vector of the token ids (their order counts); ``[slow]`` takes 1 s, ``[fail]`` fails."""
        import math

        if self.dead:
            raise EngineDeadError(self.dead)
        if spec.dimensions is not None:
            raise EngineRequestError("this model does not support Matryoshka embeddings", param="dimensions")
        self.requests += 1
        text = self.text(prompt_ids)
        self.running.add(request_id)
        try:
            await asyncio.sleep(1.0 if "[slow]" in text else 0.0)
            if "[fail]" in text:
                raise EngineError("the fake engine failed this request")
        finally:
            self.running.discard(request_id)
        vec = [sum(math.cos(t * (j + 1) * 0.37 + p) for p, t in enumerate(prompt_ids)) for j in range(EMBED_DIM)]
        norm = math.sqrt(sum(x * x for x in vec)) or 1.0
        return [x / norm for x in vec] if spec.normalize else vec

    async def add_adapter(self, adapter: AdapterRef, pin: bool = False) -> None:
        self.adapters[adapter.id] = adapter

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        self.adapters.pop(adapter.id, None)
        self.removed.append(adapter.name)

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.aborted.add(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError(self.dead)

    def stats(self) -> EngineStats:
        drafts, drafted, accepted = self.spec_counts if self.settings.speculative else (None, None, None)
        return EngineStats(len(self.running), 0, 0.0, drafts, drafted, accepted)

    def _speculate(self, prompt: list[int], out: list[int]) -> None:
        """What n-gram prompt lookup would draft and have accepted while generating ``out`` (the output does not
        change, as with real speculation): at each step, the latest earlier occurrence of the last n tokens
        (n from prompt_lookup_max down to prompt_lookup_min) proposes the tokens that followed it."""
        sp = self.settings.speculative
        if sp is None or sp.method != "ngram":
            return
        k = sp.num_speculative_tokens
        hi = int(sp.options.get("prompt_lookup_max") or 5)
        lo = int(sp.options.get("prompt_lookup_min") or hi)
        i = 0
        while i < len(out):
            ctx = prompt + out[:i]
            draft = _lookup(ctx, lo, hi, k)
            accepted = 0
            if draft:
                while accepted < len(draft) and i + accepted < len(out) and draft[accepted] == out[i + accepted]:
                    accepted += 1
                self.spec_counts[0] += 1
                self.spec_counts[1] += len(draft)
                self.spec_counts[2] += accepted
            i += accepted + 1

    async def shutdown(self) -> None:
        self.running.clear()

    def text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def token(self, tid: int, position: int, k: int | None, masked: bool = False) -> TokenInfo:
        """Deterministic logprobs (depending on the position and the token): the chosen token, then ``k``
        alternatives, each less likely; ``masked``: the alternatives after the first carry -inf (a grammar-masked
        token, as vLLM reports one), the third NaN."""
        lp = -0.25 - 0.01 * (position % 7) - 0.001 * (tid % 11)
        alts = [tid, tid + 1, tid + 2][: k or 0]
        top = tuple((alt, self.text([alt]), _masked(lp - j, j) if masked else lp - j) for j, alt in enumerate(alts))
        return TokenInfo(id=tid, text=self.text([tid]), logprob=lp if k is not None else None, top=top)


class _Seq:
    """One of a request's ``n`` sequences: incremental decoding (nothing for a partial UTF-8 character), stops."""

    def __init__(self, engine: FakeEngine, index: int, ids: list[int], spec: SamplingSpec, masked: bool) -> None:
        self.engine, self.index, self.ids, self.spec, self.masked = engine, index, ids, spec, masked
        self.done = False
        self.sent = ""

    def step(self, i: int) -> SeqDelta | None:
        tid = self.ids[i]
        decoded = self.engine.text(self.ids[: i + 1])
        full = decoded if not decoded.endswith("\ufffd") else self.sent
        info = self.engine.token(tid, i, self.spec.logprobs, self.masked)
        finish: str | None = None
        reason: str | int | None = None
        for stop in self.spec.stop:
            if stop and stop in full:
                cut = full.index(stop) + (len(stop) if self.spec.include_stop_str_in_output else 0)
                full, finish, reason = full[:cut], "stop", stop
                break
        if finish is None and tid in self.spec.stop_token_ids:
            finish, reason = "stop", tid
        if finish is None and i == len(self.ids) - 1:
            finish = "length"
        text = full[len(self.sent) :] if full.startswith(self.sent) else ""
        self.sent = full if full.startswith(self.sent) else self.sent
        self.done = finish is not None
        return SeqDelta(self.index, text, (info,), finish, reason)

    def abort(self) -> SeqDelta:
        self.done = True
        return SeqDelta(self.index, "", (), "abort", None)


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _lookup(ctx: list[int], lo: int, hi: int, k: int) -> list[int]:
    for n in range(min(hi, len(ctx) - 1), lo - 1, -1):
        tail = ctx[-n:]
        for start in range(len(ctx) - n - 1, -1, -1):
            if ctx[start : start + n] == tail:
                return ctx[start + n : start + n + k]
    return []


def _masked(lp: float, j: int) -> float:
    return lp if j == 0 else float("-inf") if j == 1 else float("nan")


def _prompt_logprobs(
    engine: FakeEngine, ids: list[int], spec: SamplingSpec, masked: bool = False
) -> tuple[TokenInfo | None, ...] | None:
    if spec.prompt_logprobs is None:
        return None
    # As vLLM: the first prompt token has no logprob (nothing precedes it). ``masked``: the prompt tokens' own
    # logprobs are -inf (as a model whose logits underflow reports them).
    first = TokenInfo(id=ids[0], text="")
    rest = (engine.token(t, p, spec.prompt_logprobs, masked) for p, t in enumerate(ids[1:], 1))
    return (first, *(replace(t, logprob=float("-inf")) if masked else t for t in rest))
