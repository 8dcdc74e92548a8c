"""The two error tables: every domain error has a native status and an OpenAI shape, and they agree."""

from __future__ import annotations

import json

import pytest

from api import errors as e
from api.error_responses import STATUS, lookup, native_response
from api.openai.errors import SHAPES, openai_response


def _all(cls: type[e.ServiceError]) -> list[type[e.ServiceError]]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _all(direct))]


DOMAIN_ERRORS = _all(e.ServiceError)[1:]


@pytest.mark.parametrize("cls", DOMAIN_ERRORS, ids=[c.__name__ for c in DOMAIN_ERRORS])
def test_every_domain_error_has_an_entry_in_both_tables(cls: type[e.ServiceError]) -> None:
    native, shape = lookup(STATUS, cls), lookup(SHAPES, cls)
    assert 400 <= native < 600
    # OpenAI answers request validation with 400 where we answer 422, and a cancel or pause in the wrong state with 400.
    expected = 400 if native == 422 or cls in (e.JobAlreadyEnded, e.NotPausable) else native
    assert shape.status == expected, cls


def test_a_domain_error_reads_the_same_in_both_bodies() -> None:
    exc = e.SlotsBusy(["job-a"])
    native = json.loads(native_response(exc).body)
    assert native == {"detail": exc.message, "running_jobs": ["job-a"]}
    openai = json.loads(openai_response(exc).body)["error"]
    assert openai == {"message": exc.message, "type": "conflict_error", "param": None, "code": "training_slots_full"}


def test_the_first_problem_names_the_openai_param() -> None:
    exc = e.InvalidInput("epochs: too small", problems=[e.field_error(["config", "epochs"], "too small")])
    assert json.loads(native_response(exc).body)["errors"] == [{"loc": ["config", "epochs"], "msg": "too small"}]
    assert json.loads(openai_response(exc).body)["error"]["param"] == "config"
