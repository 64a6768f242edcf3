"""The container images, checked statically (no container engine runs here): pinned base images, a
non-root numeric user and no compilers in the final stage, and the ``hps`` entrypoint that the chart
and the operator's rendered agent pods call."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"operator": ROOT / "Dockerfile.operator", "agent": ROOT / "Dockerfile.agent"}
COMPILERS = re.compile(
    r"\b(gcc|g\+\+|clang|build-essential|make|cmake|nvcc|cuda-toolkit|cuda-nvcc|\S*-dev)\b"
)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(path: Path) -> tuple[list[Stage], dict[str, str]]:
    """Stages in order (base image with global ARG defaults substituted) and the global ARGs."""
    text = re.sub(r"\\\n", " ", path.read_text())  # join continuation lines
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
        elif op == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=alias))
        elif stages:
            stages[-1].instructions.append((op, rest))
    return stages, global_args


def instruction(stage: Stage, op: str) -> str | None:
    found = [rest for o, rest in stage.instructions if o == op]
    return found[-1] if found else None


@pytest.fixture(params=sorted(DOCKERFILES))
def image(request: pytest.FixtureRequest) -> tuple[str, list[Stage]]:
    stages, _ = parse_dockerfile(DOCKERFILES[request.param])
    return request.param, stages


def test_every_base_image_is_pinned(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue  # built from an earlier stage
        assert "$" not in stage.base, f"{name}: unresolved base {stage.base}"
        if "@sha256:" in stage.base:
            continue
        repo, _, tag = stage.base.rpartition(":")
        assert repo and "/" not in tag, f"{name}: {stage.base} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), (
            f"{name}: {stage.base} is not an exact version"
        )


def test_final_stage_runs_as_a_numeric_non_root_user(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    user = instruction(stages[-1], "USER")
    assert user is not None, f"{name}: final stage has no USER"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {user} must be a numeric non-root uid"


def test_final_stage_installs_no_compilers(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    final = stages[-1]
    assert not re.search(r"devel|sdk|buildpack", final.base), (
        f"{name}: final base {final.base} is a build image"
    )
    for op, rest in final.instructions:
        if op == "RUN":
            assert not COMPILERS.search(rest), f"{name}: final stage installs build tools: {rest}"
    assert len(stages) >= 2, f"{name}: build in a builder stage, not in the final image"


def test_entrypoint_is_the_hps_command(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    entrypoint = instruction(stages[-1], "ENTRYPOINT")
    cmd = instruction(stages[-1], "CMD")
    assert entrypoint is not None and cmd is not None
    assert json.loads(entrypoint) == ["hps"]  # exec form, so signals reach hps directly
    assert json.loads(cmd)[0] == name  # `hps operator ...` / `hps agent ...`


def test_operator_default_command_matches_what_the_chart_runs() -> None:
    stages, _ = parse_dockerfile(DOCKERFILES["operator"])
    cmd = json.loads(instruction(stages[-1], "CMD") or "[]")
    template = (ROOT / "charts/hps-operator/templates/deployment.yaml").read_text()
    assert 'command: ["hps"]' in template
    assert cmd[:3] == ["operator", "run", "--all-namespaces"]
    assert "- operator\n            - run\n" in template
    values = yaml.safe_load((ROOT / "charts/hps-operator/values.yaml").read_text())
    assert f"--liveness=http://0.0.0.0:{values['operator']['probePort']}/healthz" in cmd


def test_agent_image_is_cuda_runtime_with_the_gpu_extra() -> None:
    stages, _ = parse_dockerfile(DOCKERFILES["agent"])
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu22\.04", stages[-1].base)
    text = DOCKERFILES["agent"].read_text()
    assert "[gpu]" in text  # CuPy comes from the project's gpu extra, not a separate pin


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".git", ".venv", ".tools", "**/__pycache__"):
        assert entry in patterns
    assert "README.md" not in patterns and "node_agent" not in patterns  # the wheel build needs them


def test_parser_sees_through_continuations_and_args(tmp_path: Path) -> None:
    """The checks above are only as good as this parser: it must catch a sneaky final stage."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "ARG BASE=python:latest\nFROM ${BASE} AS build\nRUN true\nFROM build\n"
        "RUN apt-get update && \\\n    apt-get install -y gcc\nUSER root\nENTRYPOINT hps\n"
    )
    stages, _ = parse_dockerfile(bad)
    assert stages[0].base == "python:latest" and stages[-1].base == "build"
    assert COMPILERS.search(instruction(stages[-1], "RUN") or "")
    assert instruction(stages[-1], "USER") == "root"
    assert shlex.split(instruction(stages[-1], "ENTRYPOINT") or "") == ["hps"]
