"""What the HTTP API's end-to-end tests share: the model's id, prompts, and the gRPC API's
answer to compare with."""

from pagedserve.v1 import common_pb2, generation_pb2

from tests.support.service_stack import Stack

MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 12
PROMPT = "The capital of France is"
# Longer than a KV block (16 tokens), so that a repeat finds cached blocks.
LONG_PROMPT = "Paged attention keeps the keys and values of each sequence in fixed-size blocks, " * 3
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def grpc_text(stack: Stack, **prompt) -> str:
    """The gRPC API's greedy answer of MAX_TOKENS tokens to `prompt` (GenerateRequest fields)."""
    request = generation_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS), **prompt
    )
    return "".join(message.text for message in stack.generation.Generate(request, timeout=300))
