"""The real host in this process: its node loader (with custom nodes) and its PromptExecutor."""
from __future__ import annotations

import asyncio
import inspect
import uuid
from dataclasses import dataclass, field
from typing import Any

from .bootstrap import BootedHost


class _MessageSink:
    """Stands where the host's PromptServer would: the executor only talks to it through these."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node": node_id, "text": text}))

    def queue_updated(self):
        pass


@dataclass
class RunResult:
    success: bool
    outputs: dict[str, dict]          # node id -> the executor's cached output values, by output index
    ui: dict[str, Any]                # node id -> UI output (e.g. SaveImage's images)
    error: str | None = None          # the failing node's exception message, or the validation error
    error_node: str | None = None
    error_type: str | None = None
    messages: list = field(default_factory=list)


def make_executor(server):
    """The host's PromptExecutor with the classic (dump as soon as unused) cache, as main.py makes it:
    hosts from about 0.3.70 on take `cache_args` (and read its "ram" entries on every prompt)."""
    import execution

    options = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        options["cache_args"] = {"lru": 0, "ram": 0, "ram_inactive": 0}
    return execution.PromptExecutor(server, **options)


class InProcessHost:
    def __init__(self, booted: BootedHost):
        import execution
        import nodes
        import server

        self.booted = booted
        self.sink = _MessageSink()
        server.PromptServer.instance = self.sink
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.node_classes = nodes.NODE_CLASS_MAPPINGS
        self.executor = make_executor(self.sink)

    def run(self, prompt: dict, outputs: list[str] | None = None) -> RunResult:
        """Validates and executes an API-format prompt. `outputs` defaults to the prompt's output nodes."""
        import execution

        prompt_id = str(uuid.uuid4())
        valid, error, good_outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, outputs))
        if not valid:
            details = "; ".join(
                f"node {nid}: " + ", ".join(e.get("details") or e.get("message", "") for e in info.get("errors", []))
                for nid, info in node_errors.items()
            )
            return RunResult(False, {}, {}, error=f"{error.get('message')} {error.get('details', '')} {details}".strip(),
                             error_type="validation")
        self.executor.execute(prompt, prompt_id, {"client_id": "facestudio-tests"}, good_outputs)
        values = {}
        for node_id in prompt:
            cached = self.executor.caches.outputs.get(node_id)
            if inspect.isawaitable(cached):  # a coroutine from about 0.3.66 on
                cached = asyncio.run(cached)
            if cached is not None:
                values[node_id] = cached.outputs if hasattr(cached, "outputs") else cached
        result = RunResult(self.executor.success, values, self.executor.history_result.get("outputs", {}),
                           messages=list(self.executor.status_messages))
        for event, data in self.executor.status_messages:
            if event == "execution_error":
                result.error = data["exception_message"]
                result.error_node = data["node_id"]
                result.error_type = data["exception_type"]
        return result

    def refusal(self, prompt: dict, node_id: str) -> str:
        """The message with which `node_id` refuses its inputs when `prompt` runs.

        Hosts from about 0.3.66 on check combo values against their options before any node runs (0.3.64
        and older did not, for V3 combos): there the value never reaches the node, so this checks that
        the host's refusal names the node, then runs the node's own execute on the same inputs, as the
        older hosts do, and returns what it raises. Either way the node must refuse."""
        result = self.run(prompt)
        assert not result.success, f"node {node_id} accepted {prompt[node_id]['inputs']}"
        if result.error_type != "validation":
            assert result.error_node == node_id, (result.error_node, result.error)
            return result.error
        assert f"node {node_id}:" in result.error and "not in" in result.error.lower(), result.error
        node = prompt[node_id]
        inputs = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}  # widget values only
        cls = self.node_classes[node["class_type"]]
        try:
            outcome = cls.execute(**inputs)
        except Exception as error:  # the node's own refusal, as the executor would report it
            return str(error)
        raise AssertionError(f"{node['class_type']}.execute accepted {inputs} (returned {outcome!r})")

    def output(self, result: RunResult, node_id: str, index: int = 0):
        """The value of one node output (the first item of its list, as non-list nodes return)."""
        return result.outputs[node_id][index][0]
