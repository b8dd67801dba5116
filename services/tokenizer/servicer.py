"""The public API's gRPC face: decode, call the generation core, encode."""

from collections.abc import AsyncIterator

import grpc
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from services.common.caller_auth import bearer_token
from services.tokenizer.generation import GenerationCore
from services.tokenizer.key_gate import KeyGate


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, core: GenerationCore, gate: KeyGate | None = None) -> None:
        self._core = core
        self._gate = gate or KeyGate(None)

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        # The key was checked on the way in (caller_auth); here its policy applies.
        caller = self._gate.caller(bearer_token(context.invocation_metadata()))
        async for message in self._gate.generate(caller, request, self._core.generate):
            yield message

    async def Tokenize(
        self, request: generation_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.TokenizeResponse:
        return await self._core.tokenize(request)

    async def Detokenize(
        self, request: generation_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.DetokenizeResponse:
        return await self._core.detokenize(request)

    async def GetModelInfo(
        self, request: common_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        self._core.ready_frontend  # noqa: B018 - raises UNAVAILABLE until the scheduler reported its model
        return self._core.model
