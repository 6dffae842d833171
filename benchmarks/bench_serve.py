"""`vitdense serve` under a bounded load on 127.0.0.1: queries/s and p50/p99 latency at 1, 8 and 32 concurrent
clients, with and without the batching window, beside `vitdense search` run once per query; errors and lost
requests counted; server memory over a soak.

    python benchmarks/bench_serve.py                         # the defaults below (about 5 minutes on 2 cores)
    python benchmarks/bench_serve.py --soak-s 300            # the 5-minute memory soak
    python benchmarks/bench_serve.py --model vitdense_vits8 --load-size 224 --device cuda

Set-up: an index of scikit-image's photos (15 pictures + the stereo pair) built with ``vitdense index`` (the
bundled ViT-S/8 by default, shorter side ``--load-size``); the queries are 16 other views of those photos
(crops, flips) all resized to 160x120 px JPEGs, so that their network inputs have one shape and can share a
forward pass (the batcher groups equal shapes; index with --square to batch any mix of aspect ratios).

Load: one `vitdense serve` process on a free port for each server setting (batching: ``--batch-window-ms 5
--max-batch 32``; none: ``--max-batch 1``), both running from the start; for each client count C the two
settings are measured one after the other, so that both see the same load from other jobs on the machine. C
asyncio clients (one httpx connection each) POST the query images round-robin until max(``--requests``, 6 C)
answers have been asked for or ``--seconds`` have passed (whichever first), after a warm-up. Throughput is
measured in the steady state: from the moment C answers have come back (every client has had a turn, the
ramp-up in which the first batch holds only the first arrivals is over) to the last answer, counting the
answers in between (``qps``); ``qps_overall`` counts all answers from the first request on. Latency: request
sent → answer read, per request. Errors: any answer other than 200 or a transport error; lost: sent but never
answered. Baseline: `vitdense search` as a fresh process per query (model load included: what a shell user
pays), over ``--baseline`` queries. The server's own figures are reported too: forward passes, mean batch
and the forward time per query (/stats), and the CPU time the server process used per query (psutil), a
cost that depends much less than queries/s on how busy the machine is.

Soak: the batching server under 8 clients for ``--soak-s`` seconds; its resident memory (psutil) sampled every
2 s; reported: after warm-up, at the end, peak, and the slope of a least-squares line (MB/min).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
       "HF_HUB_OFFLINE": "1"}
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "camera", "coins", "horse", "brick", "gravel", "moon", "page"]


def vitdense(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitdense", *args], env=ENV, check=True, capture_output=True,
                          text=True, **kw)


def make_data(work: Path, model: str, load_size: int, device: str) -> tuple[Path, list[bytes], list[Path]]:
    from skimage import data

    coll = work / "photos"
    coll.mkdir()
    arrays = {}
    for name in PHOTOS:
        arr = getattr(data, name)()
        arr = arr.astype(np.uint8) * 255 if arr.dtype == bool else arr
        arrays[name] = np.asarray(Image.fromarray(arr).convert("RGB"))
        Image.fromarray(arrays[name]).save(coll / f"{name}.jpg", quality=92)
    left, right, _ = data.stereo_motorcycle()
    Image.fromarray(left).save(coll / "motorcycle_left.jpg", quality=92)
    vitdense("index", str(coll), "--out", str(work / "index"), "--model", model, "--load-size", str(load_size),
             "--device", device, "--workers", "0")
    queries, files = [], []
    rng = np.random.default_rng(0)
    sources = list(arrays.values()) + [right]
    for i in range(16):
        arr = sources[i % len(sources)]
        h, w = arr.shape[:2]
        top, lft = rng.integers(0, h // 5), rng.integers(0, w // 5)
        crop = arr[top: top + int(h * 0.8), lft: lft + int(w * 0.8)]
        im = Image.fromarray(crop[:, ::-1] if i % 2 else crop).resize((160, 120))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        queries.append(buf.getvalue())
        files.append(work / f"query_{i:02d}.jpg")
        files[-1].write_bytes(buf.getvalue())
    return work / "index", queries, files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `vitdense serve` process on 127.0.0.1."""

    def __init__(self, index: Path, device: str, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "vitdense", "serve", str(index), "--port", str(self.port),
                                      "--device", device, "--poll", "0", *options], env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {self.proc.stderr.read()}")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (user + system, all its threads)."""
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def stats(self) -> dict:
        import httpx

        return httpx.get(self.url + "/stats", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)


async def load(url: str, queries: list[bytes], clients: int, requests: int, seconds: float) -> dict:
    """C clients POST queries until ``requests`` were asked for or ``seconds`` passed; per-request latency."""
    import httpx

    issued = 0
    latencies: list[float] = []
    finished: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal issued
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1)) as c:
            while issued < requests and time.perf_counter() < deadline:
                body = queries[issued % len(queries)]
                issued += 1
                start = time.perf_counter()
                try:
                    res = await c.post("/search?k=10", content=body, headers={"content-type": "image/jpeg"})
                    if res.status_code != 200 or len(res.json()["results"]) != 10:
                        errors.append(f"{res.status_code} {res.text[:80]}")
                        continue
                except httpx.HTTPError as err:
                    errors.append(repr(err))
                    continue
                end = time.perf_counter()
                latencies.append(end - start)
                finished.append(end)

    start = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    done = np.sort(np.array(finished))
    steady = None
    if len(done) > clients:  # from the C-th answer (the end of the ramp-up) to the last one
        span = done[-1] - done[clients - 1]
        steady = round(float((len(done) - clients) / span), 2) if span > 0 else None
    return {"clients": clients, "issued": issued, "answered": len(latencies), "errors": len(errors),
            "lost": issued - len(latencies) - len(errors), "seconds": round(wall, 2),
            "qps": steady, "qps_overall": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "error_samples": errors[:3]}


