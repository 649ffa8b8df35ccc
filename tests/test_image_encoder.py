"""The multimodal adapter (adapter/image_encoder.py + the image token in adapter/adapter.py): a tiny random
CLIP vision tower of ViT-L/14's architecture, saved with `save_pretrained` and loaded by path."""

from __future__ import annotations

import io
import shutil

import pytest
import torch

from adapter.adapter import AdaptedLlama, AdapterConfig, AdaptionPrompts
from adapter.adapter_file import AdapterFileError, load_adapter, save_adapter
from adapter.image_encoder import (
    ImageEncoder,
    ImageError,
    VisionConfig,
    decode_image,
    features_for,
    save_random_encoder,
)


def save_tiny_encoder(folder, seed: int = 0):
    """A random CLIP vision tower (3 blocks, width 32) with CLIP's preprocessing, in transformers' format."""
    return save_random_encoder(folder, seed=seed)


def png(color, size=(40, 30), pattern: int = 0) -> bytes:
    """A small PNG: a solid colour with a stripe at row `pattern` (distinct images, distinct pixels)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, color)
    ImageDraw.Draw(img).rectangle([0, pattern, size[0], pattern + 4], fill=(255 - color[0], 20, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return ImageEncoder(VisionConfig(encoder=str(encoder_dir), feature_layers=(1, 3), proj_hidden=16))


def _multimodal(base, encoder, adapter_len=4, layers=2):
    torch.manual_seed(1)
    return AdaptionPrompts(
        base.args, AdapterConfig(adapter_len, layers), projection=encoder.projection(16, base.args.dim)
    )


def test_preprocessing_is_clips_own_and_features_are_multi_scale(encoder):
    from PIL import Image

    px = encoder.pixels([decode_image(png((10, 200, 30), size=(64, 48)))])
    assert px.shape == (1, 3, 32, 32)  # shortest edge resized to 32, then center-cropped
    # A uniform image normalises to (value/255 - CLIP mean) / CLIP std per channel.
    flat = encoder.pixels([Image.new("RGB", (50, 50), (255, 0, 128))])[0].mean(dim=(1, 2))
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(flat, (torch.tensor([255, 0, 128]) / 255 - mean) / std, atol=0.02)
    feats = encoder.features([decode_image(png((10, 200, 30)))])
    assert feats.shape == (1, 2 * 32) and encoder.out_features == 64


def test_zero_gates_mean_the_image_changes_nothing(tiny_model, encoder):
    prompts = _multimodal(tiny_model, encoder)
    model = AdaptedLlama(tiny_model, prompts)
    tokens = torch.randint(3, 500, (2, 12))
    feats, present = features_for(encoder, [png((0, 0, 255)), png((250, 250, 0), pattern=20)])
    with torch.no_grad():
        with_image = model(tokens, image_features=feats, image_present=present)
        plain = tiny_model(tokens)
    assert torch.equal(with_image, plain)


def test_after_a_few_steps_two_images_give_different_logits_and_only_adapter_parts_learn(tiny_model, encoder):
    prompts = _multimodal(tiny_model, encoder)
    model = AdaptedLlama(tiny_model, prompts)
    images = [png((0, 0, 255)), png((250, 250, 0), pattern=20)]
    feats, present = features_for(encoder, images)
    tokens = torch.randint(3, 500, (2, 10))
    labels = tokens.clone()
    labels[:, :4] = -100
    opt = torch.optim.AdamW(prompts.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        loss, _ = model.loss(tokens, labels, image_features=feats, image_present=present)
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad == {
                "adapter.prompt",
                "adapter.gate",
                "adapter.projection.fc1.weight",
                "adapter.projection.fc1.bias",
                "adapter.projection.fc2.weight",
                "adapter.projection.fc2.bias",
                "adapter.projection.norm.weight",
                "adapter.projection.norm.bias",
            }
            assert all(p.grad is None for p in tiny_model.parameters())
        if step == 1:  # once the gates have left zero, the image path gets gradient too
            assert prompts.projection.fc1.weight.grad.abs().sum() > 0
        opt.step()
    same_text = tokens[:1].expand(2, -1)
    with torch.no_grad():
        logits = model(same_text, image_features=feats, image_present=present)
        no_image = model(same_text, image_features=feats, image_present=torch.tensor([False, False]))
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)
    # A row without an image gets the plain prompt: it matches the text-only path of the same adapter.
    with torch.no_grad():
        text_only = tiny_model(same_text[:1], prefixes=prompts.prefixes(tiny_model))
    assert torch.allclose(no_image[0], text_only[0], atol=1e-5)


def test_multimodal_file_round_trip_and_refusals(tiny_model, encoder, encoder_dir, tmp_path):
    prompts = _multimodal(tiny_model, encoder)
    with torch.no_grad():
        prompts.gate.normal_()
        prompts.projection.fc2.weight.normal_()
    path = save_adapter(prompts, tiny_model.args, tmp_path / "mm")
    back = load_adapter(path, tiny_model.args, encoder=encoder.identity)
    for (n, a), (m, b) in zip(prompts.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    assert back.projection.encoder == encoder.identity

    other_dir = save_tiny_encoder(tmp_path / "other-clip", seed=5)
    other = ImageEncoder(VisionConfig(encoder=str(other_dir), feature_layers=(1, 3)))
    with pytest.raises(AdapterFileError, match="trained with image encoder 'tiny-clip'.*not 'other-clip'"):
        load_adapter(path, tiny_model.args, encoder=other.identity)
    # Same weights under another folder name: the same encoder (identity is the weights' hash).
    moved = shutil.copytree(encoder_dir, tmp_path / "moved")
    assert load_adapter(
        path, tiny_model.args, encoder=ImageEncoder(VisionConfig(encoder=str(moved), feature_layers=(1, 3))).identity
    )
    # Other depths change what the projection reads: refused.
    with pytest.raises(AdapterFileError, match="CLS at depths \\[1, 3\\].*CLS at depths \\[2, 3\\]"):
        load_adapter(
            path,
            tiny_model.args,
            encoder=ImageEncoder(VisionConfig(encoder=str(encoder_dir), feature_layers=(2, 3))).identity,
        )
    text_only = save_adapter(AdaptionPrompts(tiny_model.args, AdapterConfig(4, 2)), tiny_model.args, tmp_path / "t")
    with pytest.raises(AdapterFileError, match="a text-only adapter .* cannot take images"):
        load_adapter(text_only, tiny_model.args, encoder=encoder.identity)
    assert load_adapter(text_only, tiny_model.args).projection is None
    with pytest.raises(ValueError, match="text-only adapter"):
        load_adapter(text_only, tiny_model.args).image_tokens(torch.zeros(1, 64))


def test_bad_images_and_encoder_folders_are_refused_by_name(encoder_dir, tmp_path):
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(b"not an image at all")
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(png((1, 2, 3))[:60])  # truncated PNG
    with pytest.raises(ImageError, match="empty image"):
        decode_image(b"")
    with pytest.raises(ValueError, match="reach past the encoder's 3 layers"):
        ImageEncoder(VisionConfig(encoder=str(encoder_dir), feature_layers=(2, 4)))
    bare = shutil.copytree(encoder_dir, tmp_path / "bare")
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
        ImageEncoder(VisionConfig(encoder=str(bare)))
