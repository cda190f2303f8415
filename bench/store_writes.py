"""Benchmark: what store writes cost the extracting process, writer thread against writer processes.

`caer extract` hands finished clips to `_ClipWriter`: on the CPU one writer thread of the extracting process runs
zarr's Python, on a GPU a few spawned writer processes do. Here the same clips (the shape extraction makes) go
(a) to the writer thread and (b) to 1, 2, 4 writer processes (--processes), side by side in one run:

  - writes alone: clips/s when nothing else runs; CPU time per clip of the extracting process (the part that holds
    its GIL) and of the writer processes.
  - main loop: the main thread stands in for extraction's loop. It runs a fixed amount of pure-Python work per clip
    (--python-ms, calibrated at the start) and hands each group of --per-put clips to the writer, as extraction
    does after each encoder batch; its clips/s, and how much slower it runs than the same loop without writes
    (measured just before and after, as this machine's speed drifts).
  - beside a busy thread: clips/s of the writes while the main thread runs pure Python without pause (another thread
    hands the clips over): the writer thread then waits for the GIL at every step of zarr's machinery.

With 2 or more cores the main thread runs on the first core and everything else (writer thread, the pool's threads
and processes, the handing-over thread) on the others, as on a machine with cores to spare: what is left is the GIL,
not a shared core. The writes-alone runs use every core.

Not a test: run it by hand, e.g.

    .venv/bin/python bench/store_writes.py                      # 200 clips of [2, 1, 16, 512]; 1, 2, 4 processes
    .venv/bin/python bench/store_writes.py --clips 2000 --processes 2 4 8 --python-ms 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from machine import machine  # bench/machine.py (scripts run from bench/ are on sys.path)

from caer.cache import CacheWriter, fingerprint
from caer.pipeline.extract import ExtractSummary, _ClipWriter


def make_clips(n: int, args, first: int = 0) -> list[tuple]:
    """What extraction hands ``_ClipWriter.put``: (clip, item, float16 features [frames * 2, views, D])."""
    out = []
    for i in range(first, first + n):
        clip = SimpleNamespace(video_id=f"clip{i:06d}", label=i % 7, video=None)
        item = {"frame_names": [f"{j:05d}.jpg" for j in range(args.frames)], "no_face": 0}
        out.append((clip, item, torch.randn(args.frames * 2, args.views, args.dim).to(torch.float16)))
    return out


def drain(out: _ClipWriter) -> None:
    """Wait for every write handed over so far (``close`` without shutting the pool down)."""
    out._hand_over(wait=True)
    while out.pending:
        out._collect()


def python_units(n: int) -> None:
    for _ in range(n):
        sum(i * i for i in range(200))


def on_main_core(args, main: bool) -> None:
    """Move this thread to the main thread's core, or back to the others'."""
    if args.cores:
        os.sched_setaffinity(0, args.cores[0] if main else args.cores[1])  # this thread only


def main_loop(args, out: _ClipWriter | None, clips: list) -> float:
    """Extraction's stand-in: ``args.units`` of pure Python per clip, each group of clips handed to ``out`` (or
    dropped, without ``out``); its clips/s."""
    on_main_core(args, True)
    start = time.perf_counter()
    for i in range(0, len(clips), args.per_put):
        group = clips[i:i + args.per_put]
        python_units(args.units * len(group))
        if out is not None:
            out.put(group)
    if out is not None:
        drain(out)
    rate = len(clips) / (time.perf_counter() - start)
    on_main_core(args, False)
    return rate


def beside_busy_thread(args, out: _ClipWriter, clips: list) -> float:
    """Clips/s written while the main thread runs pure Python without pause (for at most --busy-seconds)."""
    done, written = threading.Event(), [0]

    def feed() -> None:
        try:
            for i in range(0, len(clips), args.per_put):
                out.put(clips[i:i + args.per_put])
                written[0] += len(clips[i:i + args.per_put])
                if time.perf_counter() - start > args.busy_seconds:
                    break
            drain(out)
        finally:
            done.set()

    start = time.perf_counter()
    feeder = threading.Thread(target=feed)
    feeder.start()
    on_main_core(args, True)
    while not done.is_set():
        python_units(10)
    on_main_core(args, False)
    feeder.join()
    return written[0] / (time.perf_counter() - start)


def cpu_seconds(pids) -> float:
    """User + system CPU time of these processes (all their threads) so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def open_writer(path: Path, args, processes: int, every_core: bool) -> tuple[CacheWriter, _ClipWriter]:
    """A fresh store and its ``_ClipWriter``, warmed up: the writers have started and written a few clips."""
    if args.cores:  # the writer's threads and processes inherit it
        os.sched_setaffinity(0, args.cores[0] | args.cores[1] if every_core else args.cores[1])
    fp = fingerprint({"model": "bench"}, margin=20, crop_body=False, views=args.views, frame_stride=1)
    writer = CacheWriter(path, fp)
    warm = make_clips(max(8, 4 * processes), args, first=10**6)
    out = _ClipWriter(writer, args.views, {c.video_id: "boxes" for c, _, _ in warm}, ExtractSummary(), processes)
    for i in range(0, len(warm), 2):
        out.put(warm[i:i + 2])
    drain(out)
    return writer, out


