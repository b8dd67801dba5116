"""Speculative decoding on the worker: proposers (n-gram prompt lookup, a draft model)
and the verification of their proposals in one forward of the target."""
