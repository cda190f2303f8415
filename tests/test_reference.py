"""caer import-reference: the authors' released CLIP-CAER checkpoint as a caer checkpoint, and the reference mode.

The official checkpoint is built here from the facts of the public code (zgsfer/CLIP-CAER): key names and shapes
of its model for OpenAI's ViT-B/32 (its temporal transformers are hard-wired to 512-wide features, 8 heads of 64
and an MLP of 1024, so the test cannot shrink it), random values. Its forward pass is written out below from the
published equations with plain tensor operations, in float64, without calling caer's modules.
"""

from __future__ import annotations

import json
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caer.cache.schema import differences
from caer.data.tensor_views import transform_sizes
from caer.model.checkpoint import build_model, checkpoint_config, load_checkpoint
from caer.model.encoder import load_backbone
from caer.model.reference import Official, map_state
from conftest import MODEL, assert_fp16_equal, assert_in_output, run_cli

START, END, VOCAB, CONTEXT = 49406, 49407, 49408, 77  # CLIP's start/end-of-text ids (padding is 0), vocabulary, length
CLASSES, N_CTX, FRAMES = 5, 8, 16  # CLIP-CAER on RAER: 5 classes, 8 class-specific context vectors, 16 segments
SENTENCE_LENGTHS = (14, 21, 9, 30, 17)  # tokens of each class's (made-up) descriptive sentence


@dataclass(frozen=True)
class Geometry:
    """Sizes of the official model: its CLIP towers, and its temporal transformers (1 layer) and fusion."""

    vision_width: int
    vision_layers: int
    vision_heads: int
    patch: int
    grid: int  # patches per side
    text_width: int
    text_layers: int
    text_heads: int
    d: int  # feature width: CLIP's output, the temporal transformers', project_fc's
    heads: int  # of the temporal attention, each d / heads wide
    mlp: int


# OpenAI's ViT-B/32 (224 px = 7 x 7 patches of 32) as CLIP-CAER loads it; its temporal sizes are hard-wired there
VIT_B_32 = Geometry(768, 12, 12, 32, 7, 512, 12, 8, 512, 8, 1024)
# the same model around caer-tiny (configs/clip/caer-tiny.json), for the cheap end-to-end runs
TINY = Geometry(64, 2, 2, 8, 4, 64, 2, 2, 64, 8, 128)


class RecorderMeter:
    """The official script pickles its training-curve recorder (a class of its __main__) into the checkpoint."""

    def __init__(self):
        self.total_epoch, self.current_epoch = 20, 7
        self.epoch_accuracy = np.zeros((20, 2), dtype=np.float32)


