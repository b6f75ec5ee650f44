"""Traces, metrics and logs of the real services, run as processes the way their images run them.

llmrouter, toolrunner, memory, both orchestrator roles and the gateway start with ``python -m``
on real Redis and a real Bolt server, exporting spans over OTLP/gRPC to a collector this test
runs in-process. One test creates a run through the gateway and follows it through the
orchestrator API, the Redis stream, the worker and every service it calls: one trace, as a tree
rooted at the gateway's call. Others call the services as a worker's step does and check that
their Prometheus endpoints counted the calls and that their log lines are JSON carrying the
trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.parser import text_string_to_metric_families

from foredeck.common.v1 import agent_pb2, chat_pb2, run_pb2
from foredeck.gateway.v1 import gateway_service_pb2 as gateway_pb
from foredeck.gateway.v1 import gateway_service_pb2_grpc as gateway_grpc
from foredeck.llmrouter.v1 import llmrouter_service_pb2 as router_pb
from foredeck.llmrouter.v1 import llmrouter_service_pb2_grpc as router_grpc
from foredeck.memory.v1 import memory_service_pb2 as memory_pb
from foredeck.memory.v1 import memory_service_pb2_grpc as memory_grpc
from foredeck.orchestrator.v1 import orchestrator_service_pb2 as orchestrator_pb
from foredeck.orchestrator.v1 import orchestrator_service_pb2_grpc as orchestrator_grpc
from foredeck.toolrunner.v1 import toolrunner_service_pb2 as tool_pb
from foredeck.toolrunner.v1 import toolrunner_service_pb2_grpc as tool_grpc
from foredeck_kit.delegation import DelegationSigner, RunClaims
from foredeck_kit.idempotency import tool_effect_key
from foredeck_kit.principal import (
    PRINCIPAL_METADATA_KEY,
    PrincipalSigner,
    format_keys,
    generate_key,
)
from foredeck_stack.stores import ArcadeDbProcess, RedisProcess, free_port
from foredeck_testing.provider import ScriptedProvider, TextReply

pytestmark = pytest.mark.slow

START_TIMEOUT = 120.0
EXPORT_TIMEOUT = 30.0
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
EMBEDDING_DIMENSIONS = 16


# --- an OTLP/gRPC trace receiver ------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    span: trace_pb2.Span

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kv in self.span.attributes:
            kind = kv.value.WhichOneof("value")
            if kind == "array_value":
                out[kv.key] = [
                    getattr(v, v.WhichOneof("value") or "string_value")
                    for v in kv.value.array_value.values
                ]
            else:
                out[kv.key] = getattr(kv.value, kind) if kind else None
        return out


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it; waiters wake on each export."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._changed = asyncio.Condition()

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        async with self._changed:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        kv.value.string_value
                        for kv in resource_spans.resource.attributes
                        if kv.key == SERVICE_NAME
                    ),
                    "",
                )
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(ReceivedSpan(service, s) for s in scope_spans.spans)
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, done: Callable[[list[ReceivedSpan]], bool]) -> list[ReceivedSpan]:
        async with asyncio.timeout(EXPORT_TIMEOUT), self._changed:
            await self._changed.wait_for(lambda: done(self.spans))
            return list(self.spans)


# --- the services as processes --------------------------------------------------------------


@dataclass
class Service:
    name: str
    service_name: str
    process: asyncio.subprocess.Process
    port: int
    metrics_port: int
    log: Path
    channel: grpc.aio.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def base_environment() -> dict[str, str]:
    """The test's environment without any Foredeck or OpenTelemetry setting of its own."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("FOREDECK_", "OTEL_", "PYTEST"))
    }


_HANDED_OUT: set[int] = set()


def unused_port() -> int:
    """A free port not handed to another process of this test: a process started a moment
    ago may not have bound the port it was given yet, and the kernel would offer it again."""
    while True:
        port = free_port()
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


