"""The model's pieces on their own (SPEC sections 5, 6 and 8): slerp and IEC, the losses, WAR/UAR, TSN sampling,
the EAA adapter and the CoOp prompt learner. No dataset; the tiny CLIP with random weights where text is needed."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from caer.config import ModelConfig
from caer.data.datasets import sample_indices
from caer.model.caer_model import CAERModel, ExpressionAdapter, PromptLearner, slerp
from caer.model.encoder import load_backbone
from caer.model.losses import class_balanced_weights, decorrelation_loss, mutual_information_loss, ramp_weight
from caer.model.metrics import confusion_matrix, uar, uar_all_classes, war
from conftest import MODEL

CLASSES = ["Neutrality", "Enjoyment", "Confusion", "Fatigue", "Distraction"]
DESCRIPTIONS = [f"a student showing {name.lower()} in the classroom" for name in CLASSES]


@pytest.fixture(scope="module")
def tiny_clip():
    """Our own tiny CLIP (random weights): CAERModel freezes its text tower, so the shared fixture stays untouched."""
    return load_backbone(MODEL, "random", "cpu")


def unit(*shape, seed=0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    cos = (F.normalize(x, dim=-1) * F.normalize(y, dim=-1)).sum(-1)
    return torch.acos(cos.clamp(-1, 1))


# ------------------------------------------------------------------------------------------ slerp

WEIGHTS = (0.0, 0.3, 0.5, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("case", ["parallel", "antiparallel"])
def test_slerp_is_finite_with_finite_gradients_at_angle_0_and_pi(case, weight, dtype):
    a0 = unit(6, 16, seed=1, dtype=dtype)
    a = a0.clone().requires_grad_()
    b = (a0 if case == "parallel" else -a0).clone().requires_grad_()
    out = slerp(a, b, weight)
    assert torch.isfinite(out).all()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    (out * probe).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    # the result is a unit vector at angle weight * theta from a (theta = 0 or pi) and (1 - weight) * theta from b
    theta = 0.0 if case == "parallel" else math.pi
    out = out.detach()
    assert torch.allclose(out.norm(dim=-1), torch.ones(6, dtype=dtype), atol=tol)
    cos_a = (out * a0).sum(-1)
    cos_b = (out * b.detach()).sum(-1)
    assert torch.allclose(cos_a, torch.full_like(cos_a, math.cos(weight * theta)), atol=tol), (case, weight, cos_a)
    assert torch.allclose(cos_b, torch.full_like(cos_b, math.cos((1 - weight) * theta)), atol=tol), (case, weight, cos_b)


def test_slerp_matches_the_closed_form_at_generic_angles():
    a, b = unit(200, 12, seed=3), unit(200, 12, seed=4)
    theta = angle(a, b)
    # also nearly parallel and nearly antiparallel pairs (outside the fallback zone)
    bent = F.normalize(a + 0.05 * unit(200, 12, seed=5), dim=-1)
    for x, y in ((a, b), (a, bent), (a, -bent)):
        theta = angle(x, y)
        for w in (0.1, 0.3, 0.5, 0.7, 0.9):
            r = slerp(x, y, w)
            assert torch.allclose(r.norm(dim=-1), torch.ones(len(r), dtype=r.dtype), atol=1e-9)
            assert torch.allclose(angle(x, r), w * theta, atol=1e-6)
            assert torch.allclose(angle(r, y), (1 - w) * theta, atol=1e-6)
            # r lies in span(x, y): nothing is left after projecting onto an orthonormal basis of the plane
            e1 = x
            e2 = F.normalize(y - (y * x).sum(-1, keepdim=True) * x, dim=-1)
            rest = r - (r * e1).sum(-1, keepdim=True) * e1 - (r * e2).sum(-1, keepdim=True) * e2
            assert rest.norm(dim=-1).max() < 1e-9
        assert torch.allclose(slerp(x, y, 0.0), x, atol=1e-12)
        assert torch.allclose(slerp(x, y, 1.0), y, atol=1e-9)


@pytest.mark.parametrize("gap", [3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
def test_slerp_stays_on_the_sphere_around_the_fallback_threshold(gap):
    """float32 pairs at angle ``gap`` and ``pi - gap``, on either side of the fallback (|cos| > 1 - 1e-5, ~4.5e-3 rad)."""
    a = unit(50, 32, seed=8, dtype=torch.float32)
    ortho = unit(50, 32, seed=9, dtype=torch.float32)
    ortho = F.normalize(ortho - (ortho * a).sum(-1, keepdim=True) * a, dim=-1)
    for theta in (gap, math.pi - gap):
        b = math.cos(theta) * a + math.sin(theta) * ortho
        # float32 acos is ill-conditioned at -1: an error of ~1e-7 in cos becomes ~1e-7 / gap in theta and
        # ~1e-7 / gap^2 in the length of the arc formula's result (3e-4 at gap 0.03); the fallback has none
        norm_tol = 3e-7 / gap**2 if theta > 3 and gap > 5e-3 else 1e-5
        for w in (0.3, 0.5, 0.9):
            r = slerp(a, b, w)
            assert torch.allclose(r.norm(dim=-1), torch.ones(50), atol=norm_tol), (theta, w)
            got = angle(a.double(), r.double())
            # near pi the fallback turns in a fixed plane: the angle from a is w * pi instead of w * theta
            assert torch.allclose(got, torch.full_like(got, w * theta), atol=gap + 1e-4 if theta > 3 else 2e-4), (theta, w)


def test_slerp_broadcasts_prototypes_against_samples():
    protos, z = unit(5, 8, seed=6), unit(3, 8, seed=7)
    out = slerp(protos.unsqueeze(0), z.unsqueeze(1), 0.4)
    assert out.shape == (3, 5, 8)
    for i in range(3):
        for k in range(5):
            assert torch.allclose(out[i, k], slerp(protos[k], z[i], 0.4), atol=1e-12)


# ------------------------------------------------------------------------------------------ IEC

@pytest.mark.parametrize("iec_base", ["desc", "soft"])
def test_iec_never_changes_the_argmax(tiny_clip, iec_base):
    cfg = ModelConfig(CLASSES, DESCRIPTIONS, num_frames=4, temperature=0.2, iec_base=iec_base)
    model = CAERModel(tiny_clip, cfg)
    d = tiny_clip.embed_dim
    t_desc, t_soft = unit(5, d, seed=10, dtype=torch.float32), unit(5, d, seed=11, dtype=torch.float32)
    base = t_desc if iec_base == "desc" else t_soft
    z = unit(300, d, seed=12, dtype=torch.float32)
    # plus samples close to a prototype, exactly on one, and exactly opposite one (angles 0 and pi)
    z = torch.cat([z, F.normalize(base + 0.3 * unit(5, d, seed=13, dtype=torch.float32), dim=-1), base, -base])
    plain = z @ base.t() / cfg.temperature  # the cosine classifier on the IEC base
    # without IEC (slerp weight 0) the classifier is CLIP-CAER's: the learnable prompts, whatever the base
    assert torch.allclose(model.logits(z, t_desc, t_soft), z @ t_soft.t() / cfg.temperature, atol=1e-5)
    # angles in float64 by atan2 (acos is ill-conditioned at +-1: it would put z = -t at pi - 4e-4)
    zd, bd = F.normalize(z.double(), dim=-1), F.normalize(base.double(), dim=-1)
    cos = zd @ bd.t()
    sin = (zd.unsqueeze(1) - cos.unsqueeze(-1) * bd.unsqueeze(0)).norm(dim=-1)
    theta = torch.atan2(sin, cos)
    for lam in (0.2, 0.5, 0.9):
        model.cfg = dataclasses.replace(cfg, slerp_weight=lam)
        mixed = model.logits(z, t_desc, t_soft)
        assert torch.isfinite(mixed).all()
        assert not torch.allclose(mixed, plain)  # IEC does reshape the logits...
        assert torch.equal(mixed.argmax(1), plain.argmax(1)), lam  # ...but never the decision
        # SPEC section 5 note (a): cos(z, slerp(t, z, lam)) = cos((1 - lam) * theta)
        expected = torch.cos((1 - lam) * theta).float() / cfg.temperature
        assert torch.allclose(mixed, expected, atol=1e-5 / cfg.temperature), (mixed - expected).abs().max()


# ------------------------------------------------------------------------------------------ losses

@pytest.mark.parametrize("slerp_weight", [0.0, 0.3])
def test_logits_and_prompt_losses_stay_float32_under_autocast(tiny_clip, slerp_weight):
    """bf16 autocast (emulated on the CPU) must not lower the cosine logits or MI/DC: a temperature of 0.01
    magnifies bf16's rounding of a cosine (about 4e-3) to 0.4 in a logit."""
    cfg = ModelConfig(CLASSES, DESCRIPTIONS, num_frames=4, temperature=0.01, slerp_weight=slerp_weight)
    model = CAERModel(tiny_clip, cfg)
    d = tiny_clip.embed_dim
    t_desc, t_soft, z = (unit(n, d, seed=s, dtype=torch.float32) for n, s in ((5, 20), (5, 21), (64, 22)))
    exact = model.logits(z, t_desc, t_soft)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = model.logits(z, t_desc, t_soft)
        mi, dc = mutual_information_loss(t_desc, t_soft), decorrelation_loss(t_soft)
    assert under.dtype == mi.dtype == dc.dtype == torch.float32
    assert torch.allclose(under, exact, atol=1e-4)
    assert mi.item() == pytest.approx(mutual_information_loss(t_desc, t_soft).item(), rel=1e-5)
    assert dc.item() == pytest.approx(decorrelation_loss(t_soft).item(), rel=1e-5)