def clip_tower(prefix: str, width: int, layers: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a CLIP transformer's residual blocks (OpenAI's naming)."""
    shapes = {}
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        shapes |= {b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                   b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                   b + "ln_1.weight": (width,), b + "ln_1.bias": (width,), b + "ln_2.weight": (width,),
                   b + "ln_2.bias": (width,), b + "mlp.c_fc.weight": (4 * width, width),
                   b + "mlp.c_fc.bias": (4 * width,), b + "mlp.c_proj.weight": (width, 4 * width),
                   b + "mlp.c_proj.bias": (width,)}
    return shapes


def official_shapes(g: Geometry) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official state_dict but the repeats under clip_model_ (added by ``official_state``)."""
    v, t, w = "image_encoder.", "text_encoder.", g.vision_width
    shapes = {v + "class_embedding": (w,), v + "positional_embedding": (g.grid**2 + 1, w), v + "proj": (w, g.d),
              v + "conv1.weight": (w, 3, g.patch, g.patch), v + "ln_pre.weight": (w,), v + "ln_pre.bias": (w,),
              v + "ln_post.weight": (w,), v + "ln_post.bias": (w,),
              **clip_tower(v, w, g.vision_layers), **clip_tower(t, g.text_width, g.text_layers),
              t + "positional_embedding": (CONTEXT, g.text_width), t + "text_projection": (g.text_width, g.d),
              t + "ln_final.weight": (g.text_width,), t + "ln_final.bias": (g.text_width,),
              "clip_model_.token_embedding.weight": (VOCAB, g.text_width), "clip_model_.logit_scale": (),
              "prompt_learner.ctx": (CLASSES, N_CTX, g.text_width), "project_fc.weight": (g.d, 2 * g.d),
              "project_fc.bias": (g.d,)}
    for net in ("temporal_net", "temporal_net_body"):
        layer = f"{net}.temporal_transformer.layers.0."
        shapes |= {f"{net}.cls_token": (1, 1, g.d), f"{net}.pos_embedding": (1, FRAMES + 1, g.d),
                   layer + "0.fn.norm.weight": (g.d,), layer + "0.fn.norm.bias": (g.d,),
                   layer + "0.fn.fn.to_qkv.weight": (3 * g.d, g.d), layer + "0.fn.fn.to_out.0.weight": (g.d, g.d),
                   layer + "0.fn.fn.to_out.0.bias": (g.d,), layer + "1.fn.norm.weight": (g.d,),
                   layer + "1.fn.norm.bias": (g.d,), layer + "1.fn.fn.net.0.weight": (g.mlp, g.d),
                   layer + "1.fn.fn.net.0.bias": (g.mlp,), layer + "1.fn.fn.net.3.weight": (g.d, g.mlp),
                   layer + "1.fn.fn.net.3.bias": (g.d,)}
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values of a sensible scale: norms near 1, biases and embeddings small, matrices scaled by 1/sqrt(fan-in)."""
    if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(("cls_token", "pos_embedding")):  # the reference draws these from N(0, 1)
        return torch.randn(shape, generator=gen)
    if len(shape) >= 2 and not name.endswith(("embedding", "embedding.weight", "ctx")):
        return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    return 0.02 * torch.randn(shape, generator=gen) if shape else torch.tensor(math.log(100.0))


def official_state(g: Geometry) -> tuple[OrderedDict, list[int]]:
    """(the official state_dict, the end-of-text position of each class's prompt)."""
    gen = torch.Generator().manual_seed(0)
    state = OrderedDict((k, random_tensor(k, s, gen)) for k, s in official_shapes(g).items())
    table = state["clip_model_.token_embedding.weight"]
    ids = torch.zeros(CLASSES, CONTEXT - 1 - N_CTX, dtype=torch.long)  # padding after the end-of-text token
    for k, n in enumerate(SENTENCE_LENGTHS):
        ids[k, :n] = torch.randint(1, START, (n,), generator=gen)
        ids[k, n] = END
    state["prompt_learner.token_prefix"] = table[START].expand(CLASSES, 1, g.text_width).clone()
    state["prompt_learner.token_suffix"] = table[ids]
    for name in [k for k in state if k.startswith(("image_encoder.", "text_encoder."))]:  # the same modules twice
        twin = name.replace("image_encoder.", "clip_model_.visual.").replace("text_encoder.", "clip_model_.")
        state[twin] = state[name]
    return state, [1 + N_CTX + n for n in SENTENCE_LENGTHS]


def save_official(state: OrderedDict, path: Path) -> Path:
    """Save as the official script does: epoch, state_dict, best_acc (a numpy float), optimizer, recorder."""
    recorder = RecorderMeter
    recorder.__module__, recorder.__qualname__ = "__main__", "RecorderMeter"
    main = sys.modules["__main__"]
    had = hasattr(main, "RecorderMeter")
    main.RecorderMeter = recorder  # pickled by reference as __main__.RecorderMeter, as the official script does
    try:
        torch.save({"epoch": 7, "state_dict": state, "best_acc": np.float64(61.25), "recorder": recorder(),
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0, 1]}]}}, path)
    finally:
        if not had:
            del main.RecorderMeter
    return path


# ------------------------------------------------------------------------------------------ the published forward

def layer_norm(x, s, name):
    return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"], eps=1e-5)


def linear(x, s, name):
    return x @ s[name + ".weight"].T + s[name + ".bias"]


