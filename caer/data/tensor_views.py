"""The tensor decode-and-crop path (``--decode tensor``): a frame's two views made with tensor operations.

It computes what the PIL path computes (``raer.ViewMaker.views``, then ``Preprocess.to_uint8``): the face box grown
and clipped by ``clip_box`` before anything is cut, the context letterboxed with black, then open_clip's resize of
the shorter side (Pillow's antialiased bicubic, with the same rounding of the size) and centre crop.

After decoding, every step is linear along each axis. A view is therefore ``rows @ pixels @ columns.T`` with two
small matrices that hold Pillow's resampling weights with the crop, the padding and the centre crop folded in, and a
batch of views of any sizes is two batched matrix products. As in Pillow, the horizontal pass is rounded to uint8
before the vertical one.

JPEG frames are decoded by ``torchvision.io.decode_jpeg``: batched through nvJPEG on a CUDA device, with
libjpeg-turbo (as PIL) on the CPU. Other formats go through ``decode_image`` (PIL for what that cannot read).
"""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from ..model.encoder import CLIPBackbone, Preprocess
from ..runtime import to_device
from .raer import Clip, DataError, ViewMaker, clip_box
from .video import clip_arrays

JPEG_MAGIC = b"\xff\xd8\xff"
CHUNK_ELEMENTS = 1 << 26  # float32 elements of one batch of view windows (256 MiB): bounds the memory of big frames


def transform_sizes(preprocess: Preprocess) -> tuple[int, int]:
    """(shorter side after the resize, centre-crop size) of the encoder's transform, which must be open_clip's
    ``Resize(n, bicubic)`` + ``CenterCrop`` (the only transform the tensor path reproduces)."""
    steps = [t for t in preprocess.pil.transforms if isinstance(t, (T.Resize, T.CenterCrop))]
    others = [t for t in preprocess.pil.transforms if not isinstance(t, (T.Resize, T.CenterCrop))
              and "convert" not in getattr(t, "__name__", type(t).__name__).lower()]  # RGB conversions: a no-op here
    ok = (len(steps) == 2 and isinstance(steps[0], T.Resize) and isinstance(steps[1], T.CenterCrop) and not others
          and steps[0].interpolation == T.InterpolationMode.BICUBIC and steps[0].max_size is None)
    size = steps[0].size if ok else None
    size = size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else size
    crop = steps[1].size if ok else None
    if not (isinstance(size, int) and crop is not None and crop[0] == crop[1] and crop[0] <= size):
        raise ValueError(f"--decode tensor reproduces open_clip's Resize(bicubic) + CenterCrop only; this encoder's "
                         f"transform is {preprocess.pil}: use --decode pil")
    return size, crop[0]


def auto_decode_device(backbone: CLIPBackbone) -> torch.device | None:
    """The device ``--decode auto`` goes by (``CropConfig.resolved``): the encoder's, or None (pil) when the tensor
    path cannot reproduce its transform (the reference's preprocessing)."""
    try:
        transform_sizes(backbone.preprocess)
    except ValueError:
        return None
    return backbone.device


# ------------------------------------------------------------------------------------------ reading and decoding

def read_frames(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The files' bytes as one uint8 tensor and their offsets [n + 1] (one tensor crosses the worker boundary).
    Frames over Pillow's size limit are refused, as the PIL path refuses them (their headers are read here)."""
    chunks = []
    for path in files:
        try:
            chunks.append(Path(path).read_bytes())
        except OSError as err:
            raise DataError(f"{path}: cannot read image ({err})") from None
        _check_size(chunks[-1], path)
    offsets = torch.tensor([0, *itertools.accumulate(len(c) for c in chunks)])
    buffer = bytearray(b"".join(chunks))
    return (torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)), offsets


def _check_size(data: bytes, path: Path) -> None:
    """A DataError for an image larger than Pillow allows (``Image.open`` reads only the header to know)."""
    try:
        with Image.open(io.BytesIO(data)):
            pass
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    except (OSError, SyntaxError, ValueError):
        pass  # unreadable: decoding names the file


