"""Batching on vs off: requests/s and latency of the OpenAI-compatible API under concurrent clients.

    python benchmarks/serve.py [--ckpt outputs/sft] [--clients 8] [--requests 64] [--max-tokens 32]
                               [--rounds 4] [--tasks grounding,caption] [--server-threads 1] [--device cpu]
    python benchmarks/serve.py --quick     # no demo needed: a 1-step model, 2 clients x 4 requests, seconds

Starts two servers on the same checkpoint (``python -m lavis.serve``, each its own process): one
batching (``--max-batch-size 8``), one not (``--max-batch-size 1``). ``--clients`` threads of the
official openai client then send ``--requests`` chat completions to each, as fast as answers come
back: the first user turns of the synthetic world's SFT test conversations of ``--tasks`` with one
picture, the picture as a data URL, greedy, at most ``--max-tokens`` tokens. The default tasks are those
whose answers are sentences or boxes (6-30 tokens), so that the answers are generated, not only read:
a VQA answer is one token, and such a request is all prompt (``--tasks vqa,grounding,caption,multi_turn``
is the whole test mix). The two settings take turns in ``--rounds`` slices, after a warm-up round
each, so that machine noise hits both alike (an idle server waits without using the cores). Each
server runs ``--server-threads`` intra-op threads (OMP_NUM_THREADS): the demo model is tiny and the
clients share the cores; more threads than cores to spare make every step wait (both settings alike).

Prints, per setting, requests/s, the p50 / p95 latency of a request and completion tokens/s, and the
ratio of requests/s batching on / off (target >= 2x on the demo model), over all requests and as the
median of the rounds' ratios (steadier when other processes use the cores now and then).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lavis.processors.conversation import IMAGE_SPAN  # noqa: E402

from machine import quick_model, quick_workdir, warn_if_busy  # noqa: E402  (benchmarks/machine.py)

WORLD = REPO / "data" / "synthetic"
SETTINGS = {"batching on": 8, "batching off": 1}


def test_requests(count: int, tasks: list[str], world: Path = WORLD) -> list[list[dict]]:
    """``count`` OpenAI ``messages`` (cycling if needed): the first user turn of each SFT test
    conversation of ``tasks`` with one picture, the picture as a data URL."""
    found = []
    for conversation in json.loads((world / "sft_test.json").read_text()):
        turn = conversation["conversations"][0]["value"]
        images = IMAGE_SPAN.findall(turn)
        if len(images) != 1 or conversation["meta"]["task"] not in tasks:
            continue
        picture = base64.b64encode((world / images[0].strip()).read_bytes()).decode()
        question = IMAGE_SPAN.sub("", turn).removeprefix("Picture 1: ").strip()
        found.append([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{picture}"}},
            {"type": "text", "text": question}]}])
    if not found:
        raise ValueError(f"no SFT test conversation of the tasks {tasks} has one picture in its first turn")
    return [found[i % len(found)] for i in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """One ``python -m lavis.serve`` process and what its requests measured."""

    name: str
    max_batch_size: int
    port: int
    process: subprocess.Popen
    latencies: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    seconds: float = 0.0
    round_rates: list[float] = field(default_factory=list)  # requests/s of each measured round

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def start_server(name: str, max_batch_size: int, ckpt: str, device: str, threads: int, extra: list[str]) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "lavis.serve", "--ckpt", ckpt, "--device", device, "--port", str(port),
               "--max-batch-size", str(max_batch_size), "--log-level", "warning", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return Server(name, max_batch_size, port, process)


def wait_until_ready(server: Server, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"the {server.name} server exited: {server.process.stderr.read()[-2000:]}")
        try:
            httpx.get(f"{server.url}/models", timeout=5).raise_for_status()
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {server.name} server did not start within {timeout_s} s") from None
            time.sleep(0.5)


def run_round(server: Server, requests: list[list[dict]], clients: int, max_tokens: int, record: bool) -> None:
    """Send ``requests`` from ``clients`` threads at once, each sending its next request when answered."""
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=600)

    def complete(messages: list[dict]) -> tuple[float, int]:
        start = time.perf_counter()
        answer = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=max_tokens)
        return time.perf_counter() - start, answer.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(complete, requests))
    if record:
        seconds = time.perf_counter() - start
        server.seconds += seconds
        server.round_rates.append(len(requests) / seconds)
        server.latencies += [latency for latency, _ in results]
        server.completion_tokens += sum(tokens for _, tokens in results)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="outputs/sft", help="a run's output_dir or a checkpoint")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64, help="per setting, over all rounds")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tasks", default="grounding,caption", help="SFT test tasks to ask, comma-separated")
    parser.add_argument("--server-threads", type=int, default=1, help="each server's intra-op threads")
    parser.add_argument("--batch-window-ms", type=float, help="the servers' --batch-window-ms (default: theirs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="seconds, without make demo: a small world, the model "
                        "after one SFT step as --ckpt, 2 clients, 4 requests in 1 round, 4 tokens (numbers mean nothing)")
    args = parser.parse_args()
    world = WORLD
    if args.quick:
        work = quick_workdir("serve")
        world, args.ckpt = work / "data" / "synthetic", str(quick_model(work))
        args.clients, args.requests, args.rounds, args.max_tokens = 2, 4, 1, 4
    else:
        warn_if_busy()
    per_round = args.requests // args.rounds
    requests = test_requests(per_round * args.rounds, args.tasks.split(","), world)
    extra = [] if args.batch_window_ms is None else ["--batch-window-ms", str(args.batch_window_ms)]
    servers = [start_server(name, size, args.ckpt, args.device, args.server_threads, extra) for name, size in SETTINGS.items()]
    try:
        for server in servers:
            wait_until_ready(server)
        for server in servers:  # warm-up, not measured
            run_round(server, requests[: args.clients], args.clients, args.max_tokens, record=False)
        for r in range(args.rounds):
            for server in servers if r % 2 == 0 else reversed(servers):
                run_round(server, requests[r * per_round: (r + 1) * per_round], args.clients, args.max_tokens, record=True)
    finally:
        for server in servers:
            server.process.terminate()
            server.process.wait(timeout=60)

    print(f"{args.ckpt}: {args.clients} clients, {per_round * args.rounds} requests per setting in {args.rounds} rounds, "
          f"max_tokens {args.max_tokens}, greedy, one picture each (data URL), tasks {args.tasks}; "
          f"{os.cpu_count()} CPUs, --device {args.device}, {args.server_threads} thread(s) per server")
    print(f"{'':22}{'requests/s':>12}{'p50 s':>9}{'p95 s':>9}{'tokens/s':>10}")
    rates = {}
    for server in servers:
        rates[server.name] = len(server.latencies) / server.seconds
        print(f"{server.name + f' ({server.max_batch_size})':22}{rates[server.name]:>12.2f}"
              f"{percentile(server.latencies, 50):>9.3f}{percentile(server.latencies, 95):>9.3f}"
              f"{server.completion_tokens / server.seconds:>10.1f}")
    on, off = servers
    paired = statistics.median(a / b for a, b in zip(on.round_rates, off.round_rates))
    print(f"batching on / off: {rates['batching on'] / rates['batching off']:.2f}x requests/s "
          f"(median of the {args.rounds} paired rounds: {paired:.2f}x; target >= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
