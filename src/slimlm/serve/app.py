"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Every error uses OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx for
anything the client sent (bad JSON, bad Unicode, unsupported fields, limits). Parsing, the chat
template and tokenization run off the event loop. A client that disconnects has its request
aborted at the next engine step, streaming or not (its KV blocks return to the pool).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimlm.engine.request import RequestOutput
from slimlm.engine.segments import build_segments, chat_segments
from slimlm.errors import SlimLMError
from slimlm.serve.async_engine import AsyncEngine, QueueFullError, RequestFailed, ServerShutdown
from slimlm.serve.chat_input import ChatEncoder
from slimlm.serve.config import ServeConfig
from slimlm.serve.guard import Guard
from slimlm.serve.metrics import Metrics
from slimlm.serve.protocol import ChatCompletionRequest, CompletionRequest, UnsupportedField


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                        headers=headers)


def _param_of(message: str) -> str | None:
    first = message.split()[0] if message else ""
    return first if first.isidentifier() else None


def _load_json(raw: bytes):
    """Parse a body; APIError(400) for malformed JSON, pathological nesting or invalid Unicode."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # includes bytes that are not UTF-8
        raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the JSON body must be an object", code="invalid_json")
    try:  # JSON may spell lone surrogates ("\ud800"): not text any tokenizer can take
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the body contains invalid Unicode (a lone surrogate such as \\ud800)",
                       code="invalid_unicode") from None
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply", code="invalid_json") from None
    return data


class ServerState:
    """What the process-level server (SIGTERM handling) needs to reach inside the app."""

    def __init__(self):
        self.engine: AsyncEngine | None = None
        self.draining = False

    def begin_shutdown(self) -> None:
        self.draining = True

    def drain(self) -> None:
        if self.engine is not None:
            self.engine.drain()


def build_app(engine, model_name: str, config: ServeConfig | None = None, *, api_key: str | None = None,
              **overrides) -> FastAPI:
    """The FastAPI app over ``engine``. ``config`` (or its fields as keywords) sets the limits;
    ``api_key`` is a shorthand for ``api_keys=[api_key]``."""
    if config is None:
        unknown = set(overrides) - set(ServeConfig.names())
        if unknown:
            raise ValueError(f"unknown server settings {sorted(unknown)}; valid: {ServeConfig.names()}")
        if api_key:
            overrides.setdefault("api_keys", [api_key])
        config = ServeConfig(**overrides)
    cfg = config
    metrics = Metrics()
    state = ServerState()

    async def lifespan(app: FastAPI):
        state.engine = AsyncEngine(engine, max_queue=cfg.max_queue, metrics=metrics,
                                   stats_interval_s=cfg.stats_interval_s)
        yield
        state.engine.shutdown()

    app = FastAPI(title="slimlm", lifespan=lifespan)
    app.state.slimlm = state
    app.add_middleware(Guard, config=cfg, draining=lambda: state.draining)
    tok = engine.tokenizer
    chat_encoder = ChatEncoder(tok)
    bounded_context = engine.policy is not None and engine.policy.max_blocks(1, 1) is not None

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        metrics.requests.labels("error").inc()
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        metrics.requests.labels("error").inc()
        first = (e.errors() or [{}])[0]
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        return error_response(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}",
                              param=".".join(loc) or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        return error_response(500, f"internal server error: {type(e).__name__}", "server_error")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def resolve_max_tokens(body, prompt_len: int, param: str) -> int:
        """OpenAI's context check with the numbers; the default is clipped to the room left."""
        want = body.requested_max_tokens
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if want is not None and want < 1:
            raise APIError(400, f"{name} must be at least 1, got {want}", param=name, code="invalid_value")
        if bounded_context:
            return want if want is not None else cfg.default_max_tokens
        ctx = engine.context_length
        if want is None:
            if prompt_len >= ctx:
                raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {param} "
                                    f"has {prompt_len} tokens. Please reduce the length of the {param}.",
                               param=param, code="context_length_exceeded")
            return min(cfg.default_max_tokens, ctx - prompt_len)
        if prompt_len + want > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_len + want} tokens ({prompt_len} in the {param}, {want} in the completion). "
                                f"Please reduce the length of the {param} or completion.",
                           param=param, code="context_length_exceeded")
        return want

    def cache_salt(request: Request, body) -> str | None:
        parts = []
        key = request.scope.get("state", {}).get("api_key")
        if cfg.cache_isolation == "key" and key is not None:
            parts.append("key:" + hashlib.sha256(key.encode()).hexdigest())
        if body.cache_salt:
            parts.append("salt:" + body.cache_salt)
        return "\n".join(parts) or None

    def make_params(request: Request, body, prompt_ids: list[int], logprobs: int | None, param: str, layout=None):
        if body.n > cfg.max_n:
            raise APIError(400, f"n must be at most {cfg.max_n} on this server (--max-n), got {body.n}", param="n",
                           code="invalid_value")
        max_tokens = resolve_max_tokens(body, layout.span if layout is not None else len(prompt_ids), param)
        try:
            params = body.sampling_params(max_tokens, logprobs, cache_salt(request, body))
            engine.validate(prompt_ids, params, layout)
        except ValueError as e:
            msg = str(e)
            raise APIError(400, msg, param=_param_of(msg) or (param if "prompt" in msg else None),
                           code="invalid_value") from None
        return params

    async def parse(request: Request, model_cls):
        data = await asyncio.to_thread(_load_json, await request.body())
        from pydantic import ValidationError

        try:
            body = model_cls.model_validate(data)
            body.check_fields()
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            msg = f"Missing required parameter: '{loc}'" if first["type"] == "missing" else f"{loc}: {first['msg']}"
            raise APIError(400, msg, param=loc, code="invalid_value") from None
        except UnsupportedField as e:
            raise APIError(400, str(e), param=e.field, code="unsupported_parameter") from None
        except RecursionError:
            raise APIError(400, "the JSON body is nested too deeply", code="invalid_json") from None
        check_model(body.model)
        return body

    async def watch_disconnect(request: Request, rid: str, gone: list) -> None:
        """Non-streaming: abort the request as soon as its client goes away."""
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                gone.append(True)
                state.engine.abort(rid)
                return

    async def run(rid: str, prompt_ids: list[int], params, access: dict, layout=None) -> AsyncIterator[RequestOutput]:
        try:
            q = state.engine.submit(rid, prompt_ids, params, layout)
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except ServerShutdown as e:
            raise APIError(503, str(e), "server_error", code="server_shutting_down") from None
        metrics.tokens_in.inc(len(prompt_ids))
        t0, done = time.perf_counter(), False
        try:
            while True:
                item = await q.get()
                if item is None:
                    done = True
                    return
                if isinstance(item, ServerShutdown):
                    done = True
                    raise APIError(503, str(item), "server_error", code="server_shutting_down",
                                   headers={"Retry-After": "5"})
                if isinstance(item, RequestFailed):
                    done = True
                    raise APIError(500, f"this request failed: {item}", "server_error", code="request_failed")
                if isinstance(item, Exception):
                    done = True
                    raise APIError(400, str(item), param=_param_of(str(item)))
                n = sum(len(o.token_ids) for o in item.outputs)
                if n and "ttft" not in access:
                    access["ttft"] = time.perf_counter() - t0
                access["output_tokens"] = n
                yield item
        finally:
            if not done:
                state.engine.abort(rid)
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

    async def respond(request: Request, body, prompt_ids: list[int], params, chat: bool, top_k_lp: int = 0,
                      layout=None):
        kind = "chat.completion" if chat else "text_completion"
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        access = request.scope["state"]["access"]
        access["id"] = cid
        rid = cid
        if not body.stream:
            final, gone = None, []
            watcher = asyncio.create_task(watch_disconnect(request, rid, gone))
            try:
                async for out in run(rid, prompt_ids, params, access, layout):
                    final = out
            finally:
                watcher.cancel()
            if gone or final is None or not final.finished:
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
        gen = run(rid, prompt_ids, params, access, layout)
        try:  # surface queue-full (and other early errors) before the 200 status line goes out
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None

        async def events():
            sent_text, sent_tokens, last = {}, {}, None
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
                yield "data: [DONE]\n\n"
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        if body.segments is not None:  # set-based / segmented prompt (engine/segments.py)
            try:
                prompt_ids, layout = await asyncio.to_thread(
                    build_segments, body.segments, lambda t: tok.encode(t, add_special_tokens=False))
            except ValueError as e:
                raise APIError(400, str(e), param="segments", code="invalid_value") from None
            request.scope["state"]["access"]["prompt_tokens"] = len(prompt_ids)
            params = await asyncio.to_thread(make_params, request, body, prompt_ids, body.logprobs, "segments",
                                             layout)
            return await respond(request, body, prompt_ids, params, chat=False, layout=layout)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported; send one prompt per request",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            prompt_ids = await asyncio.to_thread(tok.encode, prompt)
        else:
            prompt_ids = list(prompt)
        request.scope["state"]["access"]["prompt_tokens"] = len(prompt_ids)
        params = await asyncio.to_thread(make_params, request, body, prompt_ids, body.logprobs, "prompt")
        return await respond(request, body, prompt_ids, params, chat=False)

    def chat_prompt_segments(msgs, add_generation_prompt):
        render = lambda m: tok.apply_chat_template(m, add_generation_prompt=add_generation_prompt)  # noqa: E731
        segs = chat_segments([{k: v for k, v in m.items() if v is not None} for m in msgs], render,
                             lambda t: tok.encode(t, add_special_tokens=False), chat_encoder.encode_text)
        return build_segments(segs, chat_encoder.encode_text)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatCompletionRequest)
        try:
            msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        except UnsupportedField as e:
            raise APIError(400, str(e), param=e.field, code="unsupported_parameter") from None
        if any((m.model_extra or {}).get("segments") is not None for m in body.messages):  # engine/segments.py
            for m, d in zip(body.messages, msgs):
                d["segments"] = (m.model_extra or {}).get("segments")
            try:
                prompt_ids, layout = await asyncio.to_thread(chat_prompt_segments, msgs, body.add_generation_prompt)
            except (ValueError, SlimLMError) as e:
                raise APIError(400, str(e), param="messages", code="invalid_value") from None
            request.scope["state"]["access"]["prompt_tokens"] = len(prompt_ids)
            k = body.top_logprobs or 0
            params = await asyncio.to_thread(make_params, request, body, prompt_ids, k if body.logprobs else None,
                                             "messages", layout)
            return await respond(request, body, prompt_ids, params, chat=True, top_k_lp=k, layout=layout)
        try:
            prompt_ids = await asyncio.to_thread(chat_encoder.encode, msgs, body.add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - template errors are the client's
            raise APIError(400, f"chat template failed: {e}", param="messages") from None
        request.scope["state"]["access"]["prompt_tokens"] = len(prompt_ids)
        k = body.top_logprobs or 0
        lp = k if body.logprobs else None
        params = await asyncio.to_thread(make_params, request, body, prompt_ids, lp, "messages")
        return await respond(request, body, prompt_ids, params, chat=True, top_k_lp=k)

    return app
