"""Submissions over NATS: every gateway answers requests on ``jetrun.submit`` (one queue group,
so each request is answered once) with the same checks and the same admission as
``POST /v4/runs``: the token names the team, the body is parsed and validated by the gateway's
own parser, and ``runtime.control.submit`` admits and records the run. The answer is the run
(202) or a typed refusal; nothing else. This is how platform services submit
(``RunEvents.submit``): a ``submitted`` event published straight to the log never runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts.api import ErrorDetail, RunCreate
from contracts.run import Run, RunRecord
from contracts.submission import SUBMIT_SUBJECT, SubmitReply, SubmitRequest
from runtime.control.submit import Refused
from runtime.infra.config import Team

log = logging.getLogger("jetrun.submissions")

SUBMIT_QUEUE = "jetrun-gateways"
IN_FLIGHT = 64  # submissions one gateway handles at once; more wait in the buffer
BUFFER = 1024  # beyond this a request is answered 503 at once

_request_decoder = msgspec.json.Decoder(SubmitRequest)
_encoder = msgspec.json.Encoder()

Authenticate = Callable[[str], Team | None]
Parse = Callable[[bytes], RunCreate]
Submit = Callable[[Team, RunCreate, str | None], Awaitable[RunRecord]]


def _refusal(status: int, code: str, message: str) -> SubmitReply:
    return SubmitReply(status=status, detail=ErrorDetail(code=code, message=message))


class SubmissionService:
    def __init__(
        self,
        nc: Client,
        *,
        authenticate: Authenticate,
        parse: Parse,
        submit: Submit,
        view: Callable[[RunRecord], Run],
    ) -> None:
        self.nc = nc
        self.authenticate, self.parse, self.submit, self.view = authenticate, parse, submit, view
        self._send: MemoryObjectSendStream[Msg] | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Answer submissions until cancelled; ``started`` once subscribed."""
        send, receive = anyio.create_memory_object_stream[Msg](BUFFER)
        self._send = send
        sub = await self.nc.subscribe(SUBMIT_SUBJECT, queue=SUBMIT_QUEUE, cb=self._on_request)
        limiter = anyio.Semaphore(IN_FLIGHT)
        try:
            async with send, receive, anyio.create_task_group() as tg:
                task_status.started()
                async for msg in receive:
                    await limiter.acquire()
                    tg.start_soon(self._handle, msg, limiter)
        finally:
            self._send = None
            with anyio.CancelScope(shield=True):
                try:
                    await sub.unsubscribe()
                except Exception as err:  # the connection may be gone already
                    log.debug("unsubscribe %s: %r", SUBMIT_SUBJECT, err)

    async def _on_request(self, msg: Msg) -> None:
        try:
            if self._send is None:
                raise anyio.WouldBlock
            self._send.send_nowait(msg)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            busy = _refusal(503, "busy", "this gateway has too many submissions in flight; retry")
            await self._respond(msg, busy)

    async def _handle(self, msg: Msg, limiter: anyio.Semaphore) -> None:
        try:
            try:
                reply = await self.answer(msg.data)
            except Exception:  # a bug: one request fails, never the gateway that answers it
                log.exception("a submission could not be answered")
                reply = _refusal(500, "internal_error", "the gateway failed; this is a bug")
            await self._respond(msg, reply)
        finally:
            limiter.release()

    async def answer(self, data: bytes) -> SubmitReply:
        """The reply to one request. Never raises (an unexpected error is a 503 reply)."""
        try:
            request = _request_decoder.decode(data)
        except (msgspec.MsgspecError, RecursionError) as err:  # nested past the decoder's limit
            return _refusal(400, "invalid_request", f"not a submit request: {err}")
        team = self.authenticate(request.token)
        if team is None:
            return _refusal(401, "unauthorized", "unknown token")
        try:
            create = self.parse(bytes(request.body))
            run = await self.submit(team, create, request.idempotency_key)
        except Refused as refused:
            retry = refused.headers.get("Retry-After")
            return SubmitReply(
                status=refused.status,
                detail=refused.detail,
                retry_after=float(retry) if retry else None,
            )
        except Exception as err:
            log.exception("submission of team %s failed", team.name)
            return _refusal(503, "event_log_unavailable", f"the submission failed: {err!r}")
        return SubmitReply(status=202, run=self.view(run))

    async def _respond(self, msg: Msg, reply: SubmitReply) -> None:
        if not msg.reply:
            return  # a publish, not a request: nobody to answer
        try:
            await msg.respond(_encoder.encode(reply))
        except Exception as err:  # the requester's connection may be gone
            log.warning("could not answer a submission: %r", err)
