"""The public API's gRPC face: decode, call the generation core, encode."""

from collections.abc import AsyncIterator

import grpc
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from services.tokenizer.generation import GenerationCore


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, core: GenerationCore) -> None:
        self._core = core

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        async for message in self._core.generate(request):
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