def infonce_by_hand(a: np.ndarray, b: np.ndarray, temperature: float) -> float:
    n = len(a)
    sim = [[float(np.dot(a[i], b[j])) / temperature for j in range(n)] for i in range(n)]

    def ce(rows):
        total = 0.0
        for i, row in enumerate(rows):
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            total += lse - row[i]
        return total / len(rows)

    cols = [[sim[i][j] for i in range(n)] for j in range(n)]
    return (ce(sim) + ce(cols)) / 2


def test_mutual_information_loss_by_hand():
    # identical orthonormal prompts: each direction's loss is log(1 + (n - 1) e^{-1/0.07})
    eye = torch.eye(2, dtype=torch.float64)
    assert mutual_information_loss(eye, eye).item() == pytest.approx(math.log1p(math.exp(-1 / 0.07)), rel=1e-9)
    # random 3x3 (asymmetric similarity matrix, so rows and columns differ)
    a, b = unit(3, 4, seed=20), unit(3, 4, seed=21)
    expected = infonce_by_hand(a.numpy(), b.numpy(), 0.07)
    assert mutual_information_loss(a, b).item() == pytest.approx(expected, rel=1e-9)
    assert mutual_information_loss(a, b, temperature=0.07).item() == pytest.approx(expected, rel=1e-9)
    assert mutual_information_loss(a, b, temperature=0.5).item() == pytest.approx(infonce_by_hand(a.numpy(), b.numpy(), 0.5), rel=1e-9)
    # rows matching better than columns must not be averaged away: row-only and column-only terms differ
    sim = a @ b.t() / 0.07
    rows = F.cross_entropy(sim, torch.arange(3)).item()
    cols = F.cross_entropy(sim.t(), torch.arange(3)).item()
    assert rows != pytest.approx(cols) and mutual_information_loss(a, b).item() == pytest.approx((rows + cols) / 2)