def baseline(index: Path, files: list[Path], n: int, device: str) -> dict:
    times = []
    with tempfile.TemporaryDirectory() as out:
        for path in files[:n]:
            start = time.perf_counter()
            vitdense("search", str(path), "--index", str(index), "-k", "10", "--out", out, "--device", device)
            times.append(time.perf_counter() - start)
    t = np.array(times) * 1000
    return {"queries": n, "qps": round(n / (t.sum() / 1000), 3), "p50_ms": round(float(np.median(t)), 1),
            "p99_ms": round(float(np.percentile(t, 99)), 1)}


def soak(server: Server, queries: list[bytes], seconds: float) -> dict:
    async def run() -> tuple[dict, list[tuple[float, float]]]:
        samples: list[tuple[float, float]] = []
        task = asyncio.create_task(load(server.url, queries, 8, 10**9, seconds))
        start = time.perf_counter()
        while not task.done():
            samples.append((time.perf_counter() - start, server.rss_mb()))
            await asyncio.sleep(2)
        return await task, samples

    result, samples = asyncio.run(run())
    t, rss = np.array(samples).T
    keep = t >= min(10.0, t[-1] / 3)  # after warm-up (allocator pools, caches)
    slope = float(np.polyfit(t[keep], rss[keep], 1)[0] * 60) if keep.sum() > 2 else float("nan")
    return {**{k: result[k] for k in ("answered", "errors", "lost", "qps", "p50_ms", "p99_ms")},
            "seconds": seconds, "rss_after_warmup_mb": round(float(rss[keep][0]), 1),
            "rss_end_mb": round(float(rss[-1]), 1), "rss_peak_mb": round(float(rss.max()), 1),
            "slope_mb_per_min": round(slope, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vitdense_vits8")
    parser.add_argument("--load-size", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96, help="requests per client count (upper bound)")
    parser.add_argument("--seconds", type=float, default=30, help="time per client count (upper bound)")
    parser.add_argument("--baseline", type=int, default=4, help="queries for the `vitdense search` baseline")
    parser.add_argument("--soak-s", type=float, default=60, help="memory soak length (300: the 5-minute soak)")
    parser.add_argument("--soak-only", action="store_true", help="skip the load table and the baseline")
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args()

    report: dict = {"settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        index, queries, files = make_data(Path(tmp), args.model, args.load_size, args.device)
        report["index_images"] = len(PHOTOS) + 1
        settings = (("batching (5 ms window, up to 32)", ["--batch-window-ms", "5", "--max-batch", "32"]),
                    ("no batching (--max-batch 1)", ["--max-batch", "1"]))
        servers: dict[str, Server] = {}
        try:
            for label, options in settings if not args.soak_only else ():
                servers[label] = Server(index, args.device, *options)
                asyncio.run(load(servers[label].url, queries, 4, 16, 60))  # warm-up: weights paged in, pools
                report[label] = {"rows": []}
            for clients in args.clients if servers else ():
                for label, server in servers.items():  # turn by turn: both settings see the same load
                    before, cpu = server.stats(), server.cpu_s()
                    load_avg = os.getloadavg()[0]
                    row = asyncio.run(load(server.url, queries, clients, max(args.requests, 6 * clients),
                                           args.seconds))
                    after, cpu = server.stats(), server.cpu_s() - cpu
                    row["server_counted"] = (after["latency"]["search_upload"]["count"]
                                             - before["latency"]["search_upload"]["count"])
                    passes = after["batching"]["forward_passes"] - before["batching"]["forward_passes"]
                    row["forward_passes"] = passes
                    row["mean_batch"] = round(row["server_counted"] / passes, 2) if passes else None
                    row["load_average"] = round(load_avg, 2)
                    row["server_cpu_ms_per_query"] = (round(1000 * cpu / row["server_counted"], 1)
                                                      if row["server_counted"] else None)
                    report[label]["rows"].append(row)
                    print(f"{label:34s} {clients:3d} clients: {row['qps']} q/s steady ({row['qps_overall']} overall)  "
                          f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  answered {row['answered']}/{row['issued']}"
                          f"  errors {row['errors']}  lost {row['lost']}  server counted {row['server_counted']}  "
                          f"mean batch {row['mean_batch']}  server CPU {row['server_cpu_ms_per_query']} ms/query  "
                          f"load {load_avg:.1f}", flush=True)
            for label, server in servers.items():
                batching = server.stats()["batching"]
                report[label]["server_batching"] = batching
                print(f"{label}: forward passes {batching['forward_passes']}, mean batch {batching['mean_batch']}, "
                      f"largest {batching['largest_batch']}, forward {batching['forward_ms_per_query']} ms per query, "
                      f"server RSS {server.rss_mb():.0f} MB", flush=True)
        finally:
            for server in servers.values():
                server.stop()
        if not args.soak_only:
            report["baseline"] = baseline(index, files, args.baseline, args.device)
            print(f"`vitdense search` once per query: {report['baseline']['qps']} q/s, p50 "
                  f"{report['baseline']['p50_ms']} ms", flush=True)
        if args.soak_s > 0:
            server = Server(index, args.device, "--batch-window-ms", "5", "--max-batch", "32")
            try:
                asyncio.run(load(server.url, queries, 4, 16, 60))
                report["soak"] = soak(server, queries, args.soak_s)
            finally:
                server.stop()
            s = report["soak"]
            print(f"soak {args.soak_s:.0f} s, 8 clients: {s['answered']} answered, {s['errors']} errors, {s['lost']} "
                  f"lost; RSS {s['rss_after_warmup_mb']} → {s['rss_end_mb']} MB (peak {s['rss_peak_mb']}), slope "
                  f"{s['slope_mb_per_min']} MB/min", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
