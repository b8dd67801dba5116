"""The OpenAI-compatible HTTP API, served from the tokenizer's own process beside its
gRPC API: the same validation, tokenizing and scheduler session, spoken as JSON."""
