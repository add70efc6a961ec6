"""A small OpenAI-compatible chat-completions server for the tests (Starlette + uvicorn, loopback).

It answers deterministically from the prompt: a cell whose gene line holds ``MARKER`` among its
first three genes is "sensitive", any other cell "resistant"; P(sensitive) falls with the marker's
rank. On request it returns HTTP 429s, 500s, slow answers (client timeouts), a non-JSON body,
malformed answer JSON, answers that leave out the last cell, a refusal (HTTP 400) after N answers,
and token log-probabilities when asked (``logprobs``/``top_logprobs``), with the label words split
into two tokens (``sens|itive``, ``res|istant``) as real tokenisers do.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

_CELL_LINE = re.compile(r"^Cell (\d+): (.*)$", re.MULTILINE)
_TOKEN = re.compile(r"sens|itive|res|istant|\w+|\s+|[^\w\s]")


@dataclass
class Behaviour:
    """What the server does next; tests change it between runs."""

    marker: str = "MARKER"
    fail_429: int = 0
    """The next N requests get HTTP 429 (Retry-After: 0)."""
    fail_500: int = 0
    slow: int = 0
    """The next N requests wait ``slow_s`` before answering."""
    slow_s: float = 1.0
    garbage: int = 0
    """The next N requests get HTTP 200 with a body that is not JSON."""
    refuse_after: int | None = None
    """After this many answers, every request gets HTTP 400."""
    malformed: Callable[[str], bool] | None = None
    """Prompt text -> answer with broken JSON."""
    omit_last: bool = False
    """Leave the last cell out of every answer."""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    """Every request body received (failed ones too)."""
    answered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.fail_429 = self.fail_500 = self.slow = self.garbage = 0
            self.refuse_after, self.malformed, self.omit_last = None, None, False
            self.bodies.clear()
            self.answered = 0

    def take(self, name: str) -> bool:
        """Use up one of the next-N failures called ``name``."""
        with self.lock:
            left = getattr(self, name)
            if left > 0:
                setattr(self, name, left - 1)
                return True
            return False


def cell_genes(prompt: str) -> list[list[str]]:
    """Gene lists of the cells asked about (``Cell i: A, B``; examples are ``Example i ...``)."""
    cells = []
    for _, genes in _CELL_LINE.findall(prompt):
        cells.append([] if genes.startswith("(") else [g.strip() for g in genes.split(",")])
    return cells


def p_sensitive(genes: list[str], marker: str) -> float:
    """The server's P(sensitive) of a cell: high when the marker is among the first three genes."""
    if marker in genes[:3]:
        return 0.95 - 0.1 * genes.index(marker)
    if marker in genes:
        return 0.45
    return 0.1 + 0.01 * min(len(genes), 10)


def _token(text: str, logprob: float, alternatives: list[tuple[str, float]]) -> dict[str, Any]:
    top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives]
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": top}


def _logprobs(content: str, scores: list[float], top_n: int) -> list[dict[str, Any]]:
    out, label = [], 0
    pieces = _TOKEN.findall(content)
    for i, piece in enumerate(pieces):
        following = pieces[i + 1] if i + 1 < len(pieces) else ""
        if piece in ("sens", "res") and following in ("itive", "istant"):
            p = scores[label]
            label += 1
            chosen = p if piece == "sens" else 1 - p
            other = "res" if piece == "sens" else "sens"
            alternatives = [(piece, math.log(chosen)), (other, math.log(max(1e-9, 1 - chosen)))][:max(top_n, 1)]
            out.append(_token(piece, math.log(chosen), alternatives if top_n else []))
        else:
            out.append(_token(piece, -0.001, [(piece, -0.001)] if top_n else []))
    return out


def _answer(body: dict[str, Any], behaviour: Behaviour) -> dict[str, Any]:
    text = "\n".join(str(m.get("content", "")) for m in body["messages"])
    cells = cell_genes(text)
    scores = [p_sensitive(g, behaviour.marker) for g in cells]
    labels = ["sensitive" if p >= 0.5 else "resistant" for p in scores]
    if behaviour.omit_last and cells:
        labels, scores = labels[:-1], scores[:-1]
    fmt = (body.get("response_format") or {}).get("type")
    if fmt in ("json_object", "json_schema"):
        content = json.dumps({"cells": [{"cell": i, "response": lab} for i, lab in enumerate(labels, 1)]})
    else:
        content = "Here are my answers.\n" + "\n".join(f"Cell {i}: {lab}" for i, lab in enumerate(labels, 1))
    if behaviour.malformed is not None and behaviour.malformed(text):
        content = content[: len(content) // 2]  # cut mid-way: no valid JSON
        scores = []
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                              "logprobs": None}
    if body.get("logprobs") and scores:
        choice["logprobs"] = {"content": _logprobs(content, scores, int(body.get("top_logprobs") or 0))}
    n_prompt = len(text.split())
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [choice], "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(content.split()),
                                           "total_tokens": n_prompt + len(content.split())}}


def make_app(behaviour: Behaviour) -> Starlette:
    async def completions(request: Request) -> Response:
        body = await request.json()
        with behaviour.lock:
            behaviour.bodies.append(body)
        if behaviour.take("fail_429"):
            return JSONResponse({"error": {"message": "rate limited", "type": "rate_limit"}}, status_code=429,
                                headers={"retry-after": "0"})
        if behaviour.take("fail_500"):
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        if behaviour.take("slow"):
            await asyncio.sleep(behaviour.slow_s)
        if behaviour.take("garbage"):
            return PlainTextResponse("<html>bad gateway</html>", status_code=200, media_type="application/json")
        with behaviour.lock:
            if behaviour.refuse_after is not None and behaviour.answered >= behaviour.refuse_after:
                return JSONResponse({"error": {"message": "quota exceeded for today", "type": "invalid_request"}},
                                    status_code=400)
            behaviour.answered += 1
        return JSONResponse(_answer(body, behaviour))

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-llm", "object": "model"}]})

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"])])


class FakeServer:
    """The app on a free loopback port, served by uvicorn in a daemon thread."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(make_app(self.behaviour), log_level="error", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the fake LLM server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()