def attention(x, w_in, b_in, w_out, b_out, heads, mask=None):
    """Multi-head self-attention: softmax(q k^T / sqrt(d_head) + mask) v, heads concatenated, projected."""
    n, length, width = x.shape
    qkv = x @ w_in.T + (b_in if b_in is not None else 0)
    q, k, v = (t.reshape(n, length, heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + (mask if mask is not None else 0)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, -1)
    return out @ w_out.T + b_out


def clip_transformer(x, s, prefix, layers, heads, mask=None):
    """CLIP's residual blocks: x + attn(ln_1 x), then x + c_proj(QuickGELU(c_fc(ln_2 x)))."""
    for i in range(layers):
        b = f"{prefix}resblocks.{i}."
        x = x + attention(layer_norm(x, s, b + "ln_1"), s[b + "attn.in_proj_weight"], s[b + "attn.in_proj_bias"],
                          s[b + "attn.out_proj.weight"], s[b + "attn.out_proj.bias"], heads, mask)
        h = linear(layer_norm(x, s, b + "ln_2"), s, b + "mlp.c_fc")
        x = x + linear(h * torch.sigmoid(1.702 * h), s, b + "mlp.c_proj")
    return x


def image_features(images, s, g: Geometry):
    """CLIP's ViT image tower on [N, 3, S, S] pixels in [0, 1] (the reference feeds them unnormalised)."""
    p = "image_encoder."
    x = F.conv2d(images, s[p + "conv1.weight"], stride=g.patch).flatten(2).transpose(1, 2)
    x = torch.cat([s[p + "class_embedding"].expand(len(x), 1, -1), x], dim=1) + s[p + "positional_embedding"]
    x = clip_transformer(layer_norm(x, s, p + "ln_pre"), s, p + "transformer.", g.vision_layers, g.vision_heads)
    return layer_norm(x[:, 0], s, p + "ln_post") @ s[p + "proj"]


def class_text_features(s, ends, g: Geometry):
    """The text tower on [SOS, ctx_1..ctx_8, sentence, EOS, pad...], read at the end-of-text position."""
    prompts = torch.cat([s["prompt_learner.token_prefix"], s["prompt_learner.ctx"], s["prompt_learner.token_suffix"]], 1)
    causal = torch.full((CONTEXT, CONTEXT), float("-inf"), dtype=prompts.dtype).triu(1)
    x = clip_transformer(prompts + s["text_encoder.positional_embedding"], s, "text_encoder.transformer.",
                         g.text_layers, g.text_heads, causal)
    x = layer_norm(x, s, "text_encoder.ln_final")
    return x[torch.arange(CLASSES), ends] @ s["text_encoder.text_projection"]


def temporal(x, s, net, g: Geometry):
    """CLS token + positions, then per layer x + to_out(attn(LN x)) (QKV without bias) and x + W2 GELU_tanh(W1 LN x)."""
    x = torch.cat([s[f"{net}.cls_token"].expand(len(x), 1, -1), x], dim=1) + s[f"{net}.pos_embedding"][:, : x.shape[1] + 1]
    layer = f"{net}.temporal_transformer.layers.0."
    x = x + attention(layer_norm(x, s, layer + "0.fn.norm"), s[layer + "0.fn.fn.to_qkv.weight"], None,
                      s[layer + "0.fn.fn.to_out.0.weight"], s[layer + "0.fn.fn.to_out.0.bias"], g.heads)
    h = linear(layer_norm(x, s, layer + "1.fn.norm"), s, layer + "1.fn.fn.net.0")
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    return (x + linear(h, s, layer + "1.fn.fn.net.3"))[:, 0]


def reference_logits(face_features, body_features, s, text, g: Geometry = VIT_B_32):
    """cos(normalize(project_fc([z_face, z_body])), normalize(text_k)) / 0.01; ``text``: ``class_text_features``."""
    z = torch.cat([temporal(face_features, s, "temporal_net", g), temporal(body_features, s, "temporal_net_body", g)], -1)
    return F.normalize(linear(z, s, "project_fc"), dim=-1) @ F.normalize(text, dim=-1).T / 0.01


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(path of the official ViT-B/32 checkpoint file, its state_dict, the end-of-text positions)."""
    state, ends = official_state(VIT_B_32)
    return save_official(state, tmp_path_factory.mktemp("official") / "model_best.pth"), state, ends


@pytest.fixture(scope="module")
def published(official):
    """The official tensors in float64, and the class prompts' text features from them."""
    _, state, ends = official
    s = {k: v.double() for k, v in state.items()}
    with torch.no_grad():
        return s, class_text_features(s, ends, VIT_B_32)


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    """The official checkpoint through `caer import-reference`: (path, loaded checkpoint, caer model, its output)."""
    out = tmp_path_factory.mktemp("converted") / "clip-caer.pt"
    result = run_cli(["import-reference", str(official[0]), "-o", str(out), "--root", "RAER"])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    model, _ = build_model(checkpoint_config(ckpt), torch.device("cpu"), ckpt)
    return out, ckpt, model.eval(), result.output


# ------------------------------------------------------------------------------------------ tests

def test_every_official_tensor_is_mapped_or_a_checked_repeat(official, converted):
    _, state, _ = official
    _, ckpt, model, output = converted
    mapped, repeats = map_state(Official(Path("x.pth"), state), model.state_dict())
    assert len(mapped) + len(repeats) == len(state)
    assert all(r.startswith("clip_model_.") for r in repeats)
    assert len(mapped) == len(state) - len(repeats) and str(len(mapped)) in output
    assert ckpt["stage"] == 3 and ckpt["encoder"]["weights"].startswith("finetuned:")
    assert ckpt["encoder"]["finetuned_from"] == "openai" and ckpt["imported"]["epoch"] == 7
    assert ckpt["imported"]["best_acc"] == 61.25
    cfg = checkpoint_config(ckpt)
    assert (cfg.encoder.model, cfg.encoder.preprocess, cfg.model.temporal_block, cfg.model.class_prompts) == (
        "ViT-B-32-quickgelu", "reference", "reference", "embedded")
    assert (cfg.model.adapter, cfg.model.input_norm, cfg.model.slerp_weight, cfg.model.temperature) == (False, False, 0, 0.01)
    assert cfg.crop.root == "RAER"


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s.pop("temporal_net_body.pos_embedding"), "missing key 'temporal_net_body.pos_embedding'"),
    (lambda s: s.pop("image_encoder.ln_post.bias"), "missing key 'image_encoder.ln_post.bias'"),
    (lambda s: s.__setitem__("temporal_net.extra_token", torch.zeros(3)), "unexpected key 'temporal_net.extra_token'"),
    (lambda s: s.__setitem__("clip_model_.visual.proj", torch.zeros(768, 512)),
     "clip_model_.visual.proj differs from image_encoder.proj"),
    (lambda s: s.__setitem__("project_fc.bias", torch.zeros(7)), "project_fc.bias has shape [7]"),
])
def test_a_missing_unexpected_or_wrong_tensor_is_named(official, converted, change, fragment):
    state = OrderedDict(official[1])
    change(state)
    with pytest.raises(ValueError) as err:
        map_state(Official(Path("model_best.pth"), state), converted[2].state_dict())
    assert fragment in str(err.value)