async def start_service(
    name: str, env: Mapping[str, str], tmp: Path, extra: Mapping[str, str], module: str = ""
) -> Service:
    """Start ``python -m <module>`` (default ``foredeck_<name>``) with its settings in ``env``."""
    service_name = name.split("-")[0]
    module = module or f"foredeck_{service_name}"
    prefix = f"FOREDECK_{service_name.upper()}_"
    port, metrics_port = unused_port(), unused_port()
    log = tmp / f"{name}.log"
    full = {
        **env,
        f"{prefix}HOST": "127.0.0.1",
        f"{prefix}PORT": str(port),
        f"{prefix}METRICS_HOST": "127.0.0.1",
        f"{prefix}METRICS_PORT": str(metrics_port),
        f"{prefix}LOG_FORMAT": "json",
        f"{prefix}LOG_LEVEL": "info",
        f"{prefix}GRACE_PERIOD_SECONDS": "2",
        **{prefix + k: v for k, v in extra.items()},
    }
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, env=full, stdout=out, stderr=out
        )
    return Service(name, service_name, process, port, metrics_port, log)


async def wait_serving(service: Service) -> None:
    """Follow the standard health Watch until the service reports SERVING."""
    stub = health_pb2_grpc.HealthStub(service.channel)
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                watch = stub.Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for update in watch:
                        if update.status == health_pb2.HealthCheckResponse.SERVING:
                            watch.cancel()
                            return
                if service.process.returncode is not None:
                    break
    except TimeoutError:
        pass
    tail = "\n".join(service.log_lines()[-30:])
    pytest.fail(f"{service.name} did not become healthy:\n{tail}")


@dataclass
class Stack:
    receiver: Receiver
    services: dict[str, Service]
    delegation: DelegationSigner
    client_provider: TracerProvider
    provider: ScriptedProvider
    principals: PrincipalSigner

    def caller_metadata(self, carrier: Mapping[str, str]) -> Sequence[tuple[str, str]]:
        """What the gateway sends the orchestrator: the caller's principal and the trace."""
        token = self.principals.mint(tenant_id="tenant-t", user_id="user-t", permissions=("*",))
        return ((PRINCIPAL_METADATA_KEY, token), *carrier.items())

    def run_metadata(self, run_id: str, carrier: Mapping[str, str]) -> Sequence[tuple[str, str]]:
        """What the worker sends: a principal for the run, and the trace context."""
        token = self.delegation.mint_for_run(
            RunClaims(tenant_id="tenant-t", user_id="user-t", permissions=("*",)), run_id
        )
        return ((PRINCIPAL_METADATA_KEY, token), *carrier.items())


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(
    redis_server: RedisProcess,
    arcadedb_server: ArcadeDbProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("telemetry-stack")
    receiver = Receiver()
    collector = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        receiver, collector
    )
    collector_port = collector.add_insecure_port("127.0.0.1:0")
    await collector.start()

    provider = ScriptedProvider(embedding_dimensions=EMBEDDING_DIMENSIONS)
    await provider.start()
    graph = f"telemetry_{secrets.token_hex(4)}"
    await arcadedb_server.create_database(graph)
    # A database index of its own on the session's Redis, emptied first.
    redis_url = redis_server.url_for(14)
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()

    principal_keys = {"test": generate_key()}
    principal = format_keys(principal_keys)
    delegation_keys = {"test-delegation": generate_key()}
    env = {
        **base_environment(),
        "PYTHONUNBUFFERED": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    shared = {
        "PRINCIPAL_KEYS": principal,
        "DELEGATION_KEYS": format_keys(delegation_keys),
        "REDIS_URL": redis_url,
    }
    extras = {
        "llmrouter": {
            **shared,
            "OPENAI_API_KEY": "test-key",
            "OPENAI_BASE_URL": provider.openai_base_url,
            "ANTHROPIC_API_KEY": "test-key",
            "ANTHROPIC_BASE_URL": provider.anthropic_base_url,
            "LOCAL_ENABLED": "false",
            "LOCAL_EMBEDDINGS_ENABLED": "false",
        },
        "toolrunner": {**shared, "SANDBOX_POOL_SIZE": "0", "SANDBOX_UID_BASE": "450000"},
        "memory": {
            **shared,
            # Embeddings through the router: memory's own downstream call joins the trace too.
            "EMBEDDING_MODEL": "text-embedding-3-small",
            "EMBEDDING_DIMENSIONS": str(EMBEDDING_DIMENSIONS),
            "NEO4J_URI": arcadedb_server.bolt_uri,
            "NEO4J_USER": arcadedb_server.user,
            "NEO4J_PASSWORD": arcadedb_server.password,
            "NEO4J_DATABASE": graph,
            "EDGE_PATH": str(tmp / "vectors"),
        },
    }
    services: dict[str, Service] = {}
    client_provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "worker-stand-in"}))
    # Exported from the processor's own thread: the receiver answers on this event loop.
    client_provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=f"127.0.0.1:{collector_port}", insecure=True),
            schedule_delay_millis=100,
        )
    )
    try:
        for name in ("llmrouter", "toolrunner"):
            services[name] = await start_service(name, env, tmp, extras[name])
        await asyncio.gather(*(wait_serving(s) for s in services.values()))
        extras["memory"]["LLMROUTER_ADDRESS"] = f"127.0.0.1:{services['llmrouter'].port}"
        services["memory"] = await start_service("memory", env, tmp, extras["memory"])
        await wait_serving(services["memory"])
        orchestrator = {
            **shared,
            **{
                f"{name.upper()}_ADDRESS": f"127.0.0.1:{services[name].port}"
                for name in ("llmrouter", "toolrunner", "memory")
            },
        }
        services["orchestrator-api"] = await start_service(
            "orchestrator-api", env, tmp, orchestrator
        )
        services["orchestrator-worker"] = await start_service(
            "orchestrator-worker", env, tmp, orchestrator, module="foredeck_orchestrator.worker"
        )
        await asyncio.gather(
            wait_serving(services["orchestrator-api"]),
            wait_serving(services["orchestrator-worker"]),
        )
        gateway = {
            "PRINCIPAL_KEYS": principal,
            "REDIS_URL": redis_url,
            "ORCHESTRATOR_ADDRESS": f"127.0.0.1:{services['orchestrator-api'].port}",
            "DATA_DIR": str(tmp / "gateway"),
            "BOOTSTRAP_TENANT": "tenant-t",
            "BOOTSTRAP_USER": "user-t",
        }
        services["gateway"] = await start_service("gateway", env, tmp, gateway)
        await wait_serving(services["gateway"])
        yield Stack(
            receiver,
            services,
            DelegationSigner(delegation_keys, "test-delegation"),
            client_provider,
            provider,
            PrincipalSigner(principal_keys, "test"),
        )
    finally:
        await asyncio.to_thread(client_provider.shutdown)
        for service in services.values():
            if service.process.returncode is None:
                service.process.terminate()
        for service in services.values():
            try:
                async with asyncio.timeout(20):
                    await service.process.wait()
            except TimeoutError:
                service.process.kill()
                await service.process.wait()
            await service.channel.close(None)
        await provider.close()
        await collector.stop(grace=None)
        await arcadedb_server.drop_database(graph)