def test_decorrelation_loss_by_hand():
    p = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, -2.0, 2.0]], dtype=torch.float64)
    n = len(p)
    cos = lambda i, j: float(p[i] @ p[j] / (p[i].norm() * p[j].norm()))  # noqa: E731
    expected = sum(cos(i, j) ** 2 for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    # = (2 * 1/2 + 2 * 0 + 2 * 1/4) / 6 = 0.25
    assert expected == pytest.approx(0.25)
    assert decorrelation_loss(p).item() == pytest.approx(expected, rel=1e-12)
    assert decorrelation_loss(torch.eye(4)).item() == pytest.approx(0.0)
    assert decorrelation_loss(torch.ones(3, 5)).item() == pytest.approx(1.0)


def test_class_balanced_weights_are_the_effective_number_formula():
    counts = [5, 50, 500, 0]
    beta = 0.999
    raw = [(1 - beta) / (1 - beta ** max(n, 1)) for n in counts]
    expected = [w / sum(raw) * len(counts) for w in raw]
    got = class_balanced_weights(np.array(counts), beta)
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert np.allclose(got.numpy(), expected, rtol=1e-6)
    assert got.sum().item() == pytest.approx(4.0, rel=1e-6)
    assert got[0] > got[1] > got[2]  # rarer classes weigh more
    # beta -> 0: every effective number is 1, so all weights equal
    assert np.allclose(class_balanced_weights(np.array(counts), 0.0).numpy(), 1.0)


def test_ramp_weight_schedule():
    # warm-up 2 epochs, then linear up to 0.5 over 4 epochs, then flat
    got = [ramp_weight(e, 0.5, warmup=2, ramp=4) for e in range(9)]
    assert got == pytest.approx([0.0, 0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5])
    assert [ramp_weight(e, 0.3, warmup=1, ramp=0) for e in range(3)] == pytest.approx([0.0, 0.3, 0.3])
    assert [ramp_weight(e, 0.1, warmup=0, ramp=0) for e in range(2)] == pytest.approx([0.1, 0.1])
    assert ramp_weight(100, 0.0, warmup=0, ramp=5) == 0.0


# ------------------------------------------------------------------------------------------ metrics

@pytest.mark.parametrize("seed", range(4))
def test_war_uar_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 300)
    preds = np.where(rng.random(300) < 0.5, labels, rng.integers(0, 5, 300))
    preds[preds == 3] = 1  # class 3 is never predicted
    cm = confusion_matrix(labels, preds, 5)
    assert cm.sum() == 300 and cm[:, 3].sum() == 0
    assert war(cm) == pytest.approx(accuracy_score(labels, preds) * 100, abs=1e-9)
    assert uar(cm) == pytest.approx(balanced_accuracy_score(labels, preds) * 100, abs=1e-9)
    assert war(cm) != pytest.approx(uar(cm))  # imbalanced recalls: the two really differ


