"""Class embeddings: the three providers and their bad inputs."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastseg.data.shapes import CLASS_NAMES, SEEN_CLASSES
from fastseg.models.class_embeddings import PADING_TEMPLATES, attribute_embeddings, class_embeddings


def test_attributes_deterministic_normalised_and_neighbours():
    a = class_embeddings("attributes", CLASS_NAMES)
    b = attribute_embeddings(list(CLASS_NAMES))
    assert a.shape[0] == len(CLASS_NAMES) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(len(CLASS_NAMES)))
    sim = a @ a.t()
    seen = list(SEEN_CLASSES)

    def nearest_seen(name):
        i = CLASS_NAMES.index(name)
        return CLASS_NAMES[seen[int(sim[i, seen].argmax())]]

    # The default unseen classes have the seen neighbours they stretch from.
    assert nearest_seen("ellipse") == "circle"
    assert nearest_seen("diamond") == "square"
    # Order follows the request.
    torch.testing.assert_close(class_embeddings("attributes", ["diamond", "sky"]), a[[11, 0]])


def test_attributes_unknown_class_and_bad_source():
    with pytest.raises(ValueError, match="no attributes for \\['hexagon'\\]"):
        class_embeddings("attributes", ["circle", "hexagon"])
    with pytest.raises(ValueError, match="unknown class embedding source"):
        class_embeddings("word2vec", ["circle"])
    with pytest.raises(ValueError, match="duplicates"):
        class_embeddings("attributes", ["circle", "circle"])
    with pytest.raises(ValueError, match="expected"):
        class_embeddings("attributes", ["circle"], expected_dim=3)


def test_file_provider_safetensors_npz_and_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    table = {n: torch.randn(7, generator=g) for n in ["cat", "dog", "cow"]}
    st = tmp_path / "emb.safetensors"
    save_file(table, str(st))
    out = class_embeddings(f"file:{st}", ["cow", "cat"], expected_dim=7)
    torch.testing.assert_close(out, torch.stack([table["cow"], table["cat"]]))
    npz = tmp_path / "emb.npz"
    np.savez(npz, **{k: v.numpy() for k, v in table.items()})
    torch.testing.assert_close(class_embeddings(f"file:{npz}", ["dog"]), table["dog"][None])
    with pytest.raises(ValueError, match="no entry for class\\(es\\) \\['horse'\\]"):
        class_embeddings(f"file:{st}", ["cat", "horse"])
    with pytest.raises(ValueError, match="7-dimensional, but 300 are expected"):
        class_embeddings(f"file:{st}", ["cat"], expected_dim=300)
    ragged = tmp_path / "ragged.safetensors"
    save_file({"cat": torch.zeros(3), "dog": torch.zeros(4)}, str(ragged))
    with pytest.raises(ValueError, match="different widths"):
        class_embeddings(f"file:{ragged}", ["cat", "dog"])
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="plain array"):
        class_embeddings(f"file:{plain}", ["cat"])
    with pytest.raises(FileNotFoundError):
        class_embeddings(f"file:{tmp_path / 'missing.safetensors'}", ["cat"])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        class_embeddings(f"file:{corrupt}", ["cat"])


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    (d / "tiny.json").write_text(json.dumps(TINY_CLIP))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "tiny.safetensors"))
    return model, open_clip.SimpleTokenizer(context_length=77), d


def test_clip_provider_matches_template_ensemble(tiny_clip):
    model, tok, d = tiny_clip
    names = ["circle", "grass, lawn"]
    out = class_embeddings(f"clip:{d / 'tiny.json'}@{d / 'tiny.safetensors'}", names, expected_dim=16)
    assert out.shape == (2, 16)
    with torch.no_grad():
        for row, name in zip(out, names):
            # Plain recomputation: one text at a time, every part of the ", "-split name with every template.
            feats = []
            for template in PADING_TEMPLATES:
                for part in name.split(", "):
                    f = model.encode_text(tok([template.format(part)]))[0]
                    feats.append(f / f.norm())
            mean = torch.stack(feats).mean(0)
            torch.testing.assert_close(row, mean / mean.norm(), atol=1e-5, rtol=1e-5)
    assert len(PADING_TEMPLATES) == 8


def test_clip_provider_bad_inputs(tiny_clip, tmp_path):
    model, _, d = tiny_clip
    with pytest.raises(FileNotFoundError, match="never downloads"):
        class_embeddings(f"clip:{d / 'tiny.json'}@{tmp_path / 'none.safetensors'}", ["circle"])
    partial = tmp_path / "partial.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("token_embedding")}, str(partial)
    )
    with pytest.raises(ValueError, match="lacks text-tower weights"):
        class_embeddings(f"clip:{d / 'tiny.json'}@{partial}", ["circle"])
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        class_embeddings(f"clip:NoSuchArch@{d / 'tiny.safetensors'}", ["circle"])
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "width": 64}}))
    with pytest.raises(ValueError, match="does not fit"):
        class_embeddings(f"clip:{wider}@{d / 'tiny.safetensors'}", ["circle"])


def test_random_placeholder_is_deterministic_per_name():
    a = class_embeddings("random:8", ["x", "y"])
    b = class_embeddings("random:8", ["y", "x"])
    torch.testing.assert_close(a, b[[1, 0]])
    assert a.shape == (2, 8) and not torch.allclose(a[0], a[1])
    with pytest.raises(ValueError, match="width"):
        class_embeddings("random:abc", ["x"])