async def worker_step(stack: Stack, run_id: str, step: str) -> str:
    """Call llmrouter, toolrunner and memory inside one span, as a worker's step does.

    Returns the trace id (hex)."""
    tracer = stack.client_provider.get_tracer("foredeck.test")
    with tracer.start_as_current_span(f"step {step}", kind=SpanKind.INTERNAL) as span:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        metadata = stack.run_metadata(run_id, carrier)
        router = router_grpc.LlmRouterServiceStub(stack.services["llmrouter"].channel)
        answer = await router.Generate(
            router_pb.GenerateRequest(
                model="gpt-4o",
                messages=[
                    chat_pb2.ChatMessage(
                        role=chat_pb2.ROLE_USER,
                        parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text="Plan a trip."))],
                    )
                ],
            ),
            metadata=metadata,
            timeout=30,
        )
        assert answer.usage.input_tokens > 0
        tools = tool_grpc.ToolRunnerServiceStub(stack.services["toolrunner"].channel)
        result = await tools.ExecuteTool(
            tool_pb.ExecuteToolRequest(
                tool_name="calculator",
                arguments_json=json.dumps({"expression": "6*7"}),
                run_id=run_id,
                step_id=step,
                idempotency_key=tool_effect_key(run_id, step),
            ),
            metadata=metadata,
            timeout=30,
        )
        assert json.loads(result.outcome.output.output_json) == {"result": 42}
        memory = memory_grpc.LongTermMemoryServiceStub(stack.services["memory"].channel)
        await memory.Remember(
            memory_pb.RememberRequest(
                request_id=f"{run_id}-{step}", content="The trip goes to Lisbon in May."
            ),
            metadata=metadata,
            timeout=60,
        )
        trace_id = format(span.get_span_context().trace_id, "032x")
    assert await asyncio.to_thread(stack.client_provider.force_flush, 10_000)
    return trace_id


