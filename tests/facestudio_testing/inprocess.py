"""The real host in this process: its node loader (with custom nodes) and its PromptExecutor."""
from __future__ import annotations

import asyncio
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
        self.executor = execution.PromptExecutor(self.sink, cache_type=execution.CacheType.CLASSIC)

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

    def output(self, result: RunResult, node_id: str, index: int = 0):
        """The value of one node output (the first item of its list, as non-list nodes return)."""
        return result.outputs[node_id][index][0]
