"""No Docker engine runs here, so the compose file and Dockerfile are kept honest by checking what they
reference: settings that exist, commands our CLI accepts, files that are in the repo."""

from __future__ import annotations

import re

import yaml

from bot.cli import build_parser
from core.settings import Settings
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def _services():
    return COMPOSE["services"].items()


def test_every_supportbot_variable_is_a_setting():
    fields = {name.upper() for name in Settings.model_fields}
    text = (ROOT / "docker" / "compose.yaml").read_text() + DOCKERFILE
    for var in set(re.findall(r"SUPPORTBOT_([A-Z0-9_]+)", text)):
        assert var in fields, f"SUPPORTBOT_{var} is not a setting"


def test_every_command_parses():
    parser = build_parser()
    commands = [svc["command"] for _, svc in _services() if svc.get("command") and svc["command"][0] == "supportbot"]
    cmd = re.search(r'CMD \[(.*)\]', DOCKERFILE).group(1)
    commands.append([part.strip().strip('"') for part in cmd.split(",")])
    assert len(commands) >= 5
    for command in commands:
        args = parser.parse_args(command[1:])
        assert callable(args.func)


def test_workers_cover_every_queue_and_wait_for_migrations():
    queues = set()
    for name, svc in _services():
        command = svc.get("command") or []
        if "worker" in command:
            queues |= set(command[command.index("--queues") + 1].split(","))
            assert "migrate" in svc["depends_on"], name
    assert queues == {"answer", "light", "train"}


def test_dockerfile_copies_existing_paths():
    for src in re.findall(r"^COPY (\S+)", DOCKERFILE, flags=re.M):
        assert (ROOT / src).exists(), src
