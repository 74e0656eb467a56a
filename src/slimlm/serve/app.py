"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. A client that
disconnects has its request aborted (its KV blocks return to the pool).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimlm.engine.request import RequestOutput
from slimlm.serve.async_engine import AsyncEngine, QueueFullError
from slimlm.serve.metrics import Metrics
from slimlm.serve.protocol import ChatCompletionRequest, CompletionRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


def _param_of(message: str) -> str | None:
    first = message.split()[0] if message else ""
    return first if first.isidentifier() else None


def build_app(engine, model_name: str, api_key: str | None = None, max_queue: int = 256,
              default_max_tokens: int = 256) -> FastAPI:
    metrics = Metrics()
    state: dict = {}

    async def lifespan(app: FastAPI):
        state["engine"] = AsyncEngine(engine, max_queue=max_queue, metrics=metrics)
        yield
        state["engine"].shutdown()

    app = FastAPI(title="slimlm", lifespan=lifespan)
    tok = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        metrics.requests.labels("error").inc()
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        metrics.requests.labels("error").inc()
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('msg', '')}", param=None, code="invalid_json")
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        return error_response(422, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}",
                              param=".".join(loc) or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            expected = f"Bearer {api_key}"
            if not hmac.compare_digest(got.encode(), expected.encode()):
                return error_response(401, "invalid or missing API key", "authentication_error",
                                      code="invalid_api_key")
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def validate(prompt_ids: list[int], params) -> None:
        try:
            engine.validate(prompt_ids, params)
        except ValueError as e:
            msg = str(e)
            if "context" in msg:
                raise APIError(413, msg, param="messages", code="context_length_exceeded") from None
            raise APIError(400, msg, param=_param_of(msg)) from None

    def make_params(body, logprobs):
        try:
            return body.sampling_params(default_max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from None

    async def run(request: Request, prompt_ids: list[int], params) -> AsyncIterator[RequestOutput]:
        rid = uuid.uuid4().hex
        try:
            q = state["engine"].submit(rid, prompt_ids, params)
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        metrics.tokens_in.inc(len(prompt_ids))
        done = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if item is None:
                    done = True
                    return
                if isinstance(item, Exception):
                    done = True
                    raise APIError(500 if isinstance(item, RuntimeError) else 400, str(item),
                                   "server_error" if isinstance(item, RuntimeError) else "invalid_request_error")
                yield item
        finally:
            if not done:
                state["engine"].abort(rid)
                metrics.requests.labels("aborted").inc()
            else:
                metrics.requests.labels("ok").inc()

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "slimlm", "max_model_len": engine.context_length}]}

    def usage(prompt_ids, out: RequestOutput) -> dict:
        c = sum(len(o.token_ids) for o in out.outputs)
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": c, "total_tokens": len(prompt_ids) + c}

    def completion_logprobs(o, offset0: int = 0) -> dict | None:
        if o.logprobs is None:
            return None
        tokens, token_lps, tops, offsets, off = [], [], [], [], offset0
        for t, lp in zip(o.token_ids, o.logprobs):
            s = tok.decode([t], skip_special_tokens=False)
            tokens.append(s)
            token_lps.append(lp.get(t) if lp else None)
            tops.append({tok.decode([k], skip_special_tokens=False): v for k, v in (lp or {}).items()})
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(o, k: int) -> dict | None:
        if o.logprobs is None:
            return None
        content = []
        for t, lp in zip(o.token_ids, o.logprobs):
            s = tok.decode([t], skip_special_tokens=False)
            top = sorted((lp or {}).items(), key=lambda kv: -kv[1])[:k]
            content.append({"token": s, "logprob": (lp or {}).get(t), "bytes": list(s.encode()),
                            "top_logprobs": [{"token": tok.decode([i], skip_special_tokens=False), "logprob": v,
                                              "bytes": list(tok.decode([i], skip_special_tokens=False).encode())}
                                             for i, v in top]})
        return {"content": content}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def respond(request: Request, body, prompt_ids: list[int], params, chat: bool, top_k_lp: int = 0):
        kind = "chat.completion" if chat else "text_completion"
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        validate(prompt_ids, params)
        if not body.stream:
            final = None
            async for out in run(request, prompt_ids, params):
                final = out
            if final is None:
                return Response(status_code=499)
            choices = []
            for o in final.outputs:
                if chat:
                    choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text},
                                    "logprobs": chat_logprobs(o, top_k_lp), "finish_reason": o.finish_reason})
                else:
                    choices.append({"index": o.index, "text": o.text, "logprobs": completion_logprobs(o),
                                    "finish_reason": o.finish_reason})
            return {"id": cid, "object": kind, "created": created, "model": model_name, "choices": choices,
                    "usage": usage(prompt_ids, final)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = run(request, prompt_ids, params)
        try:  # surface queue-full before the 200 status line goes out
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None

        async def events():
            sent_text = {}
            sent_tokens = {}
            last = None
            obj = "chat.completion.chunk" if chat else "text_completion"
            try:
                if chat:
                    for i in range(params.n):
                        yield sse({"id": cid, "object": obj, "created": created, "model": model_name,
                                   "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
                pending = [first] if first is not None else []

                async def stream_outputs():
                    for x in pending:
                        yield x
                    async for x in gen:
                        yield x

                async for out in stream_outputs():
                    last = out
                    for o in out.outputs:
                        prev = sent_text.get(o.index, 0)
                        ntok = sent_tokens.get(o.index, 0)
                        delta = o.text[prev:]
                        if not delta and o.finish_reason is None:
                            continue
                        sent_text[o.index] = len(o.text)
                        sent_tokens[o.index] = len(o.token_ids)
                        part = type(o)(o.index, delta, o.token_ids[ntok:], o.finish_reason,
                                       o.logprobs[ntok:] if o.logprobs is not None else None)
                        if chat:
                            choice = {"index": o.index, "delta": {"content": delta} if delta else {},
                                      "logprobs": chat_logprobs(part, top_k_lp), "finish_reason": o.finish_reason}
                        else:
                            choice = {"index": o.index, "text": delta, "logprobs": completion_logprobs(part),
                                      "finish_reason": o.finish_reason}
                        chunk = {"id": cid, "object": obj, "created": created, "model": model_name,
                                 "choices": [choice]}
                        if include_usage:
                            chunk["usage"] = None
                        yield sse(chunk)
                if include_usage and last is not None:
                    yield sse({"id": cid, "object": obj, "created": created, "model": model_name, "choices": [],
                               "usage": usage(prompt_ids, last)})
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def parse(request: Request, model_cls):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the JSON body must be an object", code="invalid_json")
        from pydantic import ValidationError

        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise APIError(422, f"{loc}: {first['msg']}", param=loc, code="invalid_value") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported; send one prompt per request",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            prompt_ids = tok.encode(prompt)
        else:
            prompt_ids = list(prompt)
        params = make_params(body, body.logprobs)
        return await respond(request, body, prompt_ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatCompletionRequest)
        check_model(body.model)
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=body.add_generation_prompt)
        except Exception as e:  # template errors are the client's
            raise APIError(400, f"chat template failed: {e}", param="messages") from None
        prompt_ids = tok.encode(text, add_special_tokens=False)
        k = body.top_logprobs or 0
        params = make_params(body, k if body.logprobs else None)
        return await respond(request, body, prompt_ids, params, chat=True, top_k_lp=k)

    return app
