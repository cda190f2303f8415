"""Loading encoder weights: open_clip state dicts, TorchScript archives (OpenAI's .pt format), random init."""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch

from caer.model.encoder import load_backbone, save_random_weights
from conftest import MODEL


def _reference(seed: int):
    torch.manual_seed(seed)
    return open_clip.create_model(MODEL, pretrained=None).eval()


def test_state_dict_file_loads_the_same_weights(tmp_path):
    path = save_random_weights(MODEL, tmp_path / "w.pt", seed=3)
    clip = load_backbone(MODEL, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clip.model.encode_image(x), _reference(3).encode_image(x))
    assert clip.weights.startswith("sha256:")


class _Holder(torch.nn.Module):
    def forward(self, x):
        return x


def _torchscript_archive(state_dict: dict, path) -> None:
    """A TorchScript archive holding ``state_dict`` under the same names, as OpenAI's own .pt files do."""
    root = _Holder()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    root.register_buffer("input_resolution", torch.tensor(32))  # OpenAI archives carry these three too
    root.register_buffer("context_length", torch.tensor(77))
    root.register_buffer("vocab_size", torch.tensor(49408))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but OpenAI's files are TorchScript
        torch.jit.save(torch.jit.script(root), path)


def test_torchscript_archive_loads_like_an_openai_pt_file(tmp_path):
    reference = _reference(5)
    _torchscript_archive(reference.state_dict(), tmp_path / "openai-style.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that it dispatches the archive to torch.jit.load
        clip = load_backbone(MODEL, str(tmp_path / "openai-style.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clip.model.encode_image(x), reference.encode_image(x))


def test_unknown_tag_or_missing_file_is_a_clear_error():
    with pytest.raises(ValueError, match="not a file and not an open_clip tag"):
        load_backbone(MODEL, "no-such-weights")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_backbone("ViT-Nope", "random")