def _decode_other(data: torch.Tensor, name: str) -> torch.Tensor:
    """A frame as RGB uint8 [3, H, W] on the CPU: a PNG (or other non-JPEG), or a JPEG the batched decoder refused
    (a DataError when neither torchvision nor PIL reads it)."""
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
        if image.dtype == torch.uint8:
            return image
    except (RuntimeError, ValueError):
        pass
    try:  # formats torchvision does not read (BMP, ...), or 16-bit ones: PIL, as the PIL path does
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            return T.functional.pil_to_tensor(img.convert("RGB"))
    except UnidentifiedImageError:  # (its message names the in-memory copy)
        raise DataError(f"{name}: cannot read image (not a format Pillow can identify)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{name}: cannot read image ({err})") from None


def frame_parts(data: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The encoded frames that ``read_frames`` gathered, one tensor each (views of ``data``)."""
    bounds = offsets.tolist()
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _decode_jpegs(parts: list[torch.Tensor], device) -> list[torch.Tensor]:
    """``decode_jpeg`` of ``parts``. On CUDA, torchvision allocates the images on the current stream but writes them
    from a stream of its own that does not wait for this one, so it could be handed, and overwrite, a block freed
    here that queued kernels still read (pytorch/vision#9606): that work finishes first."""
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(parts, mode=ImageReadMode.RGB, device=device)


# start-of-frame markers (SOF0..SOF15 but for DHT, JPG and DAC): their segment gives the number of colour components
FRAME_HEADERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def batch_decodable(part: torch.Tensor) -> bool:
    """Whether the batched decoder may take this file: a JPEG that ends with its end-of-image marker and declares
    3 colour components. nvJPEG may decode a truncated file, or a CMYK one, without an error, where libjpeg-turbo
    (the CPU's decoders) refuses the first and converts the second: those go to the CPU, which decides."""
    data = part.numpy()
    if len(data) < 4 or bytes(data[:3]) != JPEG_MAGIC or bytes(data[-2:]) != b"\xff\xd9":
        return False
    at = 2
    while at + 9 < len(data):  # the marker segments up to the frame header
        if data[at] != 0xFF:
            return False
        marker = int(data[at + 1])
        if marker == 0xFF:  # a fill byte
            at += 1
        elif marker in FRAME_HEADERS:
            return int(data[at + 9]) == 3
        else:
            at += 2 + (int(data[at + 2]) << 8 | int(data[at + 3]))
    return False


def decode_frames(parts: list[torch.Tensor], names: list[str], device) -> list[torch.Tensor]:
    """RGB uint8 [3, H, W] images on ``device``: the JPEGs in one batched ``decode_jpeg`` call (those it may take:
    ``batch_decodable``), the rest one by one."""
    jpeg = [i for i, p in enumerate(parts) if batch_decodable(p)]
    images: list = [None] * len(parts)
    try:
        for i, image in zip(jpeg, _decode_jpegs([parts[i] for i in jpeg], device) if jpeg else []):
            images[i] = image
    except RuntimeError:
        for i in jpeg:  # one at a time, to find the frames at fault (and needing less memory)
            try:
                images[i] = _decode_jpegs([parts[i]], device)[0]
            except RuntimeError as err:
                if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err):  # the device's failure
                    raise
                images[i] = None  # the CPU decoders below say whether the file is at fault
    for i in range(len(parts)):
        if images[i] is None:  # not for the batch, or one it (damaged but readable) or memory refused: the CPU's
            images[i] = to_device(_decode_other(parts[i], names[i]), device)
    return images


# ------------------------------------------------------------------------------------------ resampling

def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic filter (a = -0.5)."""
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _axis_taps(specs: list[tuple[int, ...]], out: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's resampling weights along one axis, as its ``precompute_coeffs`` makes them: for each spec and output
    pixel, the window columns of its taps and their float32 weights (both [N, out, taps]).

    A spec is (canvas length: the face crop or the letterboxed square, where the real pixels start on it: the
    padding, their count, the resized length, the centre crop's offset). Column ``a`` is real pixel ``a``; padding
    taps go to column ``window`` (dropped: their pixels are black) but count in each row's normalisation, as in
    Pillow.
    """
    canvas, pad, length, resized, offset = np.asarray(specs, dtype=np.float64).T[..., None]  # each [N, 1]
    scale = canvas / resized
    stretch = np.maximum(scale, 1.0)
    support = 2.0 * stretch
    center = (np.arange(out) + offset + 0.5) * scale  # [N, out]
    low = np.maximum(np.floor(center - support + 0.5), 0)
    high = np.minimum(np.floor(center + support + 0.5), canvas)
    taps = low[..., None] + np.arange(2 * math.ceil(support.max()) + 1)  # [N, out, K]: Pillow's ksize taps
    inside = taps < high[..., None]
    weights = np.where(inside, _bicubic((taps - center[..., None] + 0.5) * (1.0 / stretch)[..., None]), 0.0)
    total = weights.sum(-1, keepdims=True)
    weights = weights / np.where(total == 0, 1, total)
    column = taps - pad[..., None]
    real = inside & (column >= 0) & (column < length[..., None])
    return np.where(real, column, window).astype(np.int64), weights.astype(np.float32)


def _axis_weights(specs: list[tuple[int, ...]], out: int, window: int, device: torch.device) -> torch.Tensor:
    """Resampling matrices [N, out, window] on ``device`` (``_axis_taps`` scattered into dense rows there: only the
    taps cross to the device, a few hundred kB whatever the frame size)."""
    columns, weights = (to_device(a, device) for a in _axis_taps(specs, out, window))
    dense = torch.zeros(len(specs), out, window + 1, device=device)
    return dense.scatter_(2, columns, weights)[..., :window]


def _shared(specs: list[tuple[int, ...]], out: int, window: int, device: torch.device) -> torch.Tensor:
    """``_axis_weights`` of each spec, computed once per distinct spec (all context views of a clip share one)."""
    distinct: dict[tuple[int, ...], int] = {}
    index = [distinct.setdefault(s, len(distinct)) for s in specs]
    weights = _axis_weights(list(distinct), out, window, device)
    return weights[to_device(index, device)] if len(distinct) < len(specs) else weights


def _round(x: torch.Tensor) -> torch.Tensor:
    """Pillow's rounding of a pass to uint8 values (half up, clipped)."""
    return x.add_(0.5).floor_().clamp_(0, 255)


def _weighted(pixels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``pixels @ weights`` ([N, m, k] @ [N, k, n]) in float32, for pixels that are whole numbers 0..255.

    On CUDA float32 products cost several times more than tensor-core ones. The pixels are exact in float16, and
    the weights are split into a float16 part and its float16 remainder: two float16 products summed in float32 keep
    them to about 2^-22 (TF32 would keep 2^-11, and switching it on is process-wide: other threads' products would
    change with it)."""
    if pixels.device.type != "cuda":
        return torch.bmm(pixels.float(), weights)
    whole = pixels.half()
    high, low = split_weights(weights)
    return torch.bmm(whole, high, out_dtype=torch.float32).add_(torch.bmm(whole, low, out_dtype=torch.float32))


def split_weights(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``weights`` as float16 ``(high, low)`` with ``high + low`` equal to them to about 2^-22."""
    high = weights.half()
    return high, (weights - high.float()).half()


def _windows(frames: torch.Tensor, views: list[tuple[int, ...]], rows_h: int, cols_w: int,
             gather: bool | None = None) -> torch.Tensor:
    """uint8 [N, 3, rows_h, cols_w]: each view's window at the top left (what lies past it gets weight 0).
    ``gather`` (default: on CUDA) cuts them all with one indexing kernel instead of one copy per view."""
    if frames.device.type == "cuda" if gather is None else gather:  # a kernel launch per view costs the main process
        where = np.asarray([v[:3] for v in views])
        rows = np.minimum(where[:, 1:2] + np.arange(rows_h), frames.shape[-2] - 1)
        cols = np.minimum(where[:, 2:3] + np.arange(cols_w), frames.shape[-1] - 1)
        frame, rows, cols = (to_device(a, frames.device) for a in (where[:, :1, None], rows, cols))
        return frames.permute(0, 2, 3, 1)[frame, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    out = frames.new_empty(len(views), 3, rows_h, cols_w)  # on the CPU slices are 15x faster than that gather
    for k, (frame, top, left, height, width) in enumerate(v[:5] for v in views):
        out[k, :, :height, :width] = frames[frame, :, top:top + height, left:left + width]
    return out


def render(frames: torch.Tensor, views: list[tuple[int, ...]], size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size] views of uint8 ``frames`` [F, 3, H, W], one per row of ``views`` (``view_spec``)."""
    device = frames.device
    rows_h, cols_w = max(v[3] for v in views), max(v[4] for v in views)
    weights_y = _shared([v[5:10] for v in views], size, rows_h, device)  # [N, S, h]
    weights_x = _shared([v[10:15] for v in views], size, cols_w, device)  # [N, S, w]
    n = len(views)
    pixels = _windows(frames, views, rows_h, cols_w).reshape(n, 3 * rows_h, cols_w)  # uint8: ``_weighted`` converts
    across = _round(_weighted(pixels, weights_x.transpose(1, 2)))  # horizontal pass first, as Pillow: [N, 3 h, S]
    across = across.view(n, 3, rows_h, size).transpose(2, 3).reshape(n, 3 * size, rows_h)  # [N, 3 S(x), h]
    down = _round(_weighted(across, weights_y.transpose(1, 2)))  # [N, 3 S(x), S(y)]
    return down.view(n, 3, size, size).transpose(2, 3).to(torch.uint8)


def _axis(canvas: int, pad: int, length: int, resized: int, crop: int) -> tuple[int, ...]:
    offset = int(round((resized - crop) / 2.0))  # torchvision's CenterCrop (round half to even)
    return canvas, pad, length, resized, offset


def view_spec(frame: int, window: tuple[int, int, int, int], canvas: tuple[int, int], resize: int,
              crop: int) -> tuple[int, ...]:
    """One row for ``render``: ``window`` (left, top, right, bottom) of frame ``frame`` centred on a black ``canvas``
    (height, width), then resized (shorter side to ``resize``, as torchvision's ``Resize``) and centre-cropped."""
    left, top, right, bottom = window
    height, width = bottom - top, right - left
    short, long = sorted(canvas)
    resized = [resize, int(resize * long / short)]  # torchvision's rounding of the longer side
    out_h, out_w = resized if canvas[0] <= canvas[1] else resized[::-1]
    return (frame, top, left, height, width,
            *_axis(canvas[0], (canvas[0] - height) // 2, height, out_h, crop),
            *_axis(canvas[1], (canvas[1] - width) // 2, width, out_w, crop))


# ------------------------------------------------------------------------------------------ a clip's views

class TensorViews:
    """The tensor counterpart of ``ViewMaker.views`` + ``Preprocess.to_uint8``, for the frames of one clip.

    ``read`` (in data-loader workers) gathers the frame files' bytes and boxes; ``pixels`` (on any device) decodes
    them and returns uint8 [frames, 2 (face, context), 3, S, S], the same layout as the PIL path's.
    """

    def __init__(self, view_maker: ViewMaker, preprocess: Preprocess):
        self.view_maker = view_maker
        self.resize, self.crop = transform_sizes(preprocess)

    def read(self, clip: Clip, files: list[Path]) -> dict:
        """Bytes and boxes of ``files`` (frames of ``clip``): what ``pixels`` needs, no decoding. A video has no
        per-frame files: its frames (ascending) are decoded here, into ``frames`` uint8 [n, 3, H, W]."""
        boxes = [self.view_maker.frame_boxes(clip, f) for f in files]
        found = {"faces": [face for face, _ in boxes], "body": boxes[0][1] if boxes else None,
                 "files": [str(f) for f in files], "video_id": clip.video_id}
        if clip.video is not None:
            rgb = [torch.from_numpy(a).permute(2, 0, 1) for _, a in clip_arrays(clip, files)]
            if len({image.shape for image in rgb}) > 1:  # a video whose frame size changes: frame by frame
                return found | {"images": rgb}
            return found | {"frames": torch.stack(rgb) if rgb else torch.empty(0, 3, 0, 0)}
        data, offsets = read_frames(files)
        return found | {"data": data, "offsets": offsets}

    @staticmethod
    def decode(inputs: dict, device) -> list[torch.Tensor]:
        """The frames of what ``read`` gathered as RGB uint8 [3, H, W] on ``device`` (``images``: already decoded)."""
        return TensorViews.decode_clips([inputs], device)[0]

    @staticmethod
    def decode_clips(clips: list[dict], device) -> list[list[torch.Tensor]]:
        """``decode`` of several clips, the frame files of all of them in one batched call: on a GPU, nvJPEG's cost
        per call (two stream synchronisations, the batch set-up) is paid once for all."""
        encoded = [c for c in clips if "images" not in c and "frames" not in c]
        parts = [part for c in encoded for part in frame_parts(c["data"], c["offsets"])]
        decoded = iter(decode_frames(parts, [name for c in encoded for name in c["files"]], device) if parts else [])
        return [[image.to(device) for image in c["images"]] if "images" in c
                else list(c["frames"].to(device)) if "frames" in c  # a video's frames
                else [next(decoded) for _ in c["files"]] for c in clips]

    def pixels_of(self, clips: list[dict], device) -> list[torch.Tensor]:
        """``pixels`` of several clips, their frame files decoded in one call (``decode_clips``); each clip is cut
        on its own, so its pixels are those ``pixels`` gives it alone."""
        files = [c for c in clips if "frames" not in c]  # a video's frames stay stacked, as ``pixels`` takes them
        decoded = iter(self.decode_clips(files, device))
        return [self.pixels(c if "frames" in c else c | {"images": next(decoded)}, device) for c in clips]

    def pixels(self, inputs: dict, device) -> torch.Tensor:
        """uint8 [frames, 2, 3, S, S] on ``device`` from what ``read`` gathered, or from decoded ``images`` with the
        same boxes and names (a DataError names a bad frame)."""
        device = torch.device(device)
        stacked = inputs["frames"].to(device) if "frames" in inputs and "images" not in inputs else None
        images = list(stacked) if stacked is not None else self.decode(inputs, device)
        out = torch.empty(len(images), 2, 3, self.crop, self.crop, dtype=torch.uint8, device=device)
        shapes: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            shapes.setdefault(tuple(image.shape[-2:]), []).append(i)
        for (height, width), members in shapes.items():
            if stacked is not None and len(members) == len(images):
                frames = stacked  # every frame has this size: no copy
            else:
                frames = torch.stack([images[i] for i in members]) if len(members) > 1 else images[members[0]][None]
            specs, targets = [], []
            for j, i in enumerate(members):
                face, context = self._windows(inputs, i, width, height)
                specs += [view_spec(j, face, (face[3] - face[1], face[2] - face[0]), self.resize, self.crop),
                          view_spec(j, context, (max(context[3] - context[1], context[2] - context[0]),) * 2,
                                    self.resize, self.crop)]
                targets += [2 * i, 2 * i + 1]  # face, context of frame i in out.flatten(0, 1)
            for chunk in _chunks(specs):
                views = render(frames, [specs[k] for k in chunk], self.crop)
                out.view(-1, 3, self.crop, self.crop).index_copy_(
                    0, to_device([targets[k] for k in chunk], device), views)
        return out

    def _windows(self, inputs: dict, i: int, width: int, height: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(face window, context window) of frame ``i``: ``clip_box`` of its boxes, or the whole frame."""
        frame, box, body = inputs["files"][i], inputs["faces"][i], inputs["body"]
        whole = (0, 0, width, height)
        face = whole if box is None else clip_box(box, width, height, self.view_maker.margin, f"face box of {frame}")
        context = whole if body is None else clip_box(body, width, height, 0, f"body box of {inputs['video_id']}")
        return face, context


def _chunks(specs: list[tuple[int, ...]]) -> list[list[int]]:
    """Indices of ``specs`` in batches for ``render``: each view fills at least half of its batch's padded window,
    and a batch's windows stay within ``CHUNK_ELEMENTS`` (1080p frames make big ones)."""
    chunks: list[tuple[list[int], int, int]] = []  # (members, padded height, padded width)
    for k in sorted(range(len(specs)), key=lambda k: -specs[k][3] * specs[k][4]):
        height, width = specs[k][3:5]
        if chunks:
            members, top_h, top_w = chunks[-1]
            padded_h, padded_w = max(top_h, height), max(top_w, width)
            fits = 3 * padded_h * padded_w * (len(members) + 1) <= CHUNK_ELEMENTS
            if fits and padded_h * padded_w <= 2 * height * width:
                chunks[-1] = (members + [k], padded_h, padded_w)
                continue
        chunks.append(([k], height, width))
    return [members for members, _, _ in chunks]

