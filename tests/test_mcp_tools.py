"""The lab driven by an agent: the real app served with gradio's MCP server on a loopback port, called with the real
MCP client (the ``mcp`` package, streamable HTTP). The app runs a shared-Space setup with the dev sign-in (the
stand-in for Hugging Face's, as in tests/test_shared_space.py): a signed-out call cannot start a run; a signed-in
agent (the session cookie the sign-in page gives) starts a tiny run, polls it to completion, and asks a pair."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from helpers import serving, wait_until, write_jsonl

TOOLS = {"lab_list_runs", "lab_estimate", "lab_start_run", "lab_run_status", "lab_stop_run", "lab_chat_pair",
         "lab_evaluate"}


@pytest.fixture(scope="module")
def mcp_app(tmp_path_factory):
    """(app URL, MCP URL) of the app with the dev sign-in and the MCP server on."""
    from app import build_app, close_app
    from components.sign_in import app_kwargs

    with pytest.MonkeyPatch.context() as env:
        env.setenv("LORA_LAB_SIGN_IN", "dev")
        demo = build_app(str(tmp_path_factory.mktemp("runs")))
        try:
            with serving(demo, app_kwargs=app_kwargs(), mcp_server=True) as url:
                yield url, f"{url}gradio_api/mcp/"
        finally:
            close_app(demo)


def session_cookie(url: str, user: str) -> dict[str, str]:
    answer = httpx.get(f"{url}dev-sign-in?user={user}", follow_redirects=False)
    assert answer.status_code == 303
    return {"Cookie": f"session={answer.cookies['session']}"}


async def _with_session(mcp_url: str, headers: dict[str, str], work: Any) -> Any:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    # The client's own timeout bounds one request; a loaded 2-core machine answers a tool call in seconds.
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600.0)) as http:
        async with streamable_http_client(mcp_url, http_client=http) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)


def list_tools(mcp_url: str, headers: dict[str, str] | None = None) -> list[Any]:
    async def work(session: Any) -> list[Any]:
        return (await session.list_tools()).tools
    return asyncio.run(_with_session(mcp_url, headers or {}, work))


def call(mcp_url: str, tool: str, arguments: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    async def work(session: Any) -> str:
        result = await session.call_tool(tool, arguments)
        assert not result.isError, result.content
        return result.content[0].text
    return asyncio.run(_with_session(mcp_url, headers or {}, work))


def test_the_server_lists_exactly_the_curated_tools_with_descriptions(mcp_app):
    _, mcp_url = mcp_app
    tools = {tool.name: tool for tool in list_tools(mcp_url)}
    assert set(tools) == TOOLS
    start = tools["lab_start_run"]
    assert "signed in" in start.description and "config_yaml" in start.inputSchema["properties"]
    assert "cpu-quick" in start.inputSchema["properties"]["config_yaml"]["description"]
    assert all(len(tool.description) > 60 for tool in tools.values())


def test_a_signed_out_call_cannot_start_a_run(mcp_app, tiny_model_dir, qa_file):
    _, mcp_url = mcp_app
    settings = f"model: {{source: '{tiny_model_dir}'}}\ndata: {{source: '{qa_file}'}}\ntraining: {{max_steps: 2}}"
    answer = call(mcp_url, "lab_start_run", {"config_yaml": settings})
    assert answer.startswith("Refused:") and "sign in" in answer.lower(), answer
    assert json.loads(call(mcp_url, "lab_list_runs", {})) == []  # nothing was queued


def test_an_agent_starts_watches_and_chats_through_the_tools(mcp_app, tiny_model_dir, tmp_path):
    url, mcp_url = mcp_app
    alice = session_cookie(url, "alice")
    rows = [{"prompt": f"What does setting {i} control?", "completion": f"Lab note: setting {i}."} for i in range(12)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    settings = (f"model: {{source: '{tiny_model_dir}', bits: 4}}\ndata: {{source: '{data}', max_seq_length: 128}}\n"
                "lora: {rank: 4, alpha: 8}\ntraining: {max_steps: 3, batch_size: 4, eval_steps: 2, save_steps: 2}")

    refused = call(mcp_url, "lab_start_run", {"config_yaml": "training: {max_steps: 0}"}, alice)
    assert refused.startswith("Refused:") and "training.max_steps" in refused

    estimate = json.loads(call(mcp_url, "lab_estimate", {"config_yaml": settings}, alice))
    assert estimate["memory_gb"] > 0 and "trainable" in estimate["trainable_parameters"]

    started = json.loads(call(mcp_url, "lab_start_run", {"config_yaml": settings}, alice))
    run_id = started["run_id"]

    def finished() -> dict[str, Any] | None:
        status = json.loads(call(mcp_url, "lab_run_status", {"run_id": run_id}, alice))
        return status if status["state"] in ("completed", "failed", "stopped") else None

    status = wait_until(finished, f"run {run_id} to finish, polled through lab_run_status", every=1.0)
    assert status["state"] == "completed", status
    assert status["step"] == 3 and status["has_adapter"] and status["last_train_loss"] > 0

    listed = json.loads(call(mcp_url, "lab_list_runs", {}, alice))
    assert [run["run_id"] for run in listed] == [run_id]
    bob = session_cookie(url, "bob")
    assert json.loads(call(mcp_url, "lab_list_runs", {}, bob)) == []  # bob sees none of alice's runs
    assert call(mcp_url, "lab_run_status", {"run_id": run_id}, bob).startswith("Refused:")
    assert "not one of yours" in call(mcp_url, "lab_stop_run", {"run_id": run_id}, bob)
    assert "not one of yours" in call(mcp_url, "lab_chat_pair", {"run_id": run_id, "prompt": "Hi"}, bob)

    pair = json.loads(call(mcp_url, "lab_chat_pair", {"run_id": run_id, "prompt": "What does setting 3 control?",
                                                       "max_new_tokens": 8}, alice))
    assert pair["run_id"] == run_id and isinstance(pair["base"], str) and isinstance(pair["tuned"], str)
    assert pair["base"] and pair["tuned"]

    evaluation = json.loads(call(mcp_url, "lab_evaluate", {"run_id": run_id, "max_rows": 8}, alice))
    models = [row["model"] for row in evaluation["results"]]
    assert len(models) == 2 and models[0].startswith("base") and models[1] == run_id, evaluation
    assert "95% CI of the difference" in evaluation["summary"]
    assert all(row["rows"] == 8 and row["validation loss"] > 0 for row in evaluation["results"])
