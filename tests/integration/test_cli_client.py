"""The `lora-server` client commands, run as real subprocesses against the real service."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from api.openai.model_names import fine_tuned_model_name
from cli.main import build_parser
from client.chat import terminal_safe
from launcher.embedded_redis import free_port
from tests.data import easy_records, write_jsonl
from tests.service import (
    Service,
    assert_chat_served,
    flush,
    submit,
    submit_long,
    wait_running,
    wait_until,
    wait_until_up,
)

ROOT = Path(__file__).resolve().parents[2]


def cli(
    service: Service, *args: str, timeout: float = 180, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    base_env = {k: v for k, v in os.environ.items() if k not in ("LORA_API_KEY", "LORA_URL")}
    run_env = {**base_env, "LORA_URL": service.url, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        env=run_env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_started(service: Service, *args: str) -> subprocess.Popen[str]:
    """The CLI running in the background (what a second terminal would be)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_API_KEY", "LORA_URL")}
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, env={**env, "LORA_URL": service.url, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def ended(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def test_watch_and_logs_follow_a_job_started_over_plain_http(service: Service, tiny_model_dir: Path) -> None:
    r = submit(service, tiny_model_dir, epochs=30, batch_size=2, model_save_path="by_curl")  # not the CLI's job
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    watch = cli_started(service, "watch", job_id)
    logs = cli_started(service, "logs", job_id, "--follow")
    code, _, err = ended(watch)
    assert code == 0, err
    assert f"{job_id}  training  {tiny_model_dir.name}" in err and "120/120" in err and "100%" in err, err
    assert f"{job_id} succeeded: adapter at " in err and f"(ft:{tiny_model_dir.name}::{job_id})" in err, err
    code, out, err = ended(logs)
    assert code == 0, err
    events = service.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert len(out.splitlines()) == len(events) > 10  # every event, one line each, and then it ended
    assert "Job queued" in out and "Job running on" in out and "step 120/120 loss " in out, out
    assert out.splitlines()[-1].split()[2:4] == ["status", "Training"], out  # the outcome came last
    # Without --follow: what there is so far, and done; the same lines once the job is over.
    again = cli(service, "logs", job_id)
    assert again.returncode == 0 and again.stdout == out

    # A job that ended is said at once; an unknown one is a clear error.
    done = cli(service, "watch", job_id)
    assert done.returncode == 0 and "succeeded" in done.stderr and "ETA" not in done.stderr, done.stderr
    by_name = cli(service, "watch", f"ft:{tiny_model_dir.name}::{job_id}")
    assert by_name.returncode == 0 and job_id in by_name.stderr
    unknown = cli(service, "watch", "job-nope")
    assert unknown.returncode == 1 and "404" in unknown.stderr


def _cli_env(service: Service) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_API_KEY", "LORA_URL")}
    return {**env, "LORA_URL": service.url, "PYTHONPATH": str(ROOT)}


def _assert_left_quietly(code: int, err: str) -> None:
    assert code == 141, f"exit {code}: {err}"  # what a shell reports for `yes | head`
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_output_into_a_reader_that_leaves_ends_quietly(service: Service, tiny_model_dir: Path) -> None:
    job_id = submit_long(service, tiny_model_dir)
    wait_running(service, job_id)
    # `lora-server logs JOB --follow | head -1`: head takes one line and leaves while the job still logs.
    logs = subprocess.Popen(
        [sys.executable, "-m", "cli", "logs", job_id, "--follow"], cwd=ROOT, env=_cli_env(service),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert logs.stdout is not None and logs.stderr is not None
    head = subprocess.Popen(["head", "-1"], stdin=logs.stdout, stdout=subprocess.PIPE, text=True)
    logs.stdout.close()  # head alone reads the pipe now, so its leaving closes it
    first, _ = head.communicate(timeout=60)
    with logs:  # closes its stderr pipe
        try:
            code = logs.wait(timeout=60)  # the next event's line meets the closed pipe
        finally:
            if logs.poll() is None:
                logs.kill()
        err = logs.stderr.read()
    _assert_left_quietly(code, err)
    assert len(first.splitlines()) == 1 and "status" in first, first

    # `jobs | head` and `logs JOB | head` where head left first: buffered output meets the closed pipe at the end.
    for args in (["jobs"], ["logs", job_id]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "cli", *args], cwd=ROOT, env=_cli_env(service),
                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
            )  # fmt: skip
        finally:
            os.close(write_end)
        _assert_left_quietly(done.returncode, done.stderr)
    assert service.post(f"/jobs/{job_id}/cancel").status_code == 202


def test_ended_jobs_show_no_eta_and_watch_exits_with_their_outcome(service: Service, tiny_model_dir: Path) -> None:
    # Fails as it starts: no such module to save.
    failing = submit(service, tiny_model_dir, lora_modules_to_save=["nope"]).json()["job_id"]
    code, _, err = ended(cli_started(service, "watch", failing))
    assert code == 1 and f"{failing} failed" in err and "nope" in err, err
    assert service.job(failing)["progress"]["eta_seconds"] is None
    assert service.get("/status").json()["status"] == "error" and "eta_seconds" not in service.get("/status").json()

    job_id = submit_long(service, tiny_model_dir)

    def eta_shown() -> dict[str, Any] | None:  # once the rate is known (a warm-up, then ~2 s of steps)
        status = service.get("/status").json()
        return status if status.get("eta_seconds") is not None else None

    assert wait_until(eta_shown, timeout=120)["job_id"] == job_id
    watch = cli_started(service, "watch", job_id)
    wait_until(lambda: service.job(job_id)["progress"]["current_step"] >= 20, timeout=60)
    assert service.post(f"/jobs/{job_id}/cancel").status_code == 202
    code, _, err = ended(watch)
    assert code == 3 and f"{job_id} cancelled" in err, err
    assert "ETA" not in err.strip().splitlines()[-2], err  # the last progress line says `cancelled` instead
    status = service.get("/status").json()
    assert status["job_id"] == job_id and status["job_status"] == "cancelled" and "eta_seconds" not in status
    job = service.job(job_id)
    assert job["progress"]["eta_seconds"] is None and job["progress"]["current_step"] >= 20
    shown = cli(service, "status", job_id)
    assert "ETA" not in shown.stdout and "cancelled" in shown.stdout, shown.stdout


def test_submit_follow_trains_then_status_jobs_and_download_work(
    service: Service, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", easy_records(8))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_name": str(tiny_model_dir), "epochs": 2, "learning_rate": 3e-3}))
    done = cli(service, "submit", str(data), "--config", str(config),
               "--set", "epochs=10", "--set", "batch_size=4", "--set", "model_save_path=cli_adapter", "--follow")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.splitlines()[0]
    assert job_id.startswith("job-")
    assert "20/20" in done.stderr and "100%" in done.stderr and "loss " in done.stderr, done.stderr
    assert "succeeded" in done.stderr and "cli_adapter" in done.stderr

    job = service.get(f"/jobs/{job_id}").json()
    assert job["config"]["epochs"] == 10 and job["config"]["batch_size"] == 4  # --set values parsed as JSON
    assert job["config"]["learning_rate"] == 3e-3  # from --config
    assert job["config"]["model_save_path"] == "cli_adapter"  # not JSON: kept as a string

    status = cli(service, "status")
    assert status.returncode == 0 and status.stdout.startswith(f"completed  {job_id}"), status.stdout
    assert "20/20" in status.stdout and "cli_adapter" in status.stdout
    one = cli(service, "status", job_id, "--json")
    assert json.loads(one.stdout)["status"] == "succeeded"

    jobs = cli(service, "jobs", "--status", "succeeded")
    assert jobs.returncode == 0 and job_id in jobs.stdout, jobs.stdout
    assert job_id not in cli(service, "jobs", "--status", "failed").stdout

    dest = tmp_path / "downloaded"
    got = cli(service, "download", job_id, str(dest))
    assert got.returncode == 0, got.stderr
    adapter = service.base_path / "cli_adapter"
    assert (dest / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()
    expected = sorted(p.relative_to(adapter).as_posix() for p in adapter.rglob("*") if p.is_file())
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == expected
    for name in expected:
        assert (dest / name).read_bytes() == (adapter / name).read_bytes(), name

    # Nothing to cancel any more: an error, said plainly, and a non-zero exit.
    late = cli(service, "cancel", job_id)
    assert late.returncode == 1 and "409" in late.stderr and "already ended" in late.stderr


def test_a_failing_job_makes_follow_exit_non_zero(service: Service, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", easy_records(2))
    done = cli(service, "submit", str(data), "--set", f"model_name={tiny_model_dir}",
               "--set", 'lora_modules_to_save=["nope"]', "--follow")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed" in done.stderr and "nope" in done.stderr
    job_id = done.stdout.splitlines()[0]
    assert service.get(f"/jobs/{job_id}").json()["status"] == "failed"
    gone = cli(service, "download", job_id, str(tmp_path / "nothing"))
    assert gone.returncode == 1 and "no adapter" in gone.stderr


def test_cancel_stops_a_followed_job_which_then_exits_non_zero(
    service: Service, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", easy_records(8))
    env = {k: v for k, v in os.environ.items() if k != "LORA_API_KEY"}
    follower = subprocess.Popen(
        [sys.executable, "-m", "cli", "submit", str(data), "--url", service.url,
         "--set", f"model_name={tiny_model_dir}", "--set", "epochs=400", "--set", "batch_size=2", "--follow"],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        job_id = follower.stdout.readline().strip()
        assert job_id.startswith("job-"), follower.communicate(timeout=30)
        wait_running(service, job_id, min_step=2)
        cancelled = cli(service, "cancel", job_id)
        assert cancelled.returncode == 0 and "cancelling" in cancelled.stdout, cancelled.stderr
        _, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 3, err
    assert "cancelled" in err and "/1600" in err
    assert service.get(f"/jobs/{job_id}").json()["status"] == "cancelled"


def test_submit_queue_waits_for_the_slot_and_pause_resume_hand_it_over(
    service: Service, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = str(write_jsonl(tmp_path / "train.jsonl", easy_records(8)))
    model = f"model_name={tiny_model_dir}"
    first = cli(service, "submit", data, "--set", model, "--set", "epochs=400", "--set", "batch_size=2")
    first_id = first.stdout.strip()
    wait_running(service, first_id, min_step=2)
    busy = cli(service, "submit", data, "--set", model)
    assert busy.returncode == 1 and "every training slot is taken" in busy.stderr
    queued = cli(service, "submit", data, "--set", model, "--queue")
    assert queued.returncode == 0 and "waiting for a free slot (position 1)" in queued.stderr, queued.stderr
    second_id = queued.stdout.strip()

    paused = cli(service, "pause", first_id)
    assert paused.returncode == 0 and f"{first_id} pausing" in paused.stdout, paused.stderr
    service.wait_for(first_id, {"paused"}, timeout=60)
    assert service.wait_for(second_id, {"succeeded", "failed"})["status"] == "succeeded"  # it got the slot
    # Read before resuming: a worker that kept the base loaded is at its next step within a second.
    paused_at = service.job(first_id)["progress"]["current_step"]
    resumed = cli(service, "resume", first_id)
    assert resumed.returncode == 0 and f"{first_id} queued" in resumed.stdout, resumed.stderr

    def resumed() -> dict[str, Any] | None:
        events = service.get(f"/jobs/{first_id}/events", params={"limit": 1000}).json()["data"]
        return next((e for e in events if e["message"].startswith("resuming from step")), None)

    event = wait_until(resumed, timeout=60, what=lambda: service.logs("worker"))
    assert event["data"]["resumed_step"] == paused_at > 2  # it continued where it stopped, not from step 0
    assert cli(service, "cancel", first_id).returncode == 0
    again = cli(service, "resume", second_id)
    assert again.returncode == 1 and "only a paused job can be resumed" in again.stderr


def test_bad_input_and_missing_key_are_clear_errors(tmp_path: Path, redis_url: str, tiny_model_dir: Path) -> None:
    flush(redis_url)
    svc = Service(base_path=tmp_path / "base", redis_url=redis_url, log_dir=tmp_path / "logs",
                  env_extra={"LORA_API_KEY": "k3y"})  # fmt: skip
    svc.start()
    try:
        denied = cli(svc, "jobs")
        assert denied.returncode == 1 and "401" in denied.stderr
        assert cli(svc, "jobs", LORA_API_KEY="k3y").returncode == 0
        assert cli(svc, "status", "--api-key", "k3y").stdout.startswith("idle")

        data = write_jsonl(tmp_path / "train.jsonl", easy_records(2))
        bad = cli(svc, "submit", str(data), "--set", "epochs=three", LORA_API_KEY="k3y")
        assert bad.returncode == 1 and "422" in bad.stderr and "epochs" in bad.stderr
        unknown = cli(svc, "status", "job-nope", LORA_API_KEY="k3y")
        assert unknown.returncode == 1 and "404" in unknown.stderr
        assert cli(svc, "submit", str(tmp_path / "missing.jsonl")).returncode != 0
    finally:
        svc.stop()
    unreachable = cli(svc, "status")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_serve_is_an_alias_of_the_bare_command(tmp_path: Path) -> None:
    bare = build_parser().parse_args(["--base_path", "/data", "--port", "9001"])
    alias = build_parser().parse_args(["serve", "--base_path", "/data", "--port", "9001"])
    before = build_parser().parse_args(["--port", "9002", "serve"])
    assert bare.command is None and alias.command == "serve"
    assert (bare.base_path, bare.port) == (alias.base_path, alias.port) == (Path("/data"), 9001)
    assert before.port == 9002 and before.host == "127.0.0.1"

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_REDIS_URL", "LORA_API_KEY", "LORA_URL")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LORA_MIN_FREE_DISK_MB": "1"})
    cmd = [sys.executable, "-m", "cli", "serve", "--base_path", str(tmp_path / "models"), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_up(url + "/readyz", proc, timeout=60), "`serve` did not become ready"
        status = subprocess.run([sys.executable, "-m", "cli", "status", "--url", url],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0 and status.stdout.startswith("idle"), status.stdout + status.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_merge_command_writes_a_loadable_full_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from tests.data import easy_records
    from worker.training import TrainConfig, train_model

    train_model(TrainConfig(model_name=str(tiny_model_dir), epochs=1), easy_records(4), output_dir=tmp_path / "adapter")
    out = subprocess.run(
        [sys.executable, "-m", "cli", "merge", str(tmp_path / "adapter"), str(tmp_path / "merged")],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.config.model_type == "qwen2"
    assert not any("lora" in name for name, _ in model.named_parameters())


def _completion(service: Service, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The whole answer in one piece (no stream), greedy: what the streamed one must add up to."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = service.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, f"needs the chat branch (POST /v1/chat/completions): {r.status_code} {r.text}"
    return str(r.json()["choices"][0]["message"]["content"])


def test_chat_streams_the_answer_and_models_lists_the_jobs_fine_tuned_name(
    service: Service, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Needs the chat surface (`/v1/models`, `/v1/chat/completions` and a generation worker, branch `chat`)."""
    assert_chat_served(service)
    data = write_jsonl(tmp_path / "train.jsonl", easy_records(8))
    done = cli(service, "submit", str(data), "--set", f"model_name={tiny_model_dir}", "--set", "epochs=1", "--follow")
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.splitlines()[0]
    ft_name = fine_tuned_model_name(tiny_model_dir.name, None, job_id)  # the base's one name

    models = cli(service, "models")
    assert models.returncode == 0, models.stderr
    row = next((line for line in models.stdout.splitlines() if line.split()[:1] == [ft_name]), None)
    assert row is not None, models.stdout
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", row), row  # owner, then when it was created
    listed = json.loads(cli(service, "models", "--json").stdout)
    assert ft_name in [m["id"] for m in listed["data"]]

    # Greedy, so the streamed answer adds up to the one-piece answer, whichever name the model goes by.
    question = [{"role": "user", "content": "What color is the sky?"}]
    expected = terminal_safe(_completion(service, job_id, question, 12))  # what a terminal may be shown
    by_job = cli(service, "chat", job_id, "What color is the sky?", "--max-tokens", "12", "--temperature", "0")
    assert by_job.returncode == 0, by_job.stderr
    assert by_job.stdout == expected + "\n" and expected, (by_job.stdout, expected)  # (a tiny random model: any text)
    by_name = cli(service, "chat", ft_name, "What color is the sky?", "--max-tokens", "12", "--temperature", "0")
    assert by_name.returncode == 0 and by_name.stdout == by_job.stdout, by_name.stderr

    # The question from stdin, with a system prompt; and the base model alone.
    with_system = [{"role": "system", "content": "Answer briefly."}, *question]
    expected = terminal_safe(_completion(service, ft_name, with_system, 8))
    piped = cli(service, "chat", ft_name, "-", "--system", "Answer briefly.", "--max-tokens", "8",
                "--temperature", "0", stdin="What color is the sky?")  # fmt: skip
    assert piped.returncode == 0 and piped.stdout == expected + "\n", (piped.stdout, piped.stderr, expected)
    base = cli(service, "chat", str(tiny_model_dir), "Hello", "--max-tokens", "4")
    assert base.returncode == 0, base.stderr

    # An unknown model: the API's own message, and a non-zero exit.
    unknown = cli(service, "chat", "ft:nope::job-doesnotexist", "Hello")
    assert unknown.returncode == 1 and unknown.stdout == "", unknown.stdout
    assert "HTTP 4" in unknown.stderr and "job-doesnotexist" in unknown.stderr, unknown.stderr


def test_chat_argument_errors_are_clear(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_API_KEY", "LORA_URL")}
    env.update({"PYTHONPATH": str(ROOT), "LORA_URL": f"http://127.0.0.1:{free_port()}"})  # nothing listens there

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, input=stdin,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    empty = run("chat", "job-abc", "-", stdin="  \n")
    assert empty.returncode == 1 and "question is empty (nothing on stdin)" in empty.stderr, empty.stderr
    assert run("chat", "job-abc", "").returncode == 1
    no_question = run("chat", "job-abc")
    assert no_question.returncode == 2 and "required: question" in no_question.stderr
    bad_number = run("chat", "job-abc", "hi", "--max-tokens", "lots")
    assert bad_number.returncode == 2 and "--max-tokens: invalid int value: 'lots'" in bad_number.stderr
    unreachable = run("models")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
