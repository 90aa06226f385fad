"""Every `supportbot` command, run as a newcomer would: on a fresh, empty data dir and with a missing input.

Each command ends in one clear line (or its normal output) and an exit code of 0, 1 or 2, never in a
Python traceback. The commands are discovered from the real argparse parser, nested ones included, and
CASES must name every one of them, so a new command cannot skip this test.

Kept cheap: commands that would load the language model, serve forever or train (worker, chat, train,
retrieval tune, eval answers) are run with a missing input or asserted on their argument errors only;
`ask` runs against a broker nobody listens on with SUPPORTBOT_WORKER_WAIT_S=0, so it stops at "no worker
is reachable" after migrating and loading the anonymizer. Each case says which in its `note`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, ROOT, free_port

MISSING = "does-not-exist/input.jsonl"  # relative to the test's folder


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    codes: tuple[int, ...]  # acceptable exit codes
    says: str = ""  # text the output must contain (stdout or the one error line)
    stdin: str = ""
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""


def _dead_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


# Keyed by the command path; every leaf of the parser appears at least once.
CASES: dict[str, list[Case]] = {
    "db": [Case(("db", "upgrade"), (0,), "upgrade done"), Case(("db", "downgrade"), (0, 2))],
    "model": [Case(("model", "prepare"), (0,), "base model ready", note="converts once; cached in MODEL_CACHE")],
    "worker": [Case(("worker", "--concurrency", "many"), (2,), "invalid int", note="argument error only: serves forever")],
    "status": [Case(("status",), (0,), "queues")],
    "ask": [
        Case(("ask", "printer jams on every page"), (2,), "No supportbot worker is reachable",
             env={"SUPPORTBOT_BROKER_URL": "@dead_redis", "SUPPORTBOT_WORKER_WAIT_S": "0"},
             note="a broker nobody listens on: stops before the model"),
        Case(("ask",), (2,), "required", note="argument error"),
    ],
    "slack": [Case(("slack", "--port", "x"), (2,), "invalid int", note="argument error only: serves forever")],
    "telegram": [Case(("telegram", "extra"), (2,), "unrecognized", note="argument error only: serves forever")],
    "chat": [Case(("chat", "--thread"), (2,), "expected one argument", note="argument error only: interactive")],
    "eval": [Case(("eval",), (2,), "required")],
    "eval retrieval": [
        Case(("eval", "retrieval", "--tickets", MISSING, "--queries", MISSING), (2,), "not found"),
    ],
    "eval retrieval-cv": [Case(("eval", "retrieval-cv", "--pairs", MISSING), (2,), "not found")],
    "eval privacy": [Case(("eval", "privacy", "--data-dir", "does-not-exist"), (0, 2), "does-not-exist",
                          note="owned by bot/privacy/cli.py; says 'skipped' and exits 0 today")],
    "eval answers": [Case(("eval", "answers", "--data", MISSING, "--no-generate"), (2,), "does-not-exist",
                          note="missing input: stops before the model")],
    "tickets": [Case(("tickets",), (2,), "required")],
    "tickets ingest": [
        Case(("tickets", "ingest", MISSING), (2,), "does-not-exist"),
        Case(("tickets", "ingest", str(FIXTURES / "retrieval_other.csv")), (1, 2),
             note="a CSV with columns of another shape (no --map): rows rejected, said per row"),
        Case(("tickets", "ingest", str(FIXTURES / "retrieval_tickets.jsonl")), (0,), "added",
             note="fresh data dir: migrates, then loads the embedder"),
    ],
    "tickets delete": [Case(("tickets", "delete", "T-404"), (0, 1, 2), "T-404")],
    "tickets quarantine": [Case(("tickets", "quarantine"), (0,), "no quarantined tickets")],
    "tickets release": [Case(("tickets", "release", "T-404"), (1,), "T-404")],
    "tickets rescreen": [Case(("tickets", "rescreen"), (0,), "0 tickets screened")],
    "tickets reindex": [Case(("tickets", "reindex"), (0, 2))],
    "tickets seed": [Case(("tickets", "seed"), (0,), "seeded", note="fresh data dir: migrates, then loads the embedder")],
    "tickets list": [Case(("tickets", "list"), (0,))],
    "tickets search": [Case(("tickets", "search", "printer jam"), (0, 2))],
    "retrieval": [Case(("retrieval",), (2,), "required")],
    "retrieval tune": [Case(("retrieval", "tune", "--method", "nope"), (2,), "invalid choice",
                            note="argument error only: trains")],
    "anonymize": [Case(("anonymize",), (0,), "<", stdin="call Priya Raman at +1 415 555 0100\n")],
    "rate": [Case(("rate", "1", "good"), (2,), "1"), Case(("rate", "x", "good"), (2,), "invalid int")],
    "export": [
        Case(("export", "--out", "exported"), (0, 2)),
        Case(("export", "--out", "/proc/forbidden/export"), (2,), "/proc/forbidden"),
    ],
    "train": [Case(("train", "--local", "--data", "does-not-exist"), (2,), "does-not-exist",
                   note="missing input: stops before the model")],
    "models": [Case(("models", "list"), (0,)), Case(("models", "promote"), (2,))],
    "web": [Case(("web", "--port", "x"), (2,), "invalid int", note="argument error only: serves forever")],
    "web create-admin": [
        Case(("web", "create-admin", "alice"), (2,), "--password-stdin"),
        Case(("web", "create-admin", "alice", "--password-stdin"), (2,), "at least 12", stdin="short\n"),
        Case(("web", "create-admin", "alice", "--password-stdin"), (0,), "ready", stdin="correct horse battery\n",
             note="fresh data dir: migrates, then stores an argon2 hash"),
    ],
    "escalations": [Case(("escalations",), (2,), "required")],
    "escalations list": [Case(("escalations", "list"), (0,), "no escalations", note="fresh data dir: migrates")],
    "escalations show": [Case(("escalations", "show", "1"), (2,), "no escalation #1")],
    "escalations claim": [
        Case(("escalations", "claim", "1", "--as", "slack:U1"), (2,), "no escalation #1"),
        Case(("escalations", "claim", "1"), (2,), "no escalation #1", note="as the operator (cli:USER)"),
    ],
    "escalations resolve": [Case(("escalations", "resolve", "1", "--as", "slack:U1", "--text", "fixed"), (2,),
                                 "no escalation #1", note="says so before loading the embedder")],
    "escalations reopen": [Case(("escalations", "reopen", "1", "--as", "slack:U1"), (2,), "no escalation #1")],
    "eval summaries": [Case(("eval", "summaries", "--data", MISSING), (2,), "not found")],
    "eval rag": [Case(("eval", "rag", "--tickets", MISSING, "--questions", MISSING), (2,), "does-not-exist",
                      note="missing input: stops before the model")],
}


def _leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix] if prefix else []
    for action in parser._actions:  # argparse has no public walk over sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _leaves(sub, (*prefix, name))
    return found


def test_cases_cover_every_command():
    from bot.cli import build_parser

    commands = {" ".join(path) for path in _leaves(build_parser())}
    assert commands - set(CASES) == set(), "add the new commands to CASES"


def test_help_lists_what_the_modules_register():
    """`supportbot --help` names module commands from bot.cli's table without importing them: same help."""
    from bot.cli import COMMAND_MODULES, build_parser

    full = {a.dest: a.help for a in _root(build_parser())._choices_actions}
    lazy = {a.dest: a.help for a in _root(build_parser(only=""))._choices_actions}
    assert lazy == full
    assert {c for commands in COMMAND_MODULES.values() for c in commands} <= set(full)


