"""Phase one: run the frozen image encoder once over every frame and store the features."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import BrokenExecutor, Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .. import runtime
from ..cache import CacheError, CacheWriter, fingerprint, store_key, stored_fingerprint
from ..cache.store import write_clips
from ..config import Decode, ExtractConfig
from ..data.ahead import prepared_ahead
from ..data.datasets import ClipFrames
from ..data.raer import BadClip, Clip, DataError, ViewMaker, check_disjoint, read_annotations
from ..data.tensor_views import TensorViews, auto_decode_device
from ..files import check_outputs
from ..model.checkpoint import backbone_from_checkpoint
from ..model.encoder import CLIPBackbone, load_backbone

MAX_PENDING_WRITES = 64
# Processes that write the store, per extracting process (per torchrun rank), by the encoder's device type; absent: one
# writer thread. One process writes 120 to 220 clips/s (bench/store_writes.py, 2 cores), and a GPU at its goal of 18,000
# images/s finishes about 570 clips of 16 frames a second: 4 processes, with some room to spare.
WRITER_PROCESSES = {"cuda": 4}
CLIPS_PER_WRITE_TASK = 8  # about what one 256-image batch of 16-frame clips finishes
# Frames of consecutive clips decoded in one call on a GPU (--decode tensor): nvJPEG pays a fixed cost per call (stream
# synchronisations, the batch set-up), and torchvision serialises calls, so a few clips a call amortise it.
FRAMES_PER_DECODE = 128


@dataclass
class ExtractSummary:
    """What `caer extract` did: clips and frames extracted, kept from an earlier run or skipped, and the time."""

    clips_total: int = 0
    clips_extracted: int = 0
    clips_already_done: int = 0
    frames: int = 0
    frames_without_face: int = 0
    clips_with_other_frame_count: int = 0  # the annotation's num_frames disagrees with the frames on disk
    clips_repaired: int = 0  # finished clips whose data was damaged, extracted again
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
        if self.clips_repaired:
            t.add_row("damaged clips repaired", str(self.clips_repaired))
        t.add_row("clips skipped (bad input)", str(len(self.skipped)))
        t.add_row("frames", str(self.frames))
        t.add_row("frames without a face box", str(self.frames_without_face))
        t.add_row("clips whose num_frames disagrees", str(self.clips_with_other_frame_count))
        t.add_row("seconds", f"{self.seconds:.1f}")
        t.add_row("frames/s", f"{self.frames_per_second:.1f}")
        t.add_row("store size", f"{self.store_bytes / 2**20:.1f} MiB")
        if len(self.clips_per_rank) > 1:
            t.add_row("clips per torchrun process", ", ".join(map(str, self.clips_per_rank)))
        return t


def encode_pixels(backbone: CLIPBackbone, pixels: torch.Tensor, views: int, use_amp: bool) -> torch.Tensor:
    """uint8 images [N, 3, S, S] -> float16 features [N, views, D] on the encoder's device; view 1 is the mirror image.
    Nothing here waits for the GPU: ``_ClipWriter`` copies finished clips back in the background.

    On CUDA the frozen encoder runs under float16 autocast even where training uses bf16: the features are stored
    as float16, and bf16's 8-bit mantissa would round them about eight times coarser than the store does."""
    device = backbone.device
    x = backbone.preprocess.normalize(pixels.to(device, non_blocking=True))
    with torch.no_grad(), runtime.autocast(device, use_amp, dtype=torch.float16):
        feats = [backbone.model.encode_image(x)]
        if views == 2:
            feats.append(backbone.model.encode_image(x.flip(-1)))
    return torch.stack(feats, dim=1).to(torch.float16)


