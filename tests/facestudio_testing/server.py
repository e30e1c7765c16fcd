"""The real ComfyUI server (main.py) in a subprocess, on a free loopback port."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .bootstrap import host_dir, make_base_directory


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
LEVEL_TAG = re.compile(r"^\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] ?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Starts main.py --cpu with its own --base-directory; always stopped by stop()."""

    def __init__(self, startup_timeout: float = 120.0):
        self.base = make_base_directory("facestudio-server-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self._node_types: set[str] | None = None

    @property
    def models(self) -> Path:
        return self.base / "models"

    def start(self) -> "ComfyServer":
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base), "--use-pytorch-cross-attention", "--disable-auto-launch",
             *self._own_database()],
            cwd=host_dir(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} on start-up:\n{self.log()[-4000:]}")
            try:
                self.get_json("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {self.startup_timeout}s:\n{self.log()[-4000:]}")

    def _own_database(self) -> list[str]:
        """Hosts with a database (v0.33) keep it in <host>/user/comfyui.db whatever --base-directory says, and
        a second server on the same host cannot take its lock ("Failed to initialize database"): each test
        server gets its own, in its base directory."""
        if "--database-url" not in (Path(host_dir()) / "comfy" / "cli_args.py").read_text():
            return []
        (self.base / "user").mkdir(parents=True, exist_ok=True)
        return ["--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_messages(self) -> list[str]:
        """The log's lines as messages: without the colour codes and `[INFO]`-style level tags that
        hosts from about 0.3.70 put in front of each line."""
        return [LEVEL_TAG.sub("", ANSI_ESCAPE.sub("", line), count=1) for line in self.log().splitlines()]

    # --- HTTP client ----------------------------------------------------------------------
    def request(self, path: str, data: dict | None = None, timeout: float = 30.0) -> bytes:
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str):
        return json.loads(self.request(path))

    def node_types(self) -> set[str]:
        """Every node type the server defines (/object_info), read once."""
        if self._node_types is None:
            self._node_types = set(self.get_json("/object_info"))
        return self._node_types

    def queue_prompt(self, prompt: dict) -> str:
        """POST /prompt; raises with the host's validation errors when it refuses the prompt."""
        try:
            answer = json.loads(self.request("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())}))
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"/prompt refused the prompt: {e.read().decode(errors='replace')}") from None
        return answer["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Polls /history until the prompt is done; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") == "error" or entry["status"].get("completed"):
                    return entry
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout}s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        return self.wait_for(self.queue_prompt(prompt), timeout)

    def refusal(self, prompt: dict, timeout: float = 300.0) -> str | None:
        """Why the server refused or failed `prompt`: /prompt's validation errors (from about 0.3.66 on,
        a combo value outside its list stops there), else the execution error; None if it ran."""
        try:
            entry = self.run(prompt, timeout)
        except RuntimeError as refused:
            if "/prompt refused the prompt" not in str(refused):
                raise
            return str(refused)
        return execution_error(entry)

    def view(self, filename: str, subfolder: str = "", folder_type: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
        return self.request(f"/view?{query}")


def execution_error(entry: dict) -> str | None:
    """The exception message of a failed prompt's history entry, or None if it succeeded."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return f"{data['node_type']} (node {data['node_id']}): {data['exception_message']}"
    return None
