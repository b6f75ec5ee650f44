"""The first run, end to end: `foredeck up` starts every real service as a real process, and the
SDK, the CLI and a Node.js client drive runs through gateway → orchestrator → llmrouter →
toolrunner → memory.

The model behind the llmrouter is the scripted provider (the real OpenAI wire format, answers
from a script), so the answers are deterministic: the first run plans a calculator call and
answers with its result; the second run is given that answer back by memory's recall. A last
test runs the embedded local model instead and checks only that a run passes through every
service with schema-valid plans and finishes (a 135M model's answers are not asserted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from foredeck.common.v1 import agent_pb2, journal_pb2, run_event_pb2, run_pb2
from foredeck_client import AsyncClient
from foredeck_client.errors import NotFound
from foredeck_testing.node import node_with_packages
from foredeck_testing.provider import Endpoint, ScriptedProvider, TextReply

REPO = Path(__file__).resolve().parents[2]
NODE_EXAMPLE = REPO / "examples" / "node"
READY_WITHIN = 180.0
RUN_WITHIN = 180.0
TASK = "What is 17 * 23? Use the calculator, and remember the answer."
RECALL_TASK = "What did you compute for me before?"

pytestmark = pytest.mark.slow


def _plan(*steps: dict[str, Any]) -> str:
    return json.dumps({"rationale": "", "steps": list(steps)})


CALCULATOR_PLAN = _plan(
    {
        "kind": "tool_call",
        "description": "multiply 17 by 23",
        "tool_name": "calculator",
        "arguments": {"expression": "17 * 23"},
    }
)


@dataclass
class Stack:
    """A running `foredeck up`: its data directory and the environment that finds it."""

    process: asyncio.subprocess.Process
    data_dir: Path
    output: Path

    @property
    def env(self) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FOREDECK_")}
        return {**clean, "FOREDECK_DATA_DIR": str(self.data_dir)}

    def log(self, name: str) -> str:
        path = self.data_dir / "logs" / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


@contextlib.asynccontextmanager
async def foredeck_up(tmp_path: Path, env: Mapping[str, str]) -> AsyncIterator[Stack]:
    """Start `foredeck up` with every installed service; stop it with SIGINT at the end."""
    data_dir = tmp_path / ".foredeck"
    output = tmp_path / "up.out"
    # Nothing from the developer's own environment: no stack settings, no real provider keys.
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FOREDECK_") and k not in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")
    }
    with output.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "foredeck_client.cli",
            "up",
            "--data-dir",
            str(data_dir),
            "--ready-timeout",
            str(READY_WITHIN),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**clean, **env},
            cwd=tmp_path,
        )
    stack = Stack(process, data_dir, output)
    try:
        async with asyncio.timeout(READY_WITHIN * 2):
            while not (data_dir / "stack.json").exists():
                if process.returncode is not None:
                    pytest.fail(f"foredeck up exited:\n{output.read_text()}")
                await asyncio.sleep(0.2)
        yield stack
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(90):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
    assert process.returncode == 0, output.read_text()


async def _cli(stack: Stack, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "foredeck_client.cli",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=stack.env,
    )
    async with asyncio.timeout(RUN_WITHIN):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _prompts(provider: ScriptedProvider) -> list[str]:
    """The text of every chat request the model received, in order."""
    return [
        json.dumps(request.body)
        for request in provider.requests_to(Endpoint.OPENAI_CHAT_COMPLETIONS)
    ]


async def test_the_first_run_goes_through_every_service_and_the_second_recalls_it(
    tmp_path: Path,
) -> None:
    node = node_with_packages(NODE_EXAMPLE)
    provider = ScriptedProvider()
    async with provider:
        provider.enqueue(
            TextReply(CALCULATOR_PLAN),
            TextReply("17 * 23 = 391."),
            # The second run: nothing to do but answer from what memory gave back.
            TextReply(_plan()),
            TextReply("Earlier you asked for 17 * 23, which is 391."),
            # The Node.js client's run.
            TextReply(_plan()),
            TextReply("Hello from the scripted model."),
        )
        env = {
            "FOREDECK_LLMROUTER_OPENAI_API_KEY": "test-key",
            "FOREDECK_LLMROUTER_OPENAI_BASE_URL": provider.openai_base_url,
            "FOREDECK_LLMROUTER_LOCAL_ENABLED": "false",
        }
        async with foredeck_up(tmp_path, env) as stack:
            # 1. The SDK finds the stack by itself, runs the task and watches it.
            async with AsyncClient(data_dir=stack.data_dir) as client:
                run = await client.create_run(TASK)
                events = [event async for event in client.watch_run(run.run_id)]
                first = await client.get_run(run.run_id)
                journal = await client.get_run_journal(
                    run.run_id, view=journal_pb2.JOURNAL_VIEW_FULL, page_size=100
                )
                with pytest.raises(NotFound) as missing:
                    await client.get_run("r_" + "0" * 32)

            assert first.status == run_pb2.RUN_STATUS_SUCCEEDED, first.error
            assert first.output == "17 * 23 = 391."
            assert first.agent_name == "default"
            tools = [
                e.tool_call_finished.result for e in events if e.HasField("tool_call_finished")
            ]
            assert len(tools) == 1
            assert "391" in tools[0].content
            kinds = [e.WhichOneof("record") for e in journal]
            assert {"llm_exchange", "tool_exchange", "memory_operation"} <= set(kinds)
            assert missing.value.reason == "RUN_NOT_FOUND"

            # 2. The CLI, piped: the second run is told what the first remembered.
            code, out, err = await _cli(stack, "run", RECALL_TASK)
            assert code == 0, err
            assert out.splitlines()[-1] == "Earlier you asked for 17 * 23, which is 391."
            # What the model saw in the second run holds the first run's remembered answer.
            assert any("391" in prompt for prompt in _prompts(provider)[2:])

            code, out, err = await _cli(stack, "runs", "--json")
            assert code == 0, err
            listed = [json.loads(line)["run"] for line in out.splitlines()]
            assert len(listed) == 2
            assert {r["status"] for r in listed} == {"RUN_STATUS_SUCCEEDED"}

            code, out, err = await _cli(stack, "show", first.run_id)
            assert code == 0, err
            assert "tool_call" in out
            assert out.rstrip().endswith("17 * 23 = 391.")
            chart = tmp_path / "trace.png"
            code, out, err = await _cli(stack, "trace", first.run_id, "--png", str(chart))
            assert code == 0, err
            assert "calculator: multiply 17 by 23" in out, out
            for kind in ("recall", "plan", "tool_call", "synthesize", "remember"):
                assert f" {kind} " in out
            assert out.splitlines()[-2].startswith("total: ")
            assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            code, out, err = await _cli(stack, "agents", "--json")
            assert code == 0, err
            assert [json.loads(line)["agent"]["name"] for line in out.splitlines()] == ["default"]
            code, out, err = await _cli(stack, "keys", "list", "--json")
            assert code == 0, err
            key_ids = {json.loads(line)["api_key"]["api_key_id"] for line in out.splitlines()}
            assert "key_bootstrap_developer" in key_ids
            code, out, err = await _cli(stack, "show", "r_" + "1" * 32)
            assert code == 4
            assert "RUN_NOT_FOUND" in err

            # 3. Node.js, from proto/ alone: a run streamed, then an error decoded.
            process = await asyncio.create_subprocess_exec(
                node,
                str(NODE_EXAMPLE / "run.js"),
                "--json",
                "Say hello.",
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=stack.env,
                cwd=NODE_EXAMPLE,
            )
            async with asyncio.timeout(RUN_WITHIN):
                raw_out, raw_err = await process.communicate()
            assert process.returncode == 0, raw_err.decode()
            documents = [json.loads(line) for line in raw_out.decode().splitlines()]
            node_events = [d["event"] for d in documents if "event" in d]
            assert node_events[-1]["run_finished"]["output"] == "Hello from the scripted model."
            sequences = [int(e["sequence"]) for e in node_events]
            assert sequences == sorted(set(sequences))
            error = next(d["error"] for d in documents if "error" in d)
            assert error["code"] == "NOT_FOUND"
            assert error["reason"] == "RUN_NOT_FOUND"
            assert error["domain"] == "gateway.foredeck.dev"

            # Every service took part.
            assert "ExecuteTool" in stack.log("toolrunner")
            assert "Remember" in stack.log("memory")
            assert "Generate" in stack.log("llmrouter")
        assert provider.pending == 0


async def test_a_run_on_the_embedded_local_model_passes_through_every_service(
    tmp_path: Path,
) -> None:
    async with (
        foredeck_up(tmp_path, {}) as stack,
        AsyncClient(data_dir=stack.data_dir, timeout=60) as client,
    ):
        run = await client.create_run(TASK)
        async with asyncio.timeout(RUN_WITHIN * 2):
            finished = await client.wait_run(run.run_id)
        journal = await client.get_run_journal(
            run.run_id, view=journal_pb2.JOURNAL_VIEW_FULL, page_size=100
        )

    assert finished.status in (run_pb2.RUN_STATUS_SUCCEEDED, run_pb2.RUN_STATUS_FAILED)
    assert finished.usage.output_tokens > 0
    kinds = [run_event_pb2.StepKind.Name(e.kind) for e in journal]
    assert "STEP_KIND_RECALL" in kinds
    assert "STEP_KIND_PLAN" in kinds
    plans = [e for e in journal if e.HasField("plan")]
    assert plans, "the model's plan was not recorded"
    if finished.status == run_pb2.RUN_STATUS_SUCCEEDED:
        assert finished.output
        assert "STEP_KIND_REMEMBER" in kinds


async def test_a_tool_call_waits_for_a_person_who_approves_it_from_the_cli(
    tmp_path: Path,
) -> None:
    provider = ScriptedProvider()
    async with provider:
        provider.enqueue(TextReply(CALCULATOR_PLAN), TextReply("17 * 23 = 391."))
        env = {
            "FOREDECK_LLMROUTER_OPENAI_API_KEY": "test-key",
            "FOREDECK_LLMROUTER_OPENAI_BASE_URL": provider.openai_base_url,
            "FOREDECK_LLMROUTER_LOCAL_ENABLED": "false",
        }
        async with (
            foredeck_up(tmp_path, env) as stack,
            AsyncClient(data_dir=stack.data_dir) as client,
        ):
            await client.create_agent(
                agent_pb2.Agent(
                    name="careful",
                    allowed_tools=["calculator"],
                    approval_policy=agent_pb2.ApprovalPolicy(tool_names=["calculator"]),
                )
            )
            run = await client.create_run(TASK, agent="careful")
            waiting = None
            async for event in client.watch_run(run.run_id):
                if event.HasField("tool_call_requested") and (
                    event.tool_call_requested.requires_approval
                ):
                    waiting = event.tool_call_requested
                    break
            assert waiting is not None
            assert (await client.get_run(run.run_id)).status in (
                run_pb2.RUN_STATUS_WAITING_APPROVAL,
                run_pb2.RUN_STATUS_RUNNING,
            )
            code, out, err = await _cli(stack, "approve", "--json")
            assert code == 0, err
            pending = [json.loads(line)["approval"] for line in out.splitlines()]
            assert [a["approval_id"] for a in pending] == [waiting.approval_id]
            code, out, err = await _cli(stack, "approve", waiting.approval_id)
            assert code == 0, err
            assert out.startswith(f"approved {waiting.approval_id}")
            finished = await client.wait_run(run.run_id)
            # The same decision again is a repeat and changes nothing; the other one is refused.
            again, _, again_err = await _cli(stack, "approve", waiting.approval_id)
            deny, _, deny_err = await _cli(stack, "approve", waiting.approval_id, "--deny")
        assert finished.status == run_pb2.RUN_STATUS_SUCCEEDED, finished.error
        assert finished.output == "17 * 23 = 391."
        assert again == 0, again_err
        assert deny == 4
        assert "APPROVAL_NOT_PENDING" in deny_err
