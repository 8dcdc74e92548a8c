"""OpenAI-style model names: built, then read back to the job (and checkpoint) they name."""

from __future__ import annotations

import pytest

from api.openai.model_names import ModelRef, checkpoint_model_name, fine_tuned_model_name, parse_model_name

JOB = "job-0123456789abcdef0123"


@pytest.mark.parametrize("base", ["Qwen/Qwen2.5-0.5B", "/models/tiny", "odd:name:with:colons"])
@pytest.mark.parametrize("suffix", [None, "support bot"])
def test_names_read_back_to_their_job_and_checkpoint(base: str, suffix: str | None) -> None:
    assert parse_model_name(fine_tuned_model_name(base, suffix, JOB)) == ModelRef(JOB)
    assert parse_model_name(checkpoint_model_name(base, suffix, JOB, 40)) == ModelRef(JOB, 40)


def test_the_final_names_follow_openais_shape() -> None:
    assert fine_tuned_model_name("Qwen/Qwen2.5-0.5B", "bot", JOB) == f"ft:Qwen/Qwen2.5-0.5B:bot:{JOB}"
    assert fine_tuned_model_name("m", None, JOB) == f"ft:m::{JOB}"
    assert checkpoint_model_name("m", None, JOB, 7) == f"ft:m::{JOB}:ckpt-step-7"


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B", "ft:m:bot", "ft:m:bot:job/x", "gpt2", f"gpt-4o:{JOB}", ""])
def test_anything_else_is_not_one_of_ours(name: str) -> None:
    assert parse_model_name(name) is None


def test_a_bare_job_id_names_its_adapter() -> None:
    assert parse_model_name(JOB) == ModelRef(JOB)
