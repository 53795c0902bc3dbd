"""The floor under `kvfleet picker`'s CPU per request: what grpcio's asyncio server costs for one
ext_proc stream of k message exchanges when the servicer does nothing (answers every message
with a constant), against the same with grpcio's thread-pool server (issue #18 part 5).

A server process (pinned to --server-core, uvloop as `kvfleet picker` runs) and a grpc.aio client
in this process (pinned to --client-core) that keeps --concurrency streams open; each stream
writes one ProcessingRequest and reads its answer k times, then half-closes. The server's CPU
seconds (from /proc) over --streams streams, per stream.

    .venv/bin/python bench/bench_ext_proc_floor.py [--streams 2000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc  # noqa: E402

from bench.common import report  # noqa: E402
from harness import procs  # noqa: E402

ANSWER = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
MESSAGE = pb.ProcessingRequest(request_headers=pb.HttpHeaders())
EXCHANGES = (1, 2, 3, 4, 6)


class AioServicer(pb_grpc.ExternalProcessorServicer):
    async def Process(self, request_iterator, context):  # noqa: N802 - the gRPC method's name
        async for _ in request_iterator:
            yield ANSWER


class ThreadServicer(pb_grpc.ExternalProcessorServicer):
    def Process(self, request_iterator, context):  # noqa: N802
        for _ in request_iterator:
            yield ANSWER


async def serve_aio(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(AioServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def serve_threads(port: int) -> None:
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=64))
    pb_grpc.add_ExternalProcessorServicer_to_server(ThreadServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


async def drive(port: int, exchanges: int, streams: int, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                call = stub.Process()
                for _ in range(exchanges):
                    await call.write(MESSAGE)
                    await call.read()
                await call.done_writing()
                await call.read()  # the end of the stream

        await asyncio.gather(*[one() for _ in range(50)])  # warm-up
        t = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(streams)])
        return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=2000, help="streams per measurement")
    ap.add_argument("--concurrency", type=int, default=32, help="streams open at once")
    ap.add_argument("--server-core", type=int, default=0)
    ap.add_argument("--client-core", type=int, default=1)
    ap.add_argument("--serve", choices=("aio", "threads"), help=argparse.SUPPRESS)  # the server process
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="results/bench_ext_proc_floor.json")
    args = ap.parse_args()
    if args.serve == "aio":
        import uvloop

        uvloop.install()
        asyncio.run(serve_aio(args.port))
        return 0
    if args.serve == "threads":
        serve_threads(args.port)
        return 0
    os.sched_setaffinity(0, {args.client_core})
    loadavg_start = os.getloadavg()
    rows = []
    for kind in ("aio", "threads"):
        port = procs.free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)],
                                  stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: os.sched_setaffinity(0, {args.server_core}))
        try:
            server.stdout.readline()
            for k in EXCHANGES:
                before = procs.cpu_seconds(server.pid)
                wall = asyncio.run(drive(port, k, args.streams, args.concurrency))
                us = (procs.cpu_seconds(server.pid) - before) * 1e6 / args.streams
                rows.append([{"aio": "grpc.aio (uvloop)", "threads": "grpc thread pool (64)"}[kind], k,
                             round(us), round(args.streams / wall)])
                print(rows[-1], flush=True)
        finally:
            server.terminate()
            server.wait()
    load = f"load average {loadavg_start[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    report(f"ext_proc streams against a servicer that does nothing (server on core {args.server_core}, client on "
           f"core {args.client_core}, {args.concurrency} streams open; {load})",
           ["server", "exchanges per stream", "server CPU µs/stream", "streams/s"], rows, out=args.out,
           extra={"command": " ".join(sys.argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