def _root(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _run(case: Case, folder: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTBOT_")}
    env.update(
        SUPPORTBOT_DATA_DIR=str(folder / "data"),  # fresh: nothing there yet
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    if "SUPPORTBOT_MODEL_CACHE" in os.environ:
        env["SUPPORTBOT_MODEL_CACHE"] = os.environ["SUPPORTBOT_MODEL_CACHE"]
    env.update({k: (_dead_redis() if v == "@dead_redis" else v) for k, v in case.env.items()})
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *case.argv],
        input=case.stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [c for cases in CASES.values() for c in cases], ids=lambda c: " ".join(c.argv)[:60]
)
def test_command_on_a_fresh_data_dir(case: Case, tmp_path: Path):
    done = _run(case, tmp_path)
    shown = f"exit {done.returncode}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-4000:]}"
    assert "Traceback" not in done.stderr, shown
    assert done.returncode in case.codes, shown
    if case.says:
        assert case.says in done.stdout + done.stderr, shown
    assert ": None" not in done.stderr, shown  # "index STALE: None" and the like: a value never set
    if done.returncode != 0:
        # The failure is said, in words a user can act on: never the "unexpected error" of a bug.
        assert (done.stdout + done.stderr).strip(), shown
        assert "unexpected error" not in done.stderr, shown
        if done.returncode == 2 and not done.stderr.startswith("usage:"):
            assert len(done.stderr.strip().splitlines()) == 1, shown  # one line, not a wall of text


def test_unexpected_errors_get_a_reference_and_verbose_shows_the_traceback(tmp_path: Path, monkeypatch, capsys):
    from bot import cli

    monkeypatch.setenv("SUPPORTBOT_DATA_DIR", str(tmp_path / "data"))

    def broken(args: argparse.Namespace, settings) -> int:  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_status", broken)  # build_parser looks the handler up when called
    for verbose, traceback_shown in (([], False), (["--verbose"], True)):
        assert cli.main([*verbose, "status"]) == 1
        lines = capsys.readouterr().err.splitlines()
        assert ("Traceback (most recent call last):" in lines) is traceback_shown
        assert lines[-1].startswith("supportbot status: unexpected error ") and "--verbose" in lines[-1]
        ref = lines[-1].split("unexpected error ")[1].split()[0]
        assert f"ref {ref}" in (tmp_path / "data" / "errors.log").read_text()