def to_host(feats: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A CPU copy of ``feats`` and, on CUDA, the event to wait on before reading it: the copy runs in the background
    (into pinned memory), so the loop goes on feeding the encoder while the features travel back."""
    if feats.device.type != "cuda":
        return feats, None
    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
    host.copy_(feats, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(feats.device))
    return host, ready


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of ``parts``, into pinned memory when they are pinned (the data loader's): a pageable batch
    would be copied to the GPU synchronously."""
    if not parts[0].is_pinned():
        return torch.cat(parts)
    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
    return torch.cat(parts, out=out)


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
        flat = _joined(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
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


def collect_clips(cfg: ExtractConfig, root: Path) -> tuple[list[Clip], dict[str, list[str]], list[BadClip]]:
    """Parse every annotation file (each is a split; ``check_listed_once`` has refused a clip listed in two)."""
    per_file: list[list[Clip]] = []
    splits: dict[str, list[str]] = {}
    bad: list[BadClip] = []
    for path in cfg.annotations:
        found, skipped = read_annotations(path, root, cfg.num_classes, cfg.skip_bad, fps=cfg.crop.fps)
        bad += skipped
        splits[Path(path).stem] = [c.video_id for c in found]
        per_file.append(found)
    return [c for found in per_file for c in found], splits, bad


def check_listed_once(cfg: ExtractConfig) -> None:
    """A clip listed in two annotation files is refused before the encoder loads (with real weights, a download or
    a minute); bad lines are left to ``collect_clips``, which knows --skip-bad."""
    root = cfg.dataset_root()
    check_disjoint([read_annotations(path, root, cfg.num_classes, skip_bad=True, need_frames=False)[0]
                    for path in cfg.annotations])


def load_encoder(cfg: ExtractConfig) -> CLIPBackbone:
    """The frozen image encoder: ``--model``/``--pretrained``, or a checkpoint's (``--from-checkpoint``)."""
    device = runtime.local_device(runtime.resolve_device(cfg.runtime.device))
    if cfg.from_checkpoint:
        changed = {f.name: getattr(cfg.encoder, f.name) for f in dataclasses.fields(cfg.encoder)
                   if getattr(cfg.encoder, f.name) != f.default}
        given = [f"--{name} {value}" for name, value in changed.items() if name != "pretrained"]
        if given:
            raise ValueError(f"--from-checkpoint takes the image encoder and its preprocessing from the checkpoint: "
                             f"{', '.join(given)} would be ignored; drop {'them' if len(given) > 1 else 'it'}")
        return backbone_from_checkpoint(cfg.from_checkpoint, device, changed.get("pretrained"))
    return load_backbone(cfg.encoder.model, cfg.encoder.pretrained, device, cfg.encoder.preprocess)


def check_out(cfg: ExtractConfig) -> None:
    """Refuse an --out that is one of the run's input files, before any lock or store is made. An existing store at
    --out is resumed, not refused: a folder (a Zarr store) cannot be an input file, and existing is no fault here."""
    out = Path(cfg.out)
    if out.is_dir():
        return
    inputs = [("the annotation file", Path(a)) for a in cfg.annotations]
    given = (("the face boxes", cfg.crop.face_boxes), ("the body boxes", cfg.crop.body_boxes),
             ("the CLIP weights", cfg.encoder.pretrained), ("the checkpoint", cfg.from_checkpoint))
    inputs += [(what, Path(path)) for what, path in given if path and Path(path).is_file()]  # else a tag, a folder
    check_outputs([("--out", out)], inputs, overwrite=True)


def open_writer(cfg: ExtractConfig, backbone: CLIPBackbone, root: Path, rank: int) -> CacheWriter:
    """The store to write into; rank 0 checks (or replaces) it before the other ranks open it."""
    fp = fingerprint(backbone.identity(), margin=cfg.crop.margin, crop_body=cfg.crop.crop_body, views=cfg.views,
                     frame_stride=cfg.crop.frame_stride, decode=cfg.crop.decode, fps=cfg.crop.fps)
    inputs = {"root": root, "face_boxes": cfg.crop.face_boxes, "body_boxes": cfg.crop.body_boxes}
    inputs = {k: str(Path(v).resolve()) if v else None for k, v in inputs.items()}
    writer = CacheWriter(cfg.out, fp, cfg.format, cfg.overwrite, inputs) if rank == 0 else None
    runtime.barrier()
    return writer or CacheWriter(cfg.out, fp, cfg.format, overwrite=False, inputs=inputs, lock=False)


class _ClipWriter:
    """Hands finished clips to the store's writers (``CacheWriter.writers``), at most MAX_PENDING_WRITES at a time.

    With ``processes`` (on a GPU), zarr's Python runs in writer processes, where it does not hold this process's GIL
    against the main loop and the decode-ahead thread; else one thread of this process writes."""

    def __init__(self, writer: CacheWriter, views: int, digests: dict[str, str], summary: ExtractSummary,
                 processes: int = 0):
        self.writer, self.views, self.digests, self.summary = writer, views, digests, summary
        self.pool = writer.writers(processes)
        self.copies: deque = deque()  # (video id, features on their way to the host, CUDA event or None, frames, attrs)
        self.pending: deque[tuple[Future, int]] = deque()  # (write task, its clips), in order
        self.failed = False  # a clip's features were not finite

    @property
    def in_flight(self) -> int:
        """Clips handed to ``put`` and not yet written: on their way to the host, or in a pending write task."""
        return len(self.copies) + sum(clips for _, clips in self.pending)

    def put(self, done: list[tuple[Clip, dict, torch.Tensor]]) -> None:
        for clip, item, feats in done:
            n = len(item["frame_names"])
            attrs = {"label": clip.label, "frame_names": item["frame_names"], "frames_without_face": item["no_face"],
                     "boxes_sha256": self.digests[clip.video_id], "origin": "video" if clip.video else "frames"}
            while self.in_flight >= MAX_PENDING_WRITES:
                self._hand_over(wait=True)
                self._collect()
            self.copies.append((clip.video_id, *to_host(feats), n, attrs))
            self.summary.frames += n
            self.summary.frames_without_face += item["no_face"]
            self.summary.clips_extracted += 1
        self._hand_over()
        while self.pending and self.pending[0][0].done():  # surface a failed write early
            self._collect()

    def _hand_over(self, wait: bool = False) -> None:
        """Submit the clips whose features have reached the host, in order; with ``wait``, wait for all of them.
        The main loop polls the copies' events here rather than blocking on them: it has batches to launch."""
        ready = []
        while self.copies and (wait or self.copies[0][2] is None or self.copies[0][2].query()):
            video_id, host, event, n, attrs = self.copies.popleft()
            if event is not None:
                event.synchronize()
            # features arrive [frames * 2, views, D] in frame-major order -> [2, views, frames, D]; numpy, not torch:
            # a torch call lets go of the GIL, and taking it back can wait for the other threads (ms each)
            feats = host.numpy().reshape(n, 2, self.views, -1).transpose(1, 2, 0, 3)
            if not np.isfinite(feats).all():
                if self.failed:  # the first such clip's error is on its way: drop this one quietly
                    continue
                self.failed = True
                self._submit(ready)  # the clips before it are good: keep them
                raise FloatingPointError(
                    f"{video_id}: the encoder gave non-finite features ({np.isnan(feats).sum()} NaN, "
                    f"{np.isinf(feats).sum()} infinite values of {feats.size}); nothing of this clip was written. "
                    "On a GPU, an activation can overflow float16 under mixed precision: re-run with --no-amp")
            ready.append((video_id, feats, attrs))
        self._submit(ready)

    def _submit(self, ready: list[tuple[str, np.ndarray, dict]]) -> None:
        # several clips a task: each task costs this process's GIL a few thread hand-offs, whatever its size
        for i in range(0, len(ready), CLIPS_PER_WRITE_TASK):
            clips = ready[i:i + CLIPS_PER_WRITE_TASK]
            try:
                self.pending.append((self.pool.submit(write_clips, clips), len(clips)))
            except BrokenExecutor as err:
                raise self._broken(err) from err

    def _collect(self) -> None:
        """Wait for the oldest write task (re-raising its failure) and count its clips as done."""
        task, _ = self.pending.popleft()
        try:
            written = task.result()
        except BrokenExecutor as err:
            raise self._broken(err) from err
        self.writer.done.update(written)

    def _broken(self, err: BrokenExecutor) -> CacheError:
        return CacheError(f"{self.writer.zarr_path}: a writer of the store ended unexpectedly ({err}); the clips it had "
                          "not finished are not done: run the same command again to write them")

    def close(self) -> None:
        """Wait for every write, re-raising the first failure (the writes not started by then are dropped: their
        clips are not done)."""
        try:
            try:
                self._hand_over(wait=True)
            finally:  # the good clips handed over before a clip with non-finite features are written too
                while self.pending:
                    self._collect()
        finally:
            self.pool.shutdown(cancel_futures=True)


def _progress(console: Console, rank: int) -> Progress:
    columns = [
        TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("clips"),
        TextColumn("{task.fields[fps]:>7.1f} frames/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    ]
    return Progress(*columns, console=console, disable=rank != 0)


def extraction_dataset(cfg: ExtractConfig, backbone: CLIPBackbone, todo: list[Clip], view_maker: ViewMaker) -> ClipFrames:
    """Extraction's dataset. With ``--decode tensor`` on a GPU its workers only read bytes and look up boxes: a thread
    of the main process decodes and cuts each clip on the GPU (``data.ahead.prepared_ahead``); on the CPU the workers do it all."""
    if cfg.crop.decode != Decode.tensor:
        return ClipFrames(todo, view_maker, backbone.preprocess, cfg.crop.frame_stride)
    views = TensorViews(view_maker, backbone.preprocess)
    return ClipFrames(todo, view_maker, backbone.preprocess, cfg.crop.frame_stride, views,
                      defer=backbone.device.type == "cuda")


def decode_on_device(dataset: ClipFrames, items: list[dict], device: torch.device) -> list[dict]:
    """Items that carry bytes and boxes with their pixels decoded and cut on ``device`` instead: all their frames in
    one decode call (``TensorViews.pixels_of``); when a frame is bad, each item on its own, so that only the items
    with a bad frame carry an error and the others are kept."""
    deferred = [item for item in items if "inputs" in item]
    try:
        pixels = iter(dataset.tensor_views.pixels_of([item["inputs"] for item in deferred], device))
    except DataError as err:
        if len(items) == 1:
            return [{"index": items[0]["index"], "error": str(err)}]
        return [out for item in items for out in decode_on_device(dataset, [item], device)]
    return [{k: v for k, v in item.items() if k != "inputs"} | {"pixels": next(pixels)} if "inputs" in item else item
            for item in items]


def in_groups(items: Iterable[dict], frames: int) -> Iterator[list[dict]]:
    """Consecutive items in lists of at least ``frames`` frames (the last one may hold fewer)."""
    group, count = [], 0
    for item in items:
        group.append(item)
        count += len(item.get("frame_names", ()))
        if count >= frames:
            yield group
            group, count = [], 0
    if group:
        yield group


def encode_clips(cfg: ExtractConfig, backbone: CLIPBackbone, todo: list[Clip], view_maker: ViewMaker,
                 out: _ClipWriter, bad: list[BadClip], console: Console, rank: int) -> None:
    """Decode and crop in worker processes (or on the GPU), encode in full batches, hand finished clips to ``out``."""
    workers = cfg.runtime.num_workers()
    dataset = extraction_dataset(cfg, backbone, todo, view_maker)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=backbone.device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    packer = _BatchPacker(cfg.batch_size, lambda x: encode_pixels(backbone, x, cfg.views, cfg.runtime.use_amp))
    device = backbone.device
    groups = (prepared_ahead(in_groups(loader, FRAMES_PER_DECODE), lambda g: decode_on_device(dataset, g, device), device)
              if dataset.defer else ([item] for item in loader))
    start = time.perf_counter()

    def finished(done: list[tuple[dict, torch.Tensor]]) -> list:
        return [(todo[item["index"]], item, feats) for item, feats in done]

    with _progress(console, rank) as progress, contextlib.closing(groups):
        task = progress.add_task("extract", total=len(todo), fps=0.0)
        for item in (item for group in groups for item in group):
            if "error" in item:
                if not cfg.skip_bad:
                    out.put(finished(packer.flush()))  # every complete clip is written before stopping
                    raise DataError(item["error"] + "\n(clips finished so far are kept; fix the input and re-run, "
                                    "or use --skip-bad)")
                bad.append(BadClip(todo[item["index"]].source, todo[item["index"]].video_id, item["error"]))
            else:
                out.put(finished(packer.add(item)))
            progress.update(task, advance=1, fps=out.summary.frames / max(time.perf_counter() - start, 1e-9))
        out.put(finished(packer.flush()))


def _clips_to_do(writer: CacheWriter, clips: list[Clip], digests: dict[str, str], console: Console,
                 rank: int) -> tuple[list[Clip], int]:
    """Clips to (re-)extract: new ones, those whose boxes changed, and finished ones whose data is damaged;
    and how many of them were damaged."""
    done = {store_key(c.video_id) for c in clips
            if writer.done.get(store_key(c.video_id), {}).get("boxes_sha256") == digests[c.video_id]}
    damaged = writer.damaged(done) if rank == 0 else set()
    damaged = runtime.gather(damaged)[0]  # rank 0 reads the store once for everyone
    if damaged and rank == 0:
        console.print(f"[yellow]repairing:[/] {len(damaged)} finished clip(s) no longer match the checksum written "
                      f"with them (first: {sorted(damaged)[0]}); extracting them again", highlight=False, soft_wrap=True)
    return [c for c in clips if store_key(c.video_id) not in done - damaged], len(damaged)


def check_box_keys(clips: list[Clip], view_maker: ViewMaker, box_file: str, console: Console) -> None:
    """Refuse a face-box entry none of whose keys names a frame of its clip (its boxes would all go unused, and every
    face view silently be the whole frame); warn once about keys that name no frame (e.g. counted from 0)."""
    unknown = []
    for clip in clips:
        keys, stray = view_maker.unknown_box_keys(clip)
        if keys and len(stray) == keys:
            first = clip.frames[0].name if clip.frames else "-"
            raise DataError(f"{box_file}: none of the {keys} frame keys of {clip.video_id!r} names one of its frames "
                            f"(its keys: {stray[0]!r}...; its first frame: {first!r}); a video's frames are "
                            "numbered from 00001, a folder's go by file name")
        unknown += [(clip.video_id, key) for key in stray]
    if unknown:
        console.print(f"[yellow]warning:[/] {len(unknown)} frame keys in {box_file} name no frame of their clip "
                      f"(first: {unknown[0][1]!r} of {unknown[0][0]!r}); their boxes are not used. A video's frames "
                      "are numbered from 00001.", highlight=False, soft_wrap=True)


def _warn_about_inputs(cfg: ExtractConfig, clips: list[Clip], view_maker: ViewMaker, root: Path,
                       summary: ExtractSummary, console: Console) -> None:
    """One warning each for frame counts that disagree with the lists, for clips missing from the face-box file,
    and for clips whose entry there holds no box."""
    miscounted = [c for c in clips if c.listed_frames != c.frame_count]
    summary.clips_with_other_frame_count = len(miscounted)
    if miscounted:
        first = miscounted[0]
        console.print(
            f"[yellow]warning:[/] {len(miscounted)} of {len(clips)} clips list another num_frames than their folder "
            f"holds (first: {first.source} lists {first.listed_frames}, the {'video' if first.video else 'folder'} "
            f"has {first.frame_count}); caer uses the frames on disk.", highlight=False, soft_wrap=True,
        )
    unboxed = [c.video_id for c in clips if not view_maker.has_face_boxes(c)]
    if unboxed:
        console.print(
            f"[yellow]warning:[/] {len(unboxed)} of {len(clips)} clips have no entry in {cfg.crop.face_boxes} "
            f"(first: {unboxed[0]!r}); their face view is the whole frame. Check that the file's keys match "
            f"the clip dirs (root-relative or joined to --root {root}).", highlight=False, soft_wrap=True,
        )
    empty = [c.video_id for c in clips if view_maker.has_face_boxes(c) and not view_maker.unknown_box_keys(c)[0]]
    if empty:
        console.print(
            f"[yellow]warning:[/] {len(empty)} of {len(clips)} clips have an entry without any face box in "
            f"{cfg.crop.face_boxes} (first: {empty[0]!r}; caer boxes writes one where it found no face); their face "
            "view is the whole frame.", highlight=False, soft_wrap=True,
        )


def extract(cfg: ExtractConfig, backbone: CLIPBackbone | None = None, console: Console | None = None) -> ExtractSummary:
    """Extract features of every clip in ``cfg.annotations`` into ``cfg.out`` (resumable, and repairing damaged
    clips); ``backbone`` defaults to the encoder the config names."""
    console = console or Console()
    if not cfg.crop.face_boxes:
        raise ValueError("caer extract needs --face-boxes")
    check_out(cfg)
    check_listed_once(cfg)
    backbone = backbone or load_encoder(cfg)
    # unset crop options: those of the store being resumed, else the declared fallbacks
    stored = None if cfg.overwrite else stored_fingerprint(cfg.out, cfg.format)
    cfg = dataclasses.replace(cfg, crop=cfg.crop.resolved(stored, strict=False, device=auto_decode_device(backbone)))
    root = cfg.dataset_root()
    clips, splits, bad = collect_clips(cfg, root)
    view_maker = ViewMaker.from_config(cfg.crop, root)
    rank, world = runtime.init()
    check_box_keys(clips, view_maker, cfg.crop.face_boxes, console if rank == 0 else Console(quiet=True))
    writer = open_writer(cfg, backbone, root, rank)
    try:
        digests = {c.video_id: view_maker.boxes_digest(c) for c in clips}
        todo, repaired = _clips_to_do(writer, clips, digests, console, rank)
        summary = ExtractSummary(clips_total=len(clips), clips_already_done=len(clips) - len(todo),
                                 clips_repaired=repaired)
        if rank == 0:
            if note := runtime.amp_note(backbone.device, cfg.runtime.use_amp):
                console.print(note, highlight=False)
            _warn_about_inputs(cfg, clips, view_maker, root, summary, console)
            if writer.moved_from:
                console.print(f"[yellow]note:[/] {cfg.out} was cut from frames under {writer.moved_from}, which is "
                              f"gone; taking {root} as the same dataset moved", highlight=False, soft_wrap=True)
            writer.record_splits(splits)  # a run cut short still says which clips it was to write
        todo = todo[rank::world]  # under torchrun every rank writes its own disjoint share of the clips
        start = time.perf_counter()
        out = _ClipWriter(writer, cfg.views, digests, summary, WRITER_PROCESSES.get(backbone.device.type, 0))
        try:
            encode_clips(cfg, backbone, todo, view_maker, out, bad, console, rank)
        finally:
            out.close()
        _finish(writer, splits, bad, summary, time.perf_counter() - start, rank)
    finally:
        writer.close()
    return summary


def _finish(writer: CacheWriter, splits: dict, bad: list[BadClip], summary: ExtractSummary, seconds: float,
            rank: int) -> None:
    """Sum the ranks' shares into the summary; rank 0 records splits, skipped clips and the summary."""
    shares = runtime.gather((summary.clips_extracted, summary.frames, summary.frames_without_face, [str(b) for b in bad],
                             [b.video_id for b in bad]))
    summary.seconds = seconds
    summary.clips_extracted, summary.frames, summary.frames_without_face = (sum(s[i] for s in shares) for i in range(3))
    summary.clips_per_rank = [s[0] for s in shares]
    summary.skipped = sorted({line for s in shares for line in s[3]})
    if rank == 0:
        writer.finish(splits, summary.skipped, summary.as_dict(), sorted({v for s in shares for v in s[4]}))
        summary.store_bytes = writer.size_bytes()
    runtime.barrier()
