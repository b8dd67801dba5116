"""Greedy generations streamed from a process of their own, each message's arrival time
kept: other users of a stack, whose pace a test watches while it sends heavy requests.
Their own process, because the test's heavy client work (copying a 50 MB message,
uploading a 50 MB body) would otherwise stall these readers on its interpreter lock and
show a gap the server never made."""

import multiprocessing
import threading
import time
from multiprocessing.synchronize import Event

import grpc
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

# Longer than any test watches: the streams are cancelled when the test is done.
MAX_TOKENS = 2000


def _stream(stub: generation_pb2_grpc.GenerationStub, index: int, arrivals: list[float], stop: Event) -> None:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    request = generation_pb2.GenerateRequest(prompt=f"Count to a hundred, take {index}:", sampling=sampling)
    call = stub.Generate(request, timeout=600)
    for _ in call:
        arrivals.append(time.monotonic())
        if stop.is_set():
            call.cancel()
            return


def _run(
    address: str, num_streams: int, under_way: Event, stop: Event, results: multiprocessing.Queue
) -> None:
    arrivals: list[list[float]] = [[] for _ in range(num_streams)]
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        threads = [
            threading.Thread(target=_stream, args=(stub, index, arrivals[index], stop))
            for index in range(num_streams)
        ]
        for thread in threads:
            thread.start()
        while not all(len(times) >= 3 for times in arrivals):
            time.sleep(0.01)
        under_way.set()
        for thread in threads:
            thread.join()
    results.put(arrivals)


class PacedStreams:
    """`num_streams` streams to `address`, under way on entry, cancelled on exit."""

    def __init__(self, address: str, num_streams: int = 3) -> None:
        context = multiprocessing.get_context("spawn")
        self._under_way = context.Event()
        self._stop = context.Event()
        self._results: multiprocessing.Queue = context.Queue()
        self._process = context.Process(
            target=_run, args=(address, num_streams, self._under_way, self._stop, self._results), daemon=True
        )
        self.arrivals: list[list[float]] = []
        self.stopped_at = 0.0

    def __enter__(self) -> "PacedStreams":
        self._process.start()
        assert self._under_way.wait(timeout=300), "the streams did not get under way"
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped_at = time.monotonic()
        self._stop.set()
        self.arrivals = self._results.get(timeout=120)
        self._process.join(timeout=30)

    def max_gap_s(self) -> float:
        """The longest wait for a message of any stream while they were watched (up to the
        moment they were stopped, so that a stream that fell silent counts too)."""
        longest = 0.0
        for times in self.arrivals:
            watched = [t for t in times if t <= self.stopped_at] + [self.stopped_at]
            longest = max(longest, *(b - a for a, b in zip(watched, watched[1:])))
        return longest