def test_converted_encoder_features_equal_the_published_to_float16_and_the_logits_follow(published, converted):
    """Random uint8 frames of both streams (one clip of 2 frames) through the image encoder and everything after.
    caer rounds a frozen encoder's features to float16, as its cache stores them: the features are compared to
    float16 precision, and the logits with the published forward on those same features."""
    s, text = published
    gen = torch.Generator().manual_seed(1)
    face, body = (torch.randint(0, 256, (1, 2, 3, 224, 224), dtype=torch.uint8, generator=gen) for _ in range(2))
    with torch.no_grad():
        ours = converted[2](face, body)
        ours_feats = converted[2].frame_features(face, body)
        feats = [image_features(x.flatten(0, 1).double() / 255, s, VIT_B_32).view(1, 2, -1) for x in (face, body)]
        expected = reference_logits(*(f.double() for f in ours_feats), s, text)
    for got, want, what in zip(ours_feats, feats, ("face", "body")):
        assert_fp16_equal(got.half().numpy(), want.float().numpy(), what)
    torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=0)


def test_converted_logits_equal_the_published_forward_on_features(published, converted):
    """All 16 segments of 4 clips, from (cached) frame features: the temporal, fusion and text parts."""
    s, text = published
    gen = torch.Generator().manual_seed(2)
    face, body = (torch.randn(4, FRAMES, VIT_B_32.d, generator=gen) for _ in range(2))
    with torch.no_grad():
        ours = converted[2](face, body)
        expected = reference_logits(face.double(), body.double(), s, text)
    torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=0)
    assert (ours.argmax(1) == expected.argmax(1)).all() and expected.std() > 1  # logits that tell classes apart


