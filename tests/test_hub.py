"""Pushing models to the hub (`hub.py`): against a stand-in of huggingface_hub's upload API.

The stand-in replaces `huggingface_hub.HfApi`: it records every create_repo/upload_folder/upload_file
call and the files the uploaded folder held at that moment, and can fail an upload with the 503 the
real client raises. One test runs the real client against a loopback server, for its errors.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml
from huggingface_hub.errors import HfHubHTTPError

from constitutional import hub
from constitutional.cli import main
from constitutional.config import load_config
from constitutional.errors import ServiceError, UserError
from constitutional.rundir import RunDir

from conftest import cai_error_line, tiny_config_data

TOKEN = "hf_TestTokenNeverPrinted123"


class FakeHub:
    """What the hub was asked: calls in order, with the uploaded folder's files."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.tokens: list[str | None] = []
        self.fail_uploads = 0  # the next N upload_folder calls answer 503

    def api(self, token: str | None = None, **_: object) -> FakeApi:
        self.tokens.append(token)
        return FakeApi(self)

    def named(self, name: str) -> list[dict]:
        return [call for call in self.calls if call["call"] == name]


class FakeApi:
    def __init__(self, fake: FakeHub) -> None:
        self.fake = fake

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, **_: object) -> str:
        self.fake.calls.append({"call": "create_repo", "repo": repo_id, "private": private, "exist_ok": exist_ok})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: str, commit_message: str | None = None, **kwargs: object):
        folder = Path(folder_path)
        files = {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
        self.fake.calls.append(
            {"call": "upload_folder", "repo": repo_id, "message": commit_message, "files": files, **kwargs}
        )
        if self.fake.fail_uploads:
            self.fake.fail_uploads -= 1
            request = huggingface_hub.utils.httpx.Request("POST", f"https://huggingface.co/api/models/{repo_id}/commit")
            response = huggingface_hub.utils.httpx.Response(503, request=request)
            raise HfHubHTTPError("503 Server Error: Service Unavailable for url: ...", response=response)
        return SimpleNamespace(oid="c0ffee01", commit_url=f"https://huggingface.co/{repo_id}/commit/c0ffee01")

    def upload_file(self, *, path_or_fileobj: str, path_in_repo: str, repo_id: str, commit_message: str | None = None,
                    **_: object):  # fmt: skip
        content = Path(path_or_fileobj).read_text(encoding="utf-8")
        self.fake.calls.append(
            {
                "call": "upload_file",
                "repo": repo_id,
                "path": path_in_repo,
                "content": content,
                "message": commit_message,
            }
        )
        return SimpleNamespace(oid="c0ffee02", commit_url=f"https://huggingface.co/{repo_id}/commit/c0ffee02")


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(hub, "hub_offline", lambda: False)  # the tests' HF_HUB_OFFLINE=1 is for downloads
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return fake


@pytest.fixture
def config_file(tmp_path, tiny_model_dir):
    def write(**hub_section) -> Path:
        data = tiny_config_data(tiny_model_dir, tmp_path, hub=hub_section)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def cai(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def test_sl_cai_is_pushed_once_with_weights_tokenizer_and_card(fake_hub, config_file, tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    args = ["run", str(config_file(sl_cai="me/sl-cai")), "--run-dir", str(run_dir), "--stages", "critique,sl"]
    code, err = cai(args, capsys)
    assert code == 0, err
    assert [call["call"] for call in fake_hub.calls] == ["create_repo", "upload_folder"]
    create, upload = fake_hub.calls
    assert create == {"call": "create_repo", "repo": "me/sl-cai", "private": True, "exist_ok": True}
    assert upload["repo"] == "me/sl-cai" and fake_hub.tokens == [TOKEN]
    assert upload["message"] == "models/sl-cai from stage sl of run run"
    assert upload["delete_patterns"] == ["*"]  # the repository mirrors the folder
    files = upload["files"]
    assert "model.safetensors" in files and "config.json" in files and "tokenizer_config.json" in files
    assert "tokenizer.json" in files and "training_summary.json" in files
    assert not any(name.endswith(".bin") or name.endswith(".tmp") for name in files), sorted(files)
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers\n") and "# SL-CAI" in card and "stage `eval`" in card
    pushed = manifest(run_dir)["stages"]["sl"]["hub"]
    assert pushed["repo"] == "me/sl-cai" and pushed["commit"] == "c0ffee01"
    assert pushed["model"] == RunDir(run_dir).fingerprint("sl_cai")
    assert TOKEN not in err and TOKEN not in caplog.text and TOKEN not in (run_dir / "config.yaml").read_text()
    assert not list((run_dir / "models").glob(".*"))  # the card's temporary file is gone

    # The same command again: nothing to train, nothing left to push.
    code, err = cai(args, capsys)
    assert code == 0, err
    assert len(fake_hub.calls) == 2

    # Stage eval writes the real card over the provisional one: it goes up alone, once.
    eval_args = ["run", str(config_file(sl_cai="me/sl-cai")), "--run-dir", str(run_dir), "--stages", "eval"]
    code, err = cai(eval_args, capsys)
    assert code == 0, err
    assert [call["call"] for call in fake_hub.calls[2:]] == ["upload_file"]
    card_upload = fake_hub.calls[2]
    assert card_upload["repo"] == "me/sl-cai" and card_upload["path"] == "README.md"
    assert card_upload["content"] == (run_dir / "models" / "sl-cai" / "README.md").read_text()
    assert "## Evaluation" in card_upload["content"]
    assert card_upload["message"] == "model card of models/sl-cai from stage eval of run run"
    code, err = cai(eval_args, capsys)
    assert code == 0 and len(fake_hub.calls) == 3, err


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_hub_id_without_a_token_is_refused_before_anything_is_written(
    fake_hub, config_file, tmp_path, capsys, monkeypatch, command
):
    monkeypatch.delenv("HF_TOKEN")
    run_dir = tmp_path / "run"
    path = config_file(sl_cai="me/sl-cai")
    code, err = cai([command, str(path), "--run-dir", str(run_dir), "--stages", "critique,sl"], capsys)
    assert code == 2
    line = cai_error_line(err)
    assert line.startswith("cai: error: hub.sl_cai: needs a token in HF_TOKEN"), line
    assert not run_dir.exists() and not fake_hub.calls
    monkeypatch.setenv("HF_TOKEN", "  ")  # empty is unset
    code, err = cai([command, str(path), "--run-dir", str(run_dir), "--stages", "sl"], capsys)
    assert code == 2 and "hub.sl_cai: needs a token in HF_TOKEN" in cai_error_line(err)
    # Another variable, named by hub.token_env; and a command that pushes nothing needs none.
    code, err = cai(["plan", str(config_file(pm="me/pm", token_env="MY_HUB_TOKEN")), "--run-dir", str(run_dir)], capsys)
    assert code == 2 and cai_error_line(err).startswith("cai: error: hub.pm: needs a token in MY_HUB_TOKEN")
    code, err = cai(["plan", str(path), "--run-dir", str(run_dir), "--stages", "critique"], capsys)
    assert code == 0, err
    assert not run_dir.exists()


def test_offline_mode_is_refused_before_anything_is_written(fake_hub, config_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hub, "hub_offline", lambda: True)
    path = config_file(rl_cai="me/rl-cai")
    code, err = cai(["plan", str(path), "--run-dir", str(tmp_path / "run"), "--stages", "rl"], capsys)
    assert code == 2 and cai_error_line(err).startswith("cai: error: hub.rl_cai: HF_HUB_OFFLINE is set")


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"sl_cai": "sl-cai"}, "hub.sl_cai: expected a repository id of the form owner/name"),
        ({"sl_cai": "me/sl cai"}, "hub.sl_cai: expected a repository id of the form owner/name"),
        ({"pm": "me/pm/extra"}, "hub.pm: expected a repository id of the form owner/name"),
        ({"rl_cai": "me/"}, "hub.rl_cai: expected a repository id of the form owner/name"),
        ({"rl_cai": "-me/rl"}, "hub.rl_cai: expected a repository id of the form owner/name"),
        ({"rl_cai": "me/rl--cai"}, "hub.rl_cai: expected a repository id of the form owner/name"),
        ({"sl_cai": 7}, "hub.sl_cai: expected a string, got 7"),
        ({"sl_cai": "me/cai", "rl_cai": "Me/CAI"}, "hub.rl_cai: Me/CAI is also hub.sl_cai"),
        ({"token_env": ""}, "hub.token_env: expected the name of an environment variable"),
        ({"private": "yes"}, "hub.private: expected true or false"),
        ({"token": "hf_x"}, "unknown config key 'hub.token'"),
    ],
)
@pytest.mark.parametrize("command", ["run", "plan"])
def test_bad_hub_settings_exit_2_naming_the_key(fake_hub, config_file, tmp_path, capsys, command, section, expected):
    run_dir = tmp_path / "run"
    code, err = cai([command, str(config_file(**section)), "--run-dir", str(run_dir)], capsys)
    assert code == 2
    line = cai_error_line(err)
    assert line.startswith(f"cai: error: {expected}"), line
    assert not run_dir.exists() and not fake_hub.calls


