"""Small datasets for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FACTS = [
    ("What color is the sky?", "It is blue."),
    ("What color is grass?", "It is green."),
    ("What is two plus two?", "Four."),
    ("Name a fruit.", "An apple."),
    ("What do cats say?", "Meow."),
    ("What is the opposite of hot?", "Cold."),
    ("How many legs does a dog have?", "Four legs."),
    ("What is frozen water called?", "Ice."),
]


def easy_records(n: int = 8) -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (FACTS * (n // len(FACTS) + 1))[:n]
    ]


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(jsonl(records))
    return path


def preference_records(n: int = 8) -> list[dict[str, Any]]:
    """OpenAI DPO records: each fact's answer preferred over another fact's (wrong) answer."""
    answers = [a for _, a in FACTS]
    return [
        {
            "input": {"messages": [{"role": "user", "content": q}]},
            "preferred_output": [{"role": "assistant", "content": a}],
            "non_preferred_output": [{"role": "assistant", "content": answers[(i + 3) % len(answers)]}],
        }
        for i, (q, a) in enumerate((FACTS * (n // len(FACTS) + 1))[:n])
    ]