def test_class_prompt_embeddings_survive_the_round_trip_bit_for_bit(official, converted):
    _, state, ends = official
    learner = converted[2].prompt_learner
    assert torch.equal(learner.prefix, state["prompt_learner.token_prefix"])
    assert torch.equal(learner.suffix, state["prompt_learner.token_suffix"])
    assert torch.equal(learner.ctx, state["prompt_learner.ctx"])
    prompts = torch.cat([state["prompt_learner.token_prefix"], state["prompt_learner.ctx"],
                         state["prompt_learner.token_suffix"]], dim=1)
    assert torch.equal(learner.embeddings(), prompts)
    assert learner.tokens.argmax(-1).tolist() == ends


@pytest.mark.slow
def test_extract_from_the_converted_checkpoint_uses_its_encoder_identity(converted):
    from caer.model.checkpoint import backbone_from_checkpoint

    path, ckpt, _, _ = converted
    backbone = backbone_from_checkpoint(path, torch.device("cpu"))
    assert not differences(backbone.identity(), ckpt["encoder"])


def test_cli_errors_name_the_key_or_the_unsafe_global(tmp_path):
    partial = tmp_path / "partial.pth"
    torch.save({"epoch": 1, "state_dict": {"prompt_learner.token_prefix": torch.zeros(5, 1, 4)}}, partial)
    result = run_cli(["import-reference", str(partial), "-o", str(tmp_path / "x.pt")])
    assert result.exit_code == 2
    assert_in_output("missing key 'prompt_learner.ctx'", result.output)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {}, "extra": Path("x")}, unsafe)
    result = run_cli(["import-reference", str(unsafe), "-o", str(tmp_path / "x.pt")])
    assert result.exit_code == 2
    assert_in_output("cannot be loaded safely", result.output)
    assert_in_output("CAER_TRUST_CHECKPOINTS=1", result.output)


def test_a_model_without_quickgelu_is_refused_for_the_authors_file(official, tmp_path):
    """Plain ViT-B-32 has the official tensors' shapes, but runs exact GELU on weights trained with QuickGELU."""
    out = tmp_path / "x.pt"
    result = run_cli(["import-reference", str(official[0]), "-o", str(out), "--model", "ViT-B-32"])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert_in_output("--model ViT-B-32: the authors' CLIP is OpenAI's, trained with QuickGELU; use --model "
                     "ViT-B-32-quickgelu", result.output)


def test_import_reference_has_one_flag_per_option():
    import typer

    from caer.cli import app
    from caer.config import IMPORT_OVERRIDES, ImportReferenceConfig, options

    command = typer.main.get_command(app).commands["import-reference"]
    flags = sorted(p.name for p in command.params if p.name != "help")
    assert flags == sorted([f.name for f, _ in options(ImportReferenceConfig)] + list(IMPORT_OVERRIDES))


# ------------------------------------------------------------------------------------------ the reference's pixels

def test_reference_pixels_are_the_squashed_frame_in_0_1_and_a_separate_encoder_identity():
    reference = load_backbone(MODEL, "random", "cpu", "reference")
    open_clip_mode = load_backbone(MODEL, "random", "cpu")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    size = reference.preprocess.image_size
    expected = torch.from_numpy(np.array(img.resize((size, size), Image.BILINEAR))).permute(2, 0, 1).float() / 255
    assert torch.equal(reference.preprocess.normalize(reference.preprocess.to_uint8(img)), expected)
    assert any(line.startswith("preprocess.") for line in differences(reference.identity(), open_clip_mode.identity()))
    with pytest.raises(ValueError, match="use --decode pil"):
        transform_sizes(reference.preprocess)


def test_extract_takes_the_preprocessing_flag():
    from caer.config import ExtractConfig, from_flat
    from caer.pipeline.extract import load_encoder

    cfg = from_flat(ExtractConfig, {"model": MODEL, "pretrained": "random", "preprocess": "reference", "device": "cpu"})
    assert load_encoder(cfg).preprocess.std == (1.0, 1.0, 1.0)


# ------------------------------------------------------------------------------------------ end to end (tiny model)

def data_flags(ds) -> list[str]:
    train, val, test = ds.annotations
    return ["--train-list", str(train), "--val-list", str(val), "--test-list", str(test), "--root", str(ds.root),
            "--face-boxes", str(ds.face_boxes)]


