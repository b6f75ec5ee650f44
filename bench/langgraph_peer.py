"""LangGraph running the orchestrator benchmark's plan/act graph, in its own virtualenv.

``python bench/langgraph_peer.py SPEC.json`` builds a three-node graph — ``plan`` (one call to the
"model"), ``act`` (one call to a "tool", looping until the plan is done) and ``synthesize`` (one
more model call) — with LangGraph's durable SQLite checkpointer, and invokes it ``runs`` times,
one thread id per invocation. Every model and tool call is one unary gRPC call to the echo
server named in the spec, so that both sides of the benchmark pay the same downstream hop. It
prints one JSON object: per-invocation seconds and the number of steps per invocation. It
imports nothing from this repository: ``make bench`` runs it with the interpreter of the
virtualenv that holds LangGraph.
"""

from __future__ import annotations

import json
import operator
import os
import sqlite3
import sys
import tempfile
import time
from typing import Annotated, Any, TypedDict

import grpc
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph


class _State(TypedDict):
    task: str
    plan: list[str]
    done: int
    observations: Annotated[list[str], operator.add]
    answer: str


def _string_value(text: str) -> bytes:
    """Encode ``google.protobuf.StringValue(value=text)`` without generated code."""
    data = text.encode()
    return b"\n" + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _build(spec: dict[str, Any], checkpointer: SqliteSaver) -> Any:
    channel = grpc.insecure_channel(spec["address"])
    call = channel.unary_unary(spec["method"], request_serializer=None, response_deserializer=None)
    metadata = tuple((key, value) for key, value in spec["metadata"])
    steps = int(spec["tool_steps"])

    def downstream(text: str) -> bytes:
        return bytes(call(_string_value(text), metadata=metadata, timeout=5.0))

    def plan(state: _State) -> dict[str, Any]:
        downstream(state["task"])
        return {"plan": [f"tool {index}" for index in range(steps)], "done": 0}

    def act(state: _State) -> dict[str, Any]:
        step = state["plan"][state["done"]]
        downstream(step)
        return {"done": state["done"] + 1, "observations": [step]}

    def after_act(state: _State) -> str:
        return "act" if state["done"] < len(state["plan"]) else "synthesize"

    def synthesize(state: _State) -> dict[str, Any]:
        downstream(" ".join(state["observations"]))
        return {"answer": f"{len(state['observations'])} observations"}

    graph = StateGraph(_State)
    graph.add_node("plan", plan)
    graph.add_node("act", act)
    graph.add_node("synthesize", synthesize)
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "act")
    graph.add_conditional_edges("act", after_act, ["act", "synthesize"])
    graph.add_edge("synthesize", END)
    return graph.compile(checkpointer=checkpointer)


def main() -> None:
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    with tempfile.TemporaryDirectory() as workdir:
        connection = sqlite3.connect(
            os.path.join(workdir, "checkpoints.sqlite"), check_same_thread=False
        )
        checkpointer = SqliteSaver(connection)
        app = _build(spec, checkpointer)
        steps = int(spec["tool_steps"]) + 2
        timings: list[float] = []
        for index in range(int(spec["warmup"]) + int(spec["runs"])):
            config = {"configurable": {"thread_id": f"run-{index}"}}
            start = time.perf_counter()
            result = app.invoke(
                {"task": "bench", "plan": [], "done": 0, "observations": [], "answer": ""},
                config,
            )
            elapsed = time.perf_counter() - start
            if result["answer"] != f"{steps - 2} observations":
                raise SystemExit(f"unexpected answer {result['answer']!r}")
            if index >= int(spec["warmup"]):
                timings.append(elapsed)
        connection.close()
    print(json.dumps({"invocation_seconds": timings, "steps_per_invocation": steps}))


if __name__ == "__main__":
    main()
