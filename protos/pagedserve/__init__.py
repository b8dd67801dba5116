"""pagedserve: the generated protocol code (pagedserve.v1) and the offline Python API,
`from pagedserve import LLM, SamplingParams`, loaded on first use so that importing the
protocol code does not import the engine."""

from typing import Any

_OFFLINE_NAMES = {
    "LLM": "services.offline.llm",
    "RequestOutput": "services.offline.llm",
    "CompletionOutput": "services.offline.llm",
    "SamplingParams": "services.offline.sampling",
    "StructuredOutputsParams": "services.offline.sampling",
}


def __getattr__(name: str) -> Any:
    if name in _OFFLINE_NAMES:
        import importlib

        return getattr(importlib.import_module(_OFFLINE_NAMES[name]), name)
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
