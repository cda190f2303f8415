"""Phase one: run the frozen image encoder once over every frame and store the features."""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..cache import CacheWriter, clip_key, fingerprint
from . import distributed
from .data import BadClip, Clip, DataError, ViewMaker, load_body_boxes, load_face_boxes, read_annotations
from .encoder import ClipModel, Preprocess, autocast


MAX_PENDING_WRITES = 64


def default_workers() -> int:
    """Decoding processes: all cores but one for the main process, at most 16."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))


@dataclass
class ExtractSettings:
    annotations: list[Path]
    out: Path
    face_boxes: Path
    root: Path | None = None
    body_boxes: Path | None = None
    crop_body: bool = False
    margin: float = 20.0
    views: int = 1
    frame_stride: int = 1
    num_classes: int = 5
    format: str = "auto"
    batch_size: int = 256
    workers: int = field(default_factory=default_workers)
    use_amp: bool = True
    skip_bad: bool = False
    overwrite: bool = False


@dataclass
class ExtractSummary:
    clips_total: int = 0
    clips_extracted: int = 0
    clips_already_done: int = 0
    frames: int = 0
    frames_without_face: int = 0
    seconds: float = 0.0
    store_bytes: int = 0
    clips_per_rank: list[int] = field(default_factory=list)  # clips each torchrun process extracted
    skipped: list[str] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "skipped"} | {"frames_per_second": self.frames_per_second}

    def table(self) -> Table:
        t = Table(title="caer extract", show_header=False)
        t.add_row("clips extracted", str(self.clips_extracted))
        t.add_row("clips already done", str(self.clips_already_done))
        t.add_row("clips skipped (bad input)", str(len(self.skipped)))
        t.add_row("frames", str(self.frames))
        t.add_row("frames without a face box", str(self.frames_without_face))
        t.add_row("seconds", f"{self.seconds:.1f}")
        t.add_row("frames/s", f"{self.frames_per_second:.1f}")
        t.add_row("store size", f"{self.store_bytes / 2**20:.1f} MiB")
        if len(self.clips_per_rank) > 1:
            t.add_row("clips per torchrun process", ", ".join(map(str, self.clips_per_rank)))
        return t


class ClipFrames(torch.utils.data.Dataset):
    """One item per clip: uint8 pixels [frames, 2 (face, context), 3, S, S], decoded in workers.

    Bad input does not raise across the process boundary: the item carries the error instead.
    """

    def __init__(self, clips: list[Clip], view_maker: ViewMaker, preprocess: Preprocess, frame_stride: int):
        self.clips, self.view_maker, self.preprocess, self.stride = clips, view_maker, preprocess, frame_stride

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        clip = self.clips[i]
        frames = clip.frames[:: self.stride]
        try:
            pixels, no_face = [], 0
            for frame in frames:
                face, context, has_box = self.view_maker.views(clip, frame)
                no_face += not has_box
                pixels.append(torch.stack([self.preprocess.to_uint8(face), self.preprocess.to_uint8(context)]))
        except DataError as err:
            return {"index": i, "error": str(err)}
        return {"index": i, "pixels": torch.stack(pixels), "frame_names": [f.name for f in frames], "no_face": no_face}


def encode_pixels(clip: ClipModel, pixels: torch.Tensor, views: int, use_amp: bool) -> torch.Tensor:
    """uint8 images [N, 3, S, S] -> float16 features [N, views, D] on the CPU; view 1 is the mirror image."""
    device = clip.device
    x = clip.preprocess.normalize(pixels.to(device, non_blocking=True))
    with torch.no_grad(), autocast(device, use_amp):
        feats = [clip.model.encode_image(x)]
        if views == 2:
            feats.append(clip.model.encode_image(x.flip(-1)))
    return torch.stack(feats, dim=1).to(torch.float16).cpu()


class _BatchPacker:
    """Packs the images of consecutive clips into full encoder batches and hands back finished clips."""

    def __init__(self, batch_size: int, encode):
        self.batch_size, self.encode = batch_size, encode
        self.buffer: list[torch.Tensor] = []
        self.buffered = 0
        self.pending: deque = deque()  # [item, images still missing, feature chunks]

    def add(self, item: dict) -> list[tuple[dict, torch.Tensor]]:
        images = item["pixels"].flatten(0, 1)  # frame-major: face, context, face, context, ...
        self.pending.append([item, len(images), []])
        self.buffer.append(images)
        self.buffered += len(images)
        done = []
        while self.buffered >= self.batch_size:
            done += self._run(self.batch_size)
        return done

    def flush(self) -> list[tuple[dict, torch.Tensor]]:
        return self._run(self.buffered) if self.buffered else []

    def _run(self, n: int) -> list[tuple[dict, torch.Tensor]]:
        flat = torch.cat(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        batch, rest = flat[:n], flat[n:]
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)
        feats = self.encode(batch)
        done = []
        while len(feats):
            entry = self.pending[0]
            take = min(entry[1], len(feats))
            entry[2].append(feats[:take])
            entry[1] -= take
            feats = feats[take:]
            if entry[1] == 0:
                self.pending.popleft()
                done.append((entry[0], torch.cat(entry[2])))
        return done


def collect_clips(settings: ExtractSettings, root: Path) -> tuple[list[Clip], dict[str, list[str]], list[BadClip]]:
    """Parse every annotation file; clips listed in several splits are extracted once."""
    clips: dict[str, Clip] = {}
    splits: dict[str, list[str]] = {}
    bad: list[BadClip] = []
    for path in settings.annotations:
        found, skipped = read_annotations(path, root, settings.num_classes, settings.skip_bad)
        bad += skipped
        splits[Path(path).stem] = [c.video_id for c in found]
        for c in found:
            clips.setdefault(c.video_id, c)
    return list(clips.values()), splits, bad


def extract(settings: ExtractSettings, clip_model: ClipModel, console: Console | None = None) -> ExtractSummary:
    """Extract features of every clip in ``settings.annotations`` into ``settings.out`` (resumable)."""
    console = console or Console()
    if settings.views not in (1, 2):
        raise ValueError(f"--views must be 1 or 2, got {settings.views}")
    if settings.frame_stride < 1:
        raise ValueError(f"--frame-stride must be at least 1, got {settings.frame_stride}")
    root = settings.root or Path(settings.annotations[0]).parent
    clips, splits, bad = collect_clips(settings, root)
    view_maker = ViewMaker(
        face_boxes=load_face_boxes(settings.face_boxes, root),
        body_boxes=load_body_boxes(settings.body_boxes, root) if settings.body_boxes else {},
        margin=settings.margin,
        crop_body=settings.crop_body,
    )
    if settings.crop_body and not settings.body_boxes:
        raise ValueError("--crop-body needs --body-boxes")
    fp = fingerprint(clip_model.identity(), margin=settings.margin, crop_body=settings.crop_body, views=settings.views,
                     frame_stride=settings.frame_stride)
    rank, world = distributed.init()
    if rank == 0:  # rank 0 checks (or replaces) the store before the others open it
        writer = CacheWriter(settings.out, fp, settings.format, settings.overwrite)
    distributed.barrier()
    if rank != 0:
        writer = CacheWriter(settings.out, fp, settings.format, overwrite=False)
    digests = {c.video_id: view_maker.boxes_digest(c) for c in clips}
    # a finished clip is redone only if its boxes changed since it was extracted
    todo = [c for c in clips if writer.done.get(clip_key(c.video_id), {}).get("boxes_sha256") != digests[c.video_id]]
    summary = ExtractSummary(clips_total=len(clips), clips_already_done=len(clips) - len(todo))
    todo = todo[rank::world]  # under torchrun every rank writes its own disjoint share of the clips
    unboxed = [c.video_id for c in clips if not view_maker.has_face_boxes(c)]
    if unboxed and rank == 0:
        console.print(
            f"[yellow]warning:[/] {len(unboxed)} of {len(clips)} clips have no entry in {settings.face_boxes} "
            f"(first: {unboxed[0]!r}); their face view is the whole frame. Check that the file's keys match "
            f"the clip dirs (root-relative or joined to --root {root}).", highlight=False, soft_wrap=True,
        )

    loader = torch.utils.data.DataLoader(
        ClipFrames(todo, view_maker, clip_model.preprocess, settings.frame_stride),
        batch_size=None, shuffle=False, num_workers=settings.workers,
        pin_memory=clip_model.device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if settings.workers else None,
    )
    packer = _BatchPacker(settings.batch_size, lambda x: encode_pixels(clip_model, x, settings.views, settings.use_amp))
    start = time.perf_counter()
    writes: list[Future] = []

    def store(done: list[tuple[dict, torch.Tensor]]) -> None:
        for item, feats in done:
            clip = todo[item["index"]]
            n = len(item["frame_names"])
            # features arrive [frames * 2, views, D] in frame-major order -> [2, views, frames, D]
            array = feats.view(n, 2, settings.views, -1).permute(1, 2, 0, 3).numpy()
            attrs = {"label": clip.label, "frame_names": item["frame_names"], "frames_without_face": item["no_face"],
                     "boxes_sha256": digests[clip.video_id]}
            if len(writes) >= MAX_PENDING_WRITES:  # keep the queue of features waiting to be written bounded
                writes.pop(0).result()
            writes.append(pool.submit(writer.write, clip.video_id, array, attrs))
            summary.frames += n
            summary.frames_without_face += item["no_face"]
            summary.clips_extracted += 1

    columns = [
        TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("clips"),
        TextColumn("{task.fields[fps]:>7.1f} frames/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    ]
    with ThreadPoolExecutor(max_workers=1) as pool, Progress(*columns, console=console, disable=rank != 0) as progress:
        task = progress.add_task("extract", total=len(todo), fps=0.0)
        for item in loader:
            if "error" in item:
                if not settings.skip_bad:
                    raise DataError(item["error"] + "\n(clips finished so far are kept; fix the input and re-run, or use --skip-bad)")
                bad.append(BadClip(todo[item["index"]].source, todo[item["index"]].video_id, item["error"]))
                progress.advance(task)
                continue
            before = summary.clips_extracted
            store(packer.add(item))
            progress.update(task, advance=1, fps=summary.frames / max(time.perf_counter() - start, 1e-9))
            if summary.clips_extracted != before:
                writes = [f for f in writes if not _raise_if_failed(f)]
        store(packer.flush())
    for f in writes:
        f.result()
    shares = distributed.gather((summary.clips_extracted, summary.frames, summary.frames_without_face, [str(b) for b in bad]))
    summary.seconds = time.perf_counter() - start
    summary.clips_extracted, summary.frames, summary.frames_without_face = (sum(s[i] for s in shares) for i in range(3))
    summary.clips_per_rank = [s[0] for s in shares]
    summary.skipped = sorted({line for s in shares for line in s[3]})
    if rank == 0:
        writer.finish(splits, summary.skipped, summary.as_dict())
        summary.store_bytes = writer.size_bytes()
    distributed.barrier()
    return summary


def _raise_if_failed(future: Future) -> bool:
    """True when the write finished (re-raising its error if it failed)."""
    if future.done():
        future.result()
        return True
    return False
