"""A fake engine for tests of kiln's own HTTP behaviour: registered like any engine (``engines.register("fake",
"tests.fake_engine")``), served from a plain Hugging Face directory with ``--engine fake``.

It is deterministic and fast: the tokens it generates are a function of the prompt, the sequence index, the position
and (for sampled requests) the seed, decoded with the model's real tokenizer, so byte-level tokens that end inside a
UTF-8 character produce empty text deltas as real engines do. Logprobs are deterministic too. Its timing and
failures are controlled by engine arguments (``--option token_delay_s=0.05``, ``load_delay_s``) and, per request, by
markers in the prompt text: ``[fail]`` fails the request after two tokens (the engine stays healthy), ``[die]``
kills the engine after two tokens, ``[slow]`` waits 0.2 s per token, ``[utf8]`` generates the byte tokens of multi-
byte characters (deltas that end inside a character are empty), ``[masked]`` makes the logprob alternatives after
the first -inf (the third NaN) and the prompt logprobs -inf, as a grammar-masked token or an underflowing logit
gives them. ``FakeEngine.last_spec`` is the SamplingSpec of the latest request. Served with ``task=embed`` it
answers embeddings: deterministic vectors of the token ids (``[slow]`` and ``[fail]`` work there too). With an
n-gram ``speculative_config`` it counts what prompt lookup would draft and accept over its outputs (``[utf8]``
outputs repeat, so most drafts are accepted), for the speculation metrics.
"""

from __future__ import annotations

from runtime.engines.base import Engine, EngineDefault, EngineSettings, EngineSpec

KEYS = {"token_delay_s", "load_delay_s", "max_model_len_cap"}


def _create(settings: EngineSettings) -> Engine:
    from tests.fake_engine.engine import FakeEngine

    return FakeEngine(settings)


def _defaults(s: EngineSettings) -> dict[str, EngineDefault]:
    return {} if s.max_num_seqs is not None else {"max_num_seqs": EngineDefault(8, "the fake engine's")}


SPEC = EngineSpec(
    name="fake",
    distributions=("transformers",),  # it needs only the tokenizer
    install_hint="it ships with kiln's tests",
    create=_create,
    native_keys=lambda: set(KEYS),
    native_args=lambda s: dict(s.extra),
    defaults=_defaults,
    serves_adapters=True,
    tasks=("generate", "embed"),
    speculative_methods=("ngram",),  # its counts are what prompt lookup would draft and accept (engine.py)
)