@pytest.fixture(scope="module")
def tiny_imported(dataset, tmp_path_factory) -> Path:
    """The official model built around caer-tiny (so that it runs in seconds), through `caer import-reference`."""
    state, _ = official_state(TINY)
    folder = tmp_path_factory.mktemp("tiny_official")
    out = folder / "imported.pt"
    result = run_cli(["import-reference", str(save_official(state, folder / "model_best.pth")), "-o", str(out),
                      "--model", MODEL, *data_flags(dataset)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_an_imported_checkpoint_evaluates_from_raw_frames_and_from_its_own_cache(dataset, tiny_imported, tmp_path):
    """`caer eval` and `caer extract --from-checkpoint` take the converted checkpoint, and its cache gives the raw
    frames' predictions."""
    out, common = tiny_imported, ["--device", "cpu", "--workers", "0"]
    raw = run_cli(["eval", str(out), "--split", "test", "--json", str(tmp_path / "raw.json"), *common])
    assert raw.exit_code == 0, raw.output
    cache = tmp_path / "imported.zarr"
    extracted = run_cli(["extract", *map(str, dataset.annotations), "--from-checkpoint", str(out), "-o", str(cache),
                         "--root", str(dataset.root), "--face-boxes", str(dataset.face_boxes), *common])
    assert extracted.exit_code == 0, extracted.output
    cached = run_cli(["eval", str(out), "--split", "test", "--cache", str(cache), "--json", str(tmp_path / "cache.json"),
                      *common])
    assert cached.exit_code == 0, cached.output
    reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("raw", "cache")]
    assert [r["source"] for r in reports] == ["raw", "cache"]
    assert reports[0]["predictions"] == reports[1]["predictions"]


@pytest.mark.slow
def test_the_reference_mode_trains_from_scratch_in_stage_3(dataset, weights, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["train", "-c", "clip-caer-reference", "--model", MODEL, "--pretrained", str(weights),
                      *data_flags(dataset), "--epochs", "1", "--num-frames", "4", "--batch-size", "4",
                      "--workers", "0", "--device", "cpu", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(run_dir / "stage3-best.pt")
    assert ckpt["stage"] == 3 and ckpt["encoder"]["preprocess"]["std"] == [1.0, 1.0, 1.0]
    assert checkpoint_config(ckpt).model.temporal_block == "reference"
    assert (run_dir / "test_report.json").is_file()



@pytest.mark.slow
def test_an_imported_checkpoint_fine_tunes_with_its_embedded_prompts(dataset, weights, tiny_imported, tmp_path):
    flags = ["-c", "clip-caer-reference", "--init-from", str(tiny_imported), "--model", MODEL, "--pretrained",
             str(weights), *data_flags(dataset), "--temporal-mlp", str(TINY.mlp), "--epochs", "1", "--batch-size", "4",
             "--workers", "0", "--device", "cpu"]
    refused = run_cli(["train", *flags, "--run-dir", str(tmp_path / "refused")])
    assert refused.exit_code == 2
    assert_in_output("add --class-prompts embedded", refused.output)
    result = run_cli(["train", *flags, "--class-prompts", "embedded", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    before, after = load_checkpoint(tiny_imported)["model"], load_checkpoint(tmp_path / "run" / "stage3-best.pt")["model"]
    assert torch.equal(before["prompt_learner.suffix"], after["prompt_learner.suffix"])  # buffers: kept as imported
    assert not torch.equal(before["prompt_learner.ctx"], after["prompt_learner.ctx"])  # the context vectors train
    # the text tower is the imported file's, not --pretrained's: the fine-tuned checkpoint keeps it
    text = [k for k in before if k.startswith("clip.") and not k.startswith("clip.visual.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)


def test_the_output_is_checked_before_the_official_file_is_read(tmp_path):
    """-o naming the official file itself, or a file that exists, is refused (no checkpoint is read or written)."""
    official = tmp_path / "CLIP-CAER.pth"
    official.write_bytes(b"not read")
    result = run_cli(["import-reference", str(official), "-o", str(official)])
    assert result.exit_code == 2 and official.read_bytes() == b"not read"
    assert_in_output("is the official checkpoint", result.output)
    existing = tmp_path / "clip-caer.pt"
    existing.write_bytes(b"kept")
    result = run_cli(["import-reference", str(official), "-o", str(existing)])
    assert result.exit_code == 2 and existing.read_bytes() == b"kept"
    assert_in_output("already exists: pass --overwrite", result.output)