def test_uar_ignores_classes_absent_from_the_labels_like_sklearn():
    labels = np.array([0, 0, 0, 1, 1, 4])
    preds = np.array([0, 2, 0, 1, 3, 4])  # classes 2 and 3 are predicted but never true
    cm = confusion_matrix(labels, preds, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = balanced_accuracy_score(labels, preds) * 100
    assert uar(cm) == pytest.approx(expected) == pytest.approx(100 * (2 / 3 + 1 / 2 + 1) / 3)
    assert war(cm) == pytest.approx(accuracy_score(labels, preds) * 100)


def test_uar_over_all_classes_scores_absent_classes_as_zero():
    """The toy matrix of the issue: 66.67 over the classes present, 40.00 with the absent ones at 0."""
    labels, preds = np.array([0, 0, 0, 1, 1, 4]), np.array([0, 2, 0, 1, 3, 4])
    cm = confusion_matrix(labels, preds, 5)
    assert uar_all_classes(cm) == pytest.approx(100 * (2 / 3 + 1 / 2 + 0 + 0 + 1) / 5) == pytest.approx(43.333, abs=1e-3)
    full = confusion_matrix([0, 1, 1, 2], [0, 1, 0, 2], 3)
    assert uar_all_classes(full) == pytest.approx(uar(full))  # the same when every class occurs
    toy = confusion_matrix([0, 0, 1], [0, 1, 1], 3)
    assert (round(uar(toy), 2), round(uar_all_classes(toy), 2)) == (75.0, 50.0)


# ------------------------------------------------------------------------------------------ TSN sampling

def test_short_clips_repeat_their_last_frame():
    for train in (False, True):
        rng = np.random.default_rng(0)
        assert sample_indices(3, 8, train, rng).tolist() == [0, 1, 2, 2, 2, 2, 2, 2]
        assert sample_indices(1, 4, train, rng).tolist() == [0, 0, 0, 0]
        assert sample_indices(8, 8, train, rng).tolist() == list(range(8))


def test_eval_sampling_takes_the_middle_of_each_segment():
    assert sample_indices(32, 8, False).tolist() == [2, 6, 10, 14, 18, 22, 26, 30]
    # uneven segments: edges 0 2 5 7 10 12 15 17 20
    assert sample_indices(20, 8, False).tolist() == [1, 3, 6, 8, 11, 13, 16, 18]
    assert sample_indices(9, 2, False).tolist() == [2, 6]


def test_train_sampling_draws_one_frame_inside_each_segment():
    num_frames, segments = 37, 8
    edges = np.linspace(0, num_frames, segments + 1).astype(int)
    seen = set()
    for seed in range(300):
        idx = sample_indices(num_frames, segments, True, np.random.default_rng(seed))
        assert len(idx) == segments
        assert ((edges[:-1] <= idx) & (idx < edges[1:])).all(), idx
        seen.update(idx.tolist())
    assert seen == set(range(num_frames))  # random over the whole segment, not a fixed offset


def test_train_sampling_is_deterministic_for_a_seed():
    draw = lambda seed: sample_indices(100, 16, True, np.random.default_rng(seed)).tolist()  # noqa: E731
    assert draw(7) == draw(7)
    assert draw([0, 3, 5]) == draw([0, 3, 5])
    assert len({tuple(draw(s)) for s in range(10)}) > 1


# ------------------------------------------------------------------------------------------ EAA adapter

def test_residual_adapter_is_the_identity_at_init():
    torch.manual_seed(0)
    adapter = ExpressionAdapter(64, reduction=4)
    assert adapter.down.out_features == 16 and adapter.up.in_features == 16
    assert not adapter.up.weight.any() and not adapter.up.bias.any()
    x = torch.randn(10, 64)
    assert torch.equal(adapter(x), x)
    assert (x < 0).any()  # negative coordinates survive
    with torch.no_grad():
        adapter.up.weight.normal_()
    h = adapter.up(F.relu(adapter.down(x)))
    assert torch.allclose(adapter(x), x + h)
    assert not torch.allclose(adapter(x), x)
    half = ExpressionAdapter(64, reduction=4, scale=0.5)
    half.load_state_dict(adapter.state_dict())
    assert torch.allclose(half(x), x + 0.5 * h)


def test_replace_adapter_is_a_relu_output():
    torch.manual_seed(0)
    adapter = ExpressionAdapter(64, reduction=4, mode="replace")
    assert adapter.up.weight.any()  # not zero-initialised: would output nothing
    x = torch.randn(10, 64)
    out = adapter(x)
    assert torch.equal(out, F.relu(adapter.up(F.relu(adapter.down(x)))))
    assert (out >= 0).all() and (out == 0).any() and (out > 0).any()
    with pytest.raises(ValueError):
        ExpressionAdapter(64, mode="gated")


# ------------------------------------------------------------------------------------------ prompt learner

@pytest.mark.parametrize("class_specific", [True, False])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_prompt_learner(tiny_clip, position, class_specific):
    n_ctx, c = 4, len(CLASSES)
    torch.manual_seed(0)
    learner = PromptLearner(tiny_clip, CLASSES, n_ctx, class_specific, position)
    width = tiny_clip.model.token_embedding.weight.shape[1]
    assert learner.ctx.shape == ((c, n_ctx, width) if class_specific else (n_ctx, width))

    # where the context vectors and the class name sit in the token sequence
    emb = learner.embeddings()
    assert emb.shape == (c, tiny_clip.model.context_length, width)
    name_tokens = tiny_clip.model.token_embedding(tiny_clip.tokenizer(CLASSES)).detach()
    ctx = learner.ctx.detach() if class_specific else learner.ctx.detach().expand(c, -1, -1)
    half = n_ctx // 2
    for k, n in enumerate(learner.name_lens):
        name = name_tokens[k, 1 : 1 + n]
        assert torch.equal(emb[k, 0], learner.prefix[k, 0])  # SOS first
        if position == "end":
            assert torch.equal(emb[k, 1 : 1 + n_ctx], ctx[k]) and torch.equal(emb[k, 1 + n_ctx : 1 + n_ctx + n], name)
        elif position == "middle":
            assert torch.equal(emb[k, 1 : 1 + half], ctx[k, :half])
            assert torch.equal(emb[k, 1 + half : 1 + half + n], name)
            assert torch.equal(emb[k, 1 + half + n : 1 + n_ctx + n], ctx[k, half:])
        else:
            assert torch.equal(emb[k, 1 : 1 + n], name) and torch.equal(emb[k, 1 + n : 1 + n + n_ctx], ctx[k])
        # everything after the name and the context (".", EOS, padding) is unchanged
        assert torch.equal(emb[k, 1 + n_ctx + n :], learner.suffix[k, n:])

    t_soft = learner(tiny_clip.model)
    assert t_soft.shape == (c, tiny_clip.embed_dim)
    assert torch.allclose(t_soft.norm(dim=-1), torch.ones(c), atol=1e-5)
    assert torch.isfinite(t_soft).all()
    assert (t_soft @ t_soft.t() - torch.eye(c)).abs().max() > 1e-3  # the classes differ

    probe = torch.randn(t_soft.shape, generator=torch.Generator().manual_seed(1))
    (t_soft * probe).sum().backward()
    grad = learner.ctx.grad
    assert grad is not None and torch.isfinite(grad).all()
    if class_specific:
        assert (grad.flatten(1).norm(dim=1) > 0).all()  # every class's own context is reached
    else:
        assert grad.norm() > 0


@pytest.mark.parametrize("position", ["end", "front"])
def test_soft_prompts_in_front_of_the_descriptive_sentences(tiny_clip, position):
    """--soft-prompt-text descriptor: the reference's t_soft, "X X ... X <descriptive sentence>"."""
    n_ctx = 4
    cfg = ModelConfig(CLASSES, DESCRIPTIONS, num_frames=4, contexts_number=n_ctx, class_token_position=position,
                      soft_prompt_text="descriptor")
    learner = CAERModel(tiny_clip, cfg).prompt_learner
    placeholder = " ".join(["X"] * n_ctx)
    expected = tiny_clip.tokenizer([f"{placeholder} {d}" for d in DESCRIPTIONS])
    assert torch.equal(learner.tokens, expected)  # the sentence, not the class name, follows the context
    sentence = tiny_clip.model.token_embedding(tiny_clip.tokenizer(DESCRIPTIONS)).detach()
    emb = learner.embeddings()
    for k, n in enumerate(learner.name_lens):
        assert n == len(tiny_clip.tokenizer.encode(DESCRIPTIONS[k]))
        start = 1 + n_ctx if position == "end" else 1
        assert torch.equal(emb[k, start : start + n], sentence[k, 1 : 1 + n])
    by_name = CAERModel(tiny_clip, dataclasses.replace(cfg, soft_prompt_text="name")).prompt_learner
    assert not torch.equal(by_name.tokens, learner.tokens)


def test_a_prompt_text_too_long_for_the_text_encoder_is_refused(tiny_clip):
    long = ["a student " * 40] + DESCRIPTIONS[1:]
    cfg = ModelConfig(CLASSES, long, num_frames=4, soft_prompt_text="descriptor")
    with pytest.raises(ValueError, match="class 1's prompt text is too long"):
        CAERModel(tiny_clip, cfg)


def test_text_encoding_cut_after_end_of_text_equals_open_clip_encode_text():
    """encode_text_embeddings drops the padding after the last EOT token; the result must not change."""
    from caer.model.encoder import encode_text_embeddings

    clip = load_backbone("caer-tiny", "random")
    tokens = clip.tokenizer(["a student yawning at the desk", "a confused face", "x"])
    with torch.no_grad():
        expected = clip.model.encode_text(tokens)
        got = encode_text_embeddings(clip.model, clip.model.token_embedding(tokens), tokens)
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # the cut really happens
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["caer", "reference"])
def test_heads_that_do_not_divide_the_width_are_one_clear_error_for_both_temporal_blocks(tiny_clip, block):
    width = tiny_clip.embed_dim
    heads = next(h for h in range(3, width) if width % h)
    with pytest.raises(ValueError, match=f"--temporal-heads {heads} does not divide the feature width {width}"):
        CAERModel(tiny_clip, ModelConfig(CLASSES, DESCRIPTIONS, temporal_heads=heads, temporal_block=block))