def test_a_failed_upload_exits_1_and_the_same_command_pushes_without_retraining(
    fake_hub, config_file, tmp_path, capsys, monkeypatch
):
    from constitutional.stages import sl

    fake_hub.fail_uploads = 1
    run_dir = tmp_path / "run"
    args = ["run", str(config_file(sl_cai="me/sl-cai")), "--run-dir", str(run_dir), "--stages", "critique,sl"]
    code, err = cai(args, capsys)
    assert code == 1
    line = cai_error_line(err)
    assert line.startswith("cai: error: hub.sl_cai: pushing models/sl-cai to me/sl-cai failed: 503 Server Error")
    assert "run the same command again" in line and TOKEN not in err
    entry = manifest(run_dir)["stages"]["sl"]
    assert entry["status"] == "done" and "hub" not in entry
    weights = run_dir / "models" / "sl-cai" / "model.safetensors"
    trained = weights.stat().st_mtime_ns

    def retrained(*_args, **_kwargs):
        raise AssertionError("stage sl ran again")

    monkeypatch.setattr(sl, "run", retrained)
    code, err = cai(args, capsys)
    assert code == 0, err
    assert [call["call"] for call in fake_hub.calls] == ["create_repo", "upload_folder"] * 2
    again = manifest(run_dir)["stages"]["sl"]
    assert again["started"] == entry["started"] and again["hub"]["commit"] == "c0ffee01"
    assert weights.stat().st_mtime_ns == trained


