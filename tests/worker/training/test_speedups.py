"""Compiling and capturing are decided per job from its steps and shapes; graphs go to the most used shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.worker.helpers import make_examples, tiny_lora_model
from worker.training import speedups
from worker.training.graph_cache import GraphCache
from worker.training.loop import batch_order
from worker.training.packing import pack_static
from worker.training.speedups import compile_cache_key, compile_cached, mark_compiled, plan_speedups, step_shapes

CUDA = torch.device("cuda")  # only its type is read: the plan is host arithmetic


def seed_job(records: int = 200, epochs: int = 3, batch_size: int = 4) -> tuple[list, list[list[int]]]:
    """Chats of 60-410 tokens (the GPU check's spread) and every batch of the job, as the loop orders them."""
    examples = make_examples([60 + (i * 37) % 350 for i in range(records)], seed=1)
    batches = [b for epoch in range(1, epochs + 1) for b in batch_order(records, batch_size, epoch, seed=42)]
    return examples, batches


def test_step_shapes_are_the_keys_the_static_step_packs() -> None:
    examples, batches = seed_job(records=40, epochs=1)
    shapes = step_shapes(examples, batches)
    packed = [pack_static([examples[i] for i in b], max_sequences=4) for b in batches]
    want: dict[tuple[int, int], int] = {}
    for p in packed:
        key = (len(p.input_ids), len(p.targets))
        want[key] = want.get(key, 0) + 1
    assert dict(shapes) == want and sum(shapes.values()) == len(batches)


def test_the_seed_default_job_gets_graphs_and_no_cold_compile() -> None:
    examples, batches = seed_job()
    plan = plan_speedups(tiny_lora_model(), examples, batches, device=CUDA, compile=None, cuda_graphs=None)
    assert plan.cuda_graphs and not plan.compile
    assert sum(plan.expected.values()) == len(batches) == 150
    assert "pays from" in plan.describe() and "CUDA graphs" in plan.describe()


def test_compiling_pays_for_a_long_job_and_sooner_from_a_warm_cache() -> None:
    """Uncaptured steps (a tiny model's device time is nothing: what compiling saves there is launches)."""
    model = tiny_lora_model()
    examples, batches = seed_job()
    assert not plan_speedups(model, examples, batches, device=CUDA, compile=None, cuda_graphs=False).compile
    long_batches = batches * 200  # 30k steps
    assert plan_speedups(model, examples, long_batches, device=CUDA, compile=None, cuda_graphs=False).compile

    def pays_from(cached: bool) -> int:
        steps = 1
        while not plan_speedups(model, examples, batches[:1] * steps, device=CUDA, compile=None, cuda_graphs=False,
                                compile_cached=cached).compile:  # fmt: skip
            steps *= 2
        return steps

    assert pays_from(cached=True) < pays_from(cached=False)


def test_rare_shapes_get_no_graph_and_a_job_of_only_rare_shapes_none() -> None:
    examples = make_examples([(256 << i) + 1 for i in range(6)])
    batches = [[i] for i in range(6)]  # six steps, each of its own shape
    plan = plan_speedups(tiny_lora_model(), examples, batches, device=CUDA, compile=None, cuda_graphs=None)
    assert not plan.cuda_graphs and "would not pay" in plan.describe()


def test_what_is_configured_is_obeyed_and_a_cpu_runs_eager_steps() -> None:
    examples, batches = seed_job(records=20, epochs=1)
    model = tiny_lora_model()
    forced = plan_speedups(model, examples, batches, device=CUDA, compile=True, cuda_graphs=False)
    assert forced.compile and not forced.cuda_graphs and "as configured" in forced.describe()
    cpu = plan_speedups(model, examples, batches, device=torch.device("cpu"), compile=None, cuda_graphs=None)
    assert not cpu.compile and not cpu.cuda_graphs


def test_the_graph_cache_keeps_the_most_used_shapes() -> None:
    cache: GraphCache[str] = GraphCache(2)
    for key, steps in (((256, 256), 5), ((320, 256), 3), ((384, 256), 2)):
        for _ in range(steps):
            cache.count(key)
            if cache.wants(key):
                cache.make_room()
                cache.add(key, f"graph{key}")
    assert set(cache.graphs) == {(256, 256), (320, 256)}  # full: the twice-seen shape does not displace them
    for _ in range(4):
        cache.count((384, 256))
    assert cache.wants((384, 256))  # now used 6 times: it takes the least used graph's place
    assert cache.make_room() == "graph(320, 256)"
    cache.add((384, 256), "graph(384, 256)")
    assert set(cache.graphs) == {(256, 256), (384, 256)} and cache.evicted == 1


def test_the_graph_cache_waits_for_a_warm_up_and_skips_planned_rare_shapes() -> None:
    cache: GraphCache[str] = GraphCache(8, expected={(256, 256): 10, (320, 256): 2})
    cache.count((256, 256))
    assert not cache.wants((256, 256))  # its first step warms it up eagerly
    cache.count((256, 256))
    assert cache.wants((256, 256))
    cache.count((320, 256))
    cache.count((320, 256))
    assert not cache.wants((320, 256))  # planned to come twice: a capture would not repay itself


def test_a_shape_that_failed_stays_eager_and_the_other_graphs_stay() -> None:
    cache: GraphCache[str] = GraphCache(8)
    for key in ((256, 256), (320, 256)):
        cache.count(key)
        cache.count(key)
        cache.add(key, f"graph{key}")
    assert cache.disable((320, 256), "first replay disagreed") == "graph(320, 256)"
    cache.count((320, 256))
    assert not cache.wants((320, 256)) and cache.get((256, 256)) == "graph(256, 256)"
    with pytest.raises(ValueError):
        GraphCache(4, min_steps=1)


def test_a_compiled_model_shape_is_remembered_in_the_shared_cache(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    model = tiny_lora_model()
    key = compile_cache_key(model)
    assert key == compile_cache_key(tiny_lora_model()) and key != compile_cache_key(tiny_lora_model(hidden_size=32))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    mark_compiled(key)  # nowhere shared to remember it: nothing happens
    assert not compile_cached(key)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert not compile_cached(key)
    mark_compiled(key)
    assert compile_cached(key) and speedups.compile_cache_dir() == tmp_path
