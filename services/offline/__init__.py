"""The offline Python API: the engine in this process, for batch jobs
(`from pagedserve import LLM, SamplingParams`)."""