def one_writer(tmp: Path, args, processes: int, clips: list) -> dict:
    """The three measurements for one writer, each into a fresh store."""
    digests = {c.video_id: "boxes" for c, _, _ in clips}
    result = {}
    for name in ("alone", "main_loop", "busy"):
        writer, out = open_writer(tmp / f"{name}.zarr", args, processes, every_core=name == "alone")
        out.digests.update(digests)
        pids = list(getattr(out.pool, "_processes", {}))
        if name == "alone":
            child_cpu, cpu, start = cpu_seconds(pids), time.process_time(), time.perf_counter()
            for i in range(0, len(clips), args.per_put):
                out.put(clips[i:i + args.per_put])
            drain(out)
            seconds, cpu, child_cpu = time.perf_counter() - start, time.process_time() - cpu, cpu_seconds(pids) - child_cpu
            result |= {"clips_per_s": len(clips) / seconds, "parent_cpu_ms_per_clip": 1000 * cpu / len(clips),
                       "writer_processes_cpu_ms_per_clip": 1000 * child_cpu / len(clips)}
        elif name == "main_loop":
            before = main_loop(args, None, clips)
            rate = main_loop(args, out, clips)
            without = (before + main_loop(args, None, clips)) / 2
            result |= {"main_loop_clips_per_s": rate, "main_loop_without_writes": without,
                       "main_loop_slowdown": 1 - rate / without}
        else:
            result["beside_busy_thread_clips_per_s"] = beside_busy_thread(args, out, clips)
        out.close()
        writer.close()
        shutil.rmtree(tmp / f"{name}.zarr")
    return result


def print_table(args, runs: dict) -> None:
    print(f"\n| writer | writes alone: clips/s | extracting process CPU ms/clip | writer processes CPU ms/clip | main "
          f"loop ({args.python_ms} ms of Python a clip): clips/s | main loop slowed by | beside a busy thread: clips/s |"
          "\n|---|---:|---:|---:|---:|---:|---:|")
    for name, rs in runs.items():
        def med(key: str, rs=rs) -> float:
            return statistics.median(r[key] for r in rs)
        print(f"| {name} | {med('clips_per_s'):,.0f} | {med('parent_cpu_ms_per_clip'):.2f} | "
              f"{med('writer_processes_cpu_ms_per_clip'):.2f} | {med('main_loop_clips_per_s'):,.0f} | "
              f"{100 * med('main_loop_slowdown'):.0f}% | {med('beside_busy_thread_clips_per_s'):,.1f} |")
    without = statistics.median(r["main_loop_without_writes"] for rs in runs.values() for r in rs)
    print(f"\nthe main loop without writes: {without:,.0f} clips/s (median)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clips", type=int, default=200, help="clips written per measurement")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--per-put", type=int, default=8, help="clips per put(): a 256-image batch finishes ~8 of 32 images")
    p.add_argument("--python-ms", type=float, default=10.0,
                   help="the main loop's pure Python a clip, in ms on this machine: above the writers' cost a clip, so that "
                        "the writes can keep up and what is left is their GIL time")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4], help="writer-process counts to time")
    p.add_argument("--repeat", type=int, default=3, help="runs per writer, interleaved (medians are printed)")
    p.add_argument("--busy-seconds", type=float, default=10.0, help="at most this long beside the busy thread")
    p.add_argument("--no-pin", action="store_true", help="leave every thread and process free to run on any core")
    p.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("machine:", json.dumps(machine()))
    cores = sorted(os.sched_getaffinity(0))
    args.cores = None if args.no_pin or len(cores) < 2 else ({cores[0]}, set(cores[1:]))
    if args.cores:
        print(f"the main thread runs on core {cores[0]}; writer thread, writer processes and helpers on {cores[1:]}")
    on_main_core(args, True)
    start = time.perf_counter()
    python_units(20000)
    args.units = max(1, round(20000 / (time.perf_counter() - start) * args.python_ms / 1000))
    print(f"{args.clips} clips of [2, {args.views}, {args.frames}, {args.dim}] float16 a measurement, {args.per_put} "
          f"a put(); main loop: {args.units} units of Python a clip; {args.repeat} run(s) a writer; medians", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="caer-bench-writes-"))
    try:
        clips = make_clips(args.clips, args)
        names = {n: "writer thread" if n == 0 else f"{n} writer process{'es' * (n > 1)}" for n in [0, *args.processes]}
        runs = {name: [] for name in names.values()}
        for r in range(args.repeat):
            for processes, name in names.items():  # interleaved, so that the machine's drift hits every writer alike
                runs[name].append(one_writer(tmp, args, processes, clips))
            print(f"  run {r + 1} of {args.repeat} done", flush=True)
        print_table(args, runs)
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(), "args": {**vars(args), "json": str(args.json),
                                                                            "cores": str(args.cores)},
                                             "runs": runs}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
