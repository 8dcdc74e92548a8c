"""api.base_models' rule on its own, in process, over real folders, a real hub cache layout and, for the hub
check, a real HTTP server standing in for the hub (HF_ENDPOINT). The same names against the running service,
on both submission surfaces: tests/integration/test_base_models.py."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.base_models import ModelRefused, check_base_model, hub_cache, hub_offline, servable_location
from shared.settings import Settings


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    base, models = tmp_path / "base", tmp_path / "models"
    _model(base / "bases" / "tiny")
    _model(models / "shared-tiny")
    (base / "empty").mkdir()
    (base / "link-out").symlink_to(models / "shared-tiny")  # a model, but outside base_path
    (base / "dangling").symlink_to(tmp_path / "nowhere")
    (models / "link-in").symlink_to(models / "shared-tiny")  # stays inside its models directory
    return Settings(base_path=base, models_dir=[models], redis_url="redis://unused")


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("../../etc", "contains a '..' component"),
        ("bases/../../x", "contains a '..' component"),
        ("/etc", "is an absolute path outside base_path and every models directory"),
        ("link-out", "resolves outside base_path (through '..' or a symlink)"),
        ("dangling", "cannot be resolved under base_path"),
        ("a\x00b", "contains a control character"),
        ("a\nb", "contains a control character"),
        ("\ud800", "lone surrogate"),
        ("", "model name is empty"),
        ("x" * 2000, "longer than 1024 characters"),
        ("empty", "is not a model folder: it has no config.json"),
        ("tiny-typo", "is neither a model folder"),
        ("org/name/extra", "is neither a model folder"),
        ("-org/name", "is neither a model folder"),
        ("org/name.", "is neither a model folder"),
        ("org--x/name", "is neither a model folder"),
        ("org/na..me", "is neither a model folder"),
        ("org/uncached", "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
    ],
)
def test_a_name_outside_the_rule_is_refused_saying_which_rule(settings: Settings, name: str, rule: str) -> None:
    with pytest.raises(ModelRefused) as refused:
        check_base_model(settings, name)
    assert rule in str(refused.value)
    listed = servable_location(settings, name)  # a listing never asks the hub: the form is enough there
    assert listed is None or (rule.startswith("is not in the local") and listed == name)


def test_each_kind_of_model_is_accepted_with_what_the_worker_loads(settings: Settings) -> None:
    base, (models,) = settings.base_path, settings.models_dir
    for name, location in [
        ("bases/tiny", base / "bases" / "tiny"),
        (str(base / "bases" / "tiny"), base / "bases" / "tiny"),
        ("shared-tiny", models / "shared-tiny"),
        (str(models / "shared-tiny"), models / "shared-tiny"),
        ("link-in", models / "shared-tiny"),
    ]:
        accepted = check_base_model(settings, name)
        assert (accepted.location, accepted.is_folder) == (str(location.resolve()), True), name
    cached = check_base_model(settings, "Qwen/Qwen2.5-0.5B")  # in the test's hub cache (tests/api/conftest.py)
    assert (cached.location, cached.is_folder) == ("Qwen/Qwen2.5-0.5B", False)


def test_a_folder_under_base_path_wins_over_a_hub_id_of_the_same_name(settings: Settings) -> None:
    _model(settings.base_path / "Qwen" / "Qwen2.5-0.5B")
    assert check_base_model(settings, "Qwen/Qwen2.5-0.5B").location == str(settings.base_path / "Qwen/Qwen2.5-0.5B")


def test_the_allow_list_takes_patterns_matched_against_the_name_as_given(settings: Settings) -> None:
    allowed = settings.model_copy(update={"allowed_models": ["bases/*", "Qwen/*"]})
    assert check_base_model(allowed, "bases/tiny").is_folder
    assert check_base_model(allowed, "Qwen/Qwen2.5-0.5B").location == "Qwen/Qwen2.5-0.5B"
    for name in ("shared-tiny", str(settings.base_path / "bases" / "tiny"), "other/model"):
        with pytest.raises(ModelRefused, match=r"not in this deployment's allowed models \(LORA_ALLOWED_MODELS\)"):
            check_base_model(allowed, name)


def test_the_settings_take_lists_as_commas_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_MODELS_DIR", "/a, /b")
    monkeypatch.setenv("LORA_ALLOWED_MODELS", '["Qwen/*", "bases/*"]')
    settings = Settings()
    assert (settings.models_dir, settings.allowed_models) == ([Path("/a"), Path("/b")], ["Qwen/*", "bases/*"])
    monkeypatch.setenv("LORA_ALLOWED_MODELS", "Qwen/*,bases/*")
    assert Settings().allowed_models == ["Qwen/*", "bases/*"]


def test_the_hub_cache_and_offline_mode_are_read_from_the_environment_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache() == tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not hub_offline()


# --------------------------------------------------------------------------- online: a stand-in hub


class _Hub(http.server.BaseHTTPRequestHandler):
    """`GET /api/models/org/exists` is a model; any other repo is not (the hub's 404 with RepoNotFound)."""

    def do_GET(self) -> None:
        if self.path.lower().startswith("/api/models/org/exists"):  # the hub finds a repo whatever its case
            body = json.dumps({"id": "org/exists", "sha": "a" * 40, "private": False}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
        else:
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The hub at a local server, and this process online (huggingface_hub read HF_HUB_OFFLINE at its import)."""
    import huggingface_hub.constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    try:
        yield url
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_online_a_hub_id_not_in_the_cache_is_asked_of_the_hub(settings: Settings, online: str) -> None:
    assert check_base_model(settings, "org/exists").location == "org/exists"
    with pytest.raises(ModelRefused, match="'org/missing' is not a model on the Hugging Face hub"):
        check_base_model(settings, "org/missing")
    assert servable_location(settings, "org/missing") == "org/missing"  # a listing never asks the hub


def test_online_an_unreachable_hub_is_a_refusal_at_once(
    settings: Settings, online: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # nothing listens there
    with pytest.raises(ModelRefused, match="is not in the local Hugging Face cache and the hub could not be reached"):
        check_base_model(settings, "org/exists")


# --------------------------------------------------------------------------- one name per model


def test_every_spelling_of_a_folder_gives_one_canonical_name(settings: Settings) -> None:
    base, (models,) = settings.base_path, settings.models_dir
    (base / "alias").symlink_to(base / "bases")  # a link inside base_path, to the same folder
    under_base = str((base / "bases" / "tiny").resolve())
    for name in ("bases/tiny", "bases/tiny/", "./bases/tiny", under_base, under_base + "/", f"{base}/./bases/tiny",
                 "alias/tiny"):  # fmt: skip
        accepted = check_base_model(settings, name)
        assert (accepted.canonical, accepted.location) == ("bases/tiny", under_base), name
    in_models = str((models / "shared-tiny").resolve())
    for name in ("shared-tiny", in_models, "link-in", f"{models}/link-in/"):
        accepted = check_base_model(settings, name)
        assert (accepted.canonical, accepted.location) == ("shared-tiny", in_models), name


def test_a_folder_whose_relative_name_means_another_folder_is_named_by_its_absolute_path(settings: Settings) -> None:
    (models,) = settings.models_dir
    _model(models / "bases" / "tiny")  # "bases/tiny" names base_path's folder: the rule looks there first
    shadowed = str((models / "bases" / "tiny").resolve())
    assert check_base_model(settings, shadowed).canonical == shadowed


def test_the_canonical_name_is_one_the_allow_list_accepts(settings: Settings) -> None:
    absolute = str((settings.base_path / "bases" / "tiny").resolve())
    only_paths = settings.model_copy(update={"allowed_models": ["/*"]})
    assert check_base_model(only_paths, absolute).canonical == absolute  # "bases/tiny" is not allowed
    both = settings.model_copy(update={"allowed_models": ["/*", "bases/*"]})
    assert check_base_model(both, absolute).canonical == "bases/tiny"


def test_a_hub_id_is_named_as_the_cache_spells_it(settings: Settings) -> None:
    for name in ("Qwen/Qwen2.5-0.5B", "qwen/qwen2.5-0.5b", "QWEN/Qwen2.5-0.5B/", "Qwen/Qwen2.5-0.5B/"):
        accepted = check_base_model(settings, name)  # in the test's hub cache (tests/api/conftest.py)
        assert (accepted.canonical, accepted.location, accepted.is_folder) == (
            "Qwen/Qwen2.5-0.5B",
            "Qwen/Qwen2.5-0.5B",
            False,
        ), name


def test_online_a_hub_id_is_named_as_the_hub_spells_it(settings: Settings, online: str) -> None:
    accepted = check_base_model(settings, "ORG/Exists")  # the stand-in hub answers any case with its id
    assert (accepted.canonical, accepted.location) == ("org/exists", "org/exists")