async def test_one_trace_joins_the_step_and_every_service_call(stack: Stack) -> None:
    trace_id = await worker_step(stack, "run-trace", "s1")
    services = {"llmrouter", "toolrunner", "memory"}

    def complete(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        serving = {s.service for s in mine if s.span.kind == SERVER}
        has_llm = any("gen_ai.system" in s.attributes for s in mine)
        has_tool = any("tool.outcome" in s.attributes for s in mine)
        return services <= serving and has_llm and has_tool

    spans = [s for s in await stack.receiver.wait_for(complete) if s.trace_id == trace_id]
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_id]
    assert [(r.service, r.span.name) for r in roots] == [("worker-stand-in", "step s1")]
    root = roots[0]
    # One tree: every span's parent is in the trace.
    assert all(s.parent_id in by_id for s in spans if s is not root)

    # Each call the step made is a child of the step's span.
    direct = {
        s.span.name.rpartition(".")[2]
        for s in spans
        if s.span.kind == SERVER and s.parent_id == root.span_id
    }
    assert direct == {
        "LlmRouterService/Generate",
        "ToolRunnerService/ExecuteTool",
        "LongTermMemoryService/Remember",
    }

    def server_ancestor(span: ReceivedSpan) -> ReceivedSpan:
        while span.span.kind != SERVER:
            span = by_id[span.parent_id]
        return span

    llm = [s for s in spans if "gen_ai.system" in s.attributes]
    operations = {}
    for span in llm:
        assert span.service == "llmrouter"
        attributes = span.attributes
        method = server_ancestor(span).span.name.rpartition("/")[2]
        operations[method] = attributes["gen_ai.operation.name"]
        assert attributes["gen_ai.system"] == "openai"
        assert attributes["gen_ai.usage.input_tokens"] > 0
        if method == "Generate":
            assert attributes["gen_ai.request.model"] == "gpt-4o"
            assert attributes["gen_ai.usage.output_tokens"] > 0
    assert operations == {"Generate": "chat", "Embed": "embeddings"}

    # Memory's own call to the router (embedding the memory) hangs under memory's span.
    (remember,) = [s for s in spans if s.span.name.endswith("LongTermMemoryService/Remember")]
    embeds = [s for s in spans if s.span.name.endswith("LlmRouterService/Embed")]
    served = [s for s in embeds if s.span.kind == SERVER]
    assert served
    for embed in served:
        assert embed.service == "llmrouter"
        caller = by_id[embed.parent_id]
        assert (caller.service, caller.span.kind) == ("memory", trace_pb2.Span.SPAN_KIND_CLIENT)
        assert server_ancestor(caller) is remember

    (tool,) = [s for s in spans if "tool.outcome" in s.attributes]
    assert tool.service == "toolrunner"
    assert server_ancestor(tool).span.name.endswith("ToolRunnerService/ExecuteTool")
    assert tool.attributes["tool.name"] == "calculator"
    assert tool.attributes["tool.outcome"]
    assert tool.attributes["foredeck.run_id"] == "run-trace"