class _Answering(http.server.BaseHTTPRequestHandler):
    """Every request is answered with the class's status; each request's method, path and Authorization are kept."""

    status = 503
    seen: list[str] = []

    def _answer(self) -> None:
        self.seen.append(f"{self.command} {self.path} {self.headers.get('Authorization', '')}")
        body = json.dumps({"error": "stand-in says no"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *_: object) -> None:
        pass


def test_a_hub_that_cannot_be_reached_is_a_service_error(tmp_path, monkeypatch, tiny_model_dir):
    """huggingface_hub itself, with nothing listening where the hub should be."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config, run = _pushable_run(tmp_path, tiny_model_dir)
    with pytest.raises(ServiceError) as raised:
        hub.push_stage(config, run, "sl")
    message = str(raised.value)
    assert message.startswith("hub.sl_cai: pushing models/sl-cai to me/sl-cai failed: ") and TOKEN not in message
    assert "hub" not in run.stage_entry("sl")


def _pushable_run(tmp_path: Path, tiny_model_dir: Path):
    """A config with hub.sl_cai set and a run whose stage sl is done, its folder holding the tiny model."""
    run_dir = tmp_path / "run"
    folder = run_dir / "models" / "sl-cai"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    (folder / "training_summary.json").write_text("{}")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_data(tiny_model_dir, tmp_path, hub={"sl_cai": "me/sl-cai"})))
    RunDir(run_dir).update_stage("sl", status="done")
    return load_config(path), RunDir(run_dir)


@pytest.mark.parametrize(("status", "error"), [(503, ServiceError), (401, UserError), (403, UserError)])
def test_the_real_client_s_failures_become_one_line_errors(tmp_path, monkeypatch, tiny_model_dir, status, error):
    """huggingface_hub itself against a loopback server: 5xx is a ServiceError, a refusal a UserError."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answering)
    _Answering.status, _Answering.seen = status, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        config, run = _pushable_run(tmp_path, tiny_model_dir)
        with pytest.raises(error) as raised:
            hub.push_stage(config, run, "sl")
    finally:
        server.shutdown()
        server.server_close()
    message = str(raised.value)
    assert message.startswith("hub.sl_cai: ") and "\n" not in message and TOKEN not in message
    assert str(status) in message
    assert f"POST /api/repos/create Bearer {TOKEN}" in _Answering.seen, _Answering.seen  # the token went, as a header
    assert "hub" not in run.stage_entry("sl")
