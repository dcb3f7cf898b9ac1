"""Settings from flags and FINETUNE_SERVE_* variables; the `serve` sub-command's flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from finetune.server.cli import register, settings_from_args
from finetune.server.settings import ServerSettings


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_defaults_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_SERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("FINETUNE_SERVE_HOST", "0.0.0.0")
    settings = ServerSettings(model_dir=tmp_path)
    assert settings.max_batch_size == 8 and settings.host == "0.0.0.0" and settings.port == 8080
    assert settings.resolved_feedback_path() == tmp_path / "feedback.jsonl"
    assert settings.bearer_token() is None


def test_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("FINETUNE_SERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("FINETUNE_SERVE_PORT", "9000")
    args = parse(["--model", "m", "--max-batch-size", "4", "--max-wait-ms", "2.5", "--feedback-path", "/x/f.jsonl"])
    settings = settings_from_args(args)
    assert settings.model_dir == Path("m") and settings.max_batch_size == 4 and settings.max_wait_ms == 2.5
    assert settings.port == 9000  # not given as a flag: the environment's value stays
    assert settings.feedback_path == Path("/x/f.jsonl")


def test_token_file_wins_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_SERVE_AUTH_TOKEN", "from-env")
    assert ServerSettings(model_dir=tmp_path).bearer_token() == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert ServerSettings(model_dir=tmp_path, auth_token_file=tmp_path / "token").bearer_token() == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        ServerSettings(model_dir=tmp_path, auth_token_file=tmp_path / "empty").bearer_token()


def test_bad_values_are_rejected(tmp_path):
    with pytest.raises(ValueError):
        ServerSettings(model_dir=tmp_path, max_batch_size=0)
    with pytest.raises(ValueError):
        ServerSettings(model_dir=tmp_path, on_long_input="ignore")


def test_serve_on_a_directory_that_is_no_export_exits_2(tmp_path, capsys):
    from finetune.cli import main

    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
