"""Helpers the tests share, imported as tests.support.<module>: the service stack as
processes, the scheduler's fake worker, a small tokenizer, references to compare with."""