def value(
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        v
        for (sample, sample_labels), v in samples.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


async def test_each_service_counts_the_calls_of_a_step(stack: Stack) -> None:
    services = stack.services
    before = {n: await asyncio.to_thread(s.scrape) for n, s in services.items()}
    await worker_step(stack, "run-metrics", "s1")
    after = {n: await asyncio.to_thread(s.scrape) for n, s in services.items()}

    def moved(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    handled = "grpc_server_handled_total"
    assert moved("llmrouter", handled, grpc_method="Generate", grpc_code="OK") == 1
    assert moved("toolrunner", handled, grpc_method="ExecuteTool", grpc_code="OK") == 1
    assert moved("memory", handled, grpc_method="Remember", grpc_code="OK") == 1
    assert moved("llmrouter", "grpc_server_handling_seconds_count", grpc_method="Generate") == 1
    assert moved("llmrouter", "agent_llm_tokens_total", model="gpt-4o", direction="input") > 0
    assert moved("llmrouter", "agent_llm_tokens_total", model="gpt-4o", direction="output") > 0
    assert moved("toolrunner", "agent_tool_calls_total", tool_name="calculator") == 1
    # The platform's metric families are exported by every service.
    for samples in after.values():
        names = {name for name, _ in samples}
        assert {"grpc_server_handled_total", "process_cpu_seconds_total"} <= names


async def logged(service: Service, *needles: str) -> list[dict[str, Any]]:
    """The service's log lines as JSON, once a line holding every needle is written.

    A background thread writes the lines, so the one wanted may land a moment after the call.
    """
    async with asyncio.timeout(EXPORT_TIMEOUT):
        while True:
            lines = service.log_lines()
            if any(all(n in line for n in needles) for line in lines):
                return [json.loads(line) for line in lines if line.strip()]
            await asyncio.sleep(0.05)


async def test_log_lines_are_json_and_carry_the_trace(stack: Stack) -> None:
    trace_id = await worker_step(stack, "run-logs", "s1")

    for name in ("llmrouter", "toolrunner", "memory"):
        service = stack.services[name]
        records = await logged(service, trace_id)
        assert all(isinstance(r, dict) and r.get("event") for r in records), service.name
        rpcs = [r for r in records if r.get("event") == "rpc" and r.get("trace_id") == trace_id]
        assert rpcs, service.name
        assert all(r["service"] == service.service_name for r in rpcs)
        assert all(r["tenant_id"] == "tenant-t" for r in rpcs)
        # Called with the run's delegated principal: the line names the run.
        assert all(r["run_id"] == "run-logs" for r in rpcs), service.name


async def test_a_run_is_one_trace_from_the_caller_through_the_queue_to_every_service(
    stack: Stack,
) -> None:
    """Gateway → orchestrator API → Redis stream → worker → steps → llmrouter, toolrunner, memory:
    the real path of a run, as one trace rooted at the gateway's CreateRun."""
    model = "gpt-4o-mini"
    plan = {
        "rationale": "Multiply with the calculator.",
        "steps": [
            {
                "kind": "tool_call",
                "description": "multiply",
                "tool_name": "calculator",
                "arguments": {"expression": "6*7"},
            }
        ],
    }
    stack.provider.enqueue(
        TextReply(json.dumps(plan)), TextReply("Six times seven is 42."), model=model
    )
    api = stack.services["orchestrator-api"].channel
    agents = orchestrator_grpc.AgentServiceStub(api)
    await agents.CreateAgent(
        orchestrator_pb.CreateAgentRequest(
            agent=agent_pb2.Agent(
                name="traced",
                model=model,
                allowed_tools=["calculator"],
                memory_policy=agent_pb2.MemoryPolicy(recall_enabled=True, remember_results=True),
            ),
            request_id=uuid.uuid4().hex,
        ),
        metadata=stack.caller_metadata({}),
        timeout=30,
    )
    worker = stack.services["orchestrator-worker"]
    before = await asyncio.to_thread(worker.scrape)
    # The gateway's developer key, as `foredeck up` would leave it for the CLI.
    credentials = json.loads(
        (stack.services["gateway"].log.parent / "gateway" / "credentials.json").read_text()
    )
    key = (("authorization", f"Bearer {credentials['developer']['secret']}"),)
    public = gateway_grpc.GatewayServiceStub(stack.services["gateway"].channel)
    created = await public.CreateRun(
        gateway_pb.CreateRunRequest(
            agent_name="traced", input="What is 6 times 7?", request_id=uuid.uuid4().hex
        ),
        metadata=key,
        timeout=30,
    )
    run_id = created.run.run_id

    async with asyncio.timeout(90):
        while True:
            run = (
                await public.GetRun(
                    gateway_pb.GetRunRequest(run_id=run_id), metadata=key, timeout=10
                )
            ).run
            if run.status >= run_pb2.RUN_STATUS_SUCCEEDED:
                break
            await asyncio.sleep(0.1)
    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED, run
    # The gateway's CreateRun span is the root of the run's trace.
    (create_span,) = [
        s
        for s in await stack.receiver.wait_for(
            lambda spans: any(s.span.name.endswith("GatewayService/CreateRun") for s in spans)
        )
        if s.span.name.endswith("GatewayService/CreateRun")
    ]
    trace_id = create_span.trace_id
    # The worker counted the run, its tool call and its tokens.
    after = await asyncio.to_thread(worker.scrape)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("agent_execution_seconds_count", model=model) == 1
    assert moved("agent_tool_calls_total", tool_name="calculator") == 1
    assert moved("agent_llm_tokens_total", model=model) > 0
    assert value(after, "agent_concurrent_executions") == 0

    # The worker's log lines of the run are JSON and carry the run id and the trace id.
    records = await logged(worker, run_id, "run finished")
    of_run = [r for r in records if r.get("run_id") == run_id]
    assert [r["step_kind"] for r in of_run if r["event"] == "step"] == [
        "recall",
        "plan",
        "tool_call",
        "synthesize",
        "remember",
    ]
    assert {r.get("trace_id") for r in of_run} == {trace_id}

    called = {
        "llmrouter": "LlmRouterService/Generate",
        "toolrunner": "ToolRunnerService/ExecuteTool",
        "memory": "LongTermMemoryService/Remember",
    }

    def complete(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        names = {(s.service, s.span.name.rpartition(".")[2]) for s in mine}
        done = any(s.span.name == "orchestrator.run" and s.span.end_time_unix_nano for s in mine)
        return done and all((service, rpc) in names for service, rpc in called.items())

    spans = [s for s in await stack.receiver.wait_for(complete) if s.trace_id == trace_id]
    by_id = {s.span_id: s for s in spans}

    def chain(span: ReceivedSpan) -> list[ReceivedSpan]:
        """The span and its ancestors, up to the root."""
        out = [span]
        while out[-1].parent_id:
            out.append(by_id[out[-1].parent_id])
        return out

    roots = [s for s in spans if not s.parent_id]
    assert [(r.service, r.span.name) for r in roots] == [
        ("gateway", "foredeck.gateway.v1.GatewayService/CreateRun")
    ]
    assert all(s.parent_id in by_id for s in spans if s.parent_id)

    (submit,) = [
        s for s in spans if s.span.kind == SERVER and s.span.name.endswith("RunService/SubmitRun")
    ]
    assert submit.service == "orchestrator"
    # Gateway server span -> the gateway's client call -> the orchestrator's SubmitRun.
    assert roots[0] in chain(submit)
    assert by_id[submit.parent_id].service == "gateway"
    # The queue hop: the worker's run span continues the submitter's context.
    (run_span,) = [s for s in spans if s.span.name == "orchestrator.run"]
    assert run_span.service == "orchestrator-worker"
    assert submit in chain(run_span)
    steps = sorted(
        (s for s in spans if s.span.name.startswith("step ")),
        key=lambda s: s.span.start_time_unix_nano,
    )
    assert all(step.parent_id == run_span.span_id for step in steps)
    # The agent's loop, in order: recall, plan, the tool call, the answer, remember.
    assert [s.span.name for s in steps] == [
        "step recall",
        "step plan",
        "step tool_call",
        "step synthesize",
        "step remember",
    ]

    for service, rpc in called.items():
        served = [s for s in spans if s.service == service and s.span.name.endswith(rpc)]
        assert served, service
        for server_span in served:
            assert server_span.span.kind == SERVER
            # Worker step -> the worker's client span -> the service's server span.
            caller = by_id[server_span.parent_id]
            assert caller.service == "orchestrator-worker"
            assert caller.span.kind == trace_pb2.Span.SPAN_KIND_CLIENT
            assert by_id[caller.parent_id] in steps, (service, rpc)

    llm = [
        s
        for s in spans
        if s.attributes.get("gen_ai.operation.name") == "chat"
        and s.attributes.get("gen_ai.request.model") == model
    ]
    assert len(llm) >= 2  # the plan and the answer
    assert all(s.attributes["gen_ai.usage.output_tokens"] > 0 for s in llm)
    (tool,) = [s for s in spans if "tool.outcome" in s.attributes]
    assert tool.attributes["tool.name"] == "calculator"
    assert tool.attributes["foredeck.run_id"] == run_id
    assert run_span in chain(tool)
