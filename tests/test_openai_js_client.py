"""The official `openai` npm package (pinned in tests/js/package.json, locked in package-lock.json) against the
real stack: a chat completion, a streamed completion with usage, and an error, from Node.

Installs the locked packages itself (`npm ci`) when tests/js/node_modules lacks them; skipped only when
node or npm is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import openai
import pytest

JS_DIR = Path(__file__).resolve().parent / "js"


def ensure_node_modules() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    locked = json.loads((JS_DIR / "package-lock.json").read_text())["packages"]["node_modules/openai"]["version"]
    installed = JS_DIR / "node_modules" / "openai" / "package.json"
    if installed.exists() and json.loads(installed.read_text())["version"] == locked:
        return
    result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"


def test_openai_npm_client(tiny_stack):
    ensure_node_modules()
    env = dict(os.environ, OPENAI_BASE_URL=tiny_stack.openai_base_url, MODEL=tiny_stack.model_name,
               OPENAI_API_KEY="unused")
    result = subprocess.run(["node", "client.mjs"], cwd=JS_DIR, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])

    locked = json.loads((JS_DIR / "package-lock.json").read_text())["packages"]["node_modules/openai"]["version"]
    assert seen["sdkVersion"] == locked
    assert seen["chat"]["object"] == "chat.completion" and seen["chat"]["finish"] in ("stop", "length")
    assert seen["chat"]["usage"]["completion_tokens"] >= 1
    stream = seen["stream"]
    assert stream["chunks"] > 2 and stream["ids"] == 1
    assert stream["text"] == seen["whole"]["text"]  # greedy: streamed equals whole
    assert stream["finish"] == seen["whole"]["finish"] == "length"
    assert stream["usage"]["completion_tokens"] == 8

    # The Python client agrees with the Node one on the same greedy request.
    client = openai.OpenAI(base_url=tiny_stack.openai_base_url, api_key="unused", max_retries=0)
    python = client.completions.create(model=tiny_stack.model_name, prompt="The capital of France is", max_tokens=8,
                                       temperature=0)
    assert python.choices[0].text == stream["text"]
    assert seen["notFound"] == {"status": 404, "code": "model_not_found", "param": "model",
                                "type": "invalid_request_error"}
