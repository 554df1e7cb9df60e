"""The model's answers in the training stream and in the metrics (issue 13, part 7)."""

from __future__ import annotations

import pytest
import torch

from sctranscoder.core.evaluation import answer_metrics, prediction_agreement
from sctranscoder.core.model import greedy_answers, greedy_tokens
from sctranscoder.core.prompts import prompt_batches, with_answers
from sctranscoder.core.training import TrainingConfig, harvest

SENTENCES = [
    ["CD3D", "CD3E", "IL7R", "LTB", "MALAT1"],
    ["LYZ", "S100A9", "CST3", "FCN1"],
    ["MS4A1", "CD79A", "CD74"],
    ["NKG7", "GNLY", "GZMB", "PRF1", "CCL5", "CST7"],
]


def test_answer_tokens_are_the_greedy_answer(model):
    batch = model.tokenize(SENTENCES)
    tokens = greedy_tokens(model, batch, max_new_tokens=24)
    assert tokens == model.answer_tokens(SENTENCES, batch_size=3)
    eos = model.tokenizer.eos_token_id
    for said, answer in zip(tokens, greedy_answers(model, batch, max_new_tokens=24), strict=True):
        assert said[-1] == eos  # the embedded model ends its answers with EOS
        assert model.tokenizer.decode(said[:-1]).strip() == answer


def test_with_answers_feeds_all_but_the_last_token_and_marks_the_positions():
    class Batch:
        input_ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 1]])
        lengths = torch.tensor([3, 2])

    ids, mask, scored = with_answers(Batch, [[20, 21, 0], [30]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7, 20, 21], [8, 9, 1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # position p predicts token p + 1: 7 -> 20, 20 -> 21, 21 -> 0 (EOS); 9 -> 30
    assert scored.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    _, weighted, _ = with_answers(Batch, [[20, 21, 0], [30]], pad_id=1, weight=3)
    assert weighted.tolist() == [[1, 1, 3, 3, 3], [1, 3, 0, 0, 0]]


def test_harvest_takes_a_token_as_many_times_as_its_mask_says(model):
    batch = model.tokenize(SENTENCES[:2])
    said = model.answer_tokens(SENTENCES[:2])
    ids, once, _ = with_answers(batch, said, model.tokenizer.pad_token_id)
    _, thrice, scored = with_answers(batch, said, model.tokenizer.pad_token_id, weight=3)
    ((x1, _y1),) = harvest(model.model, [(ids, once)], [1], device=torch.device("cpu"))
    ((x3, _y3),) = harvest(model.model, [(ids, thrice)], [1], device=torch.device("cpu"))
    n_answer = int(scored.sum())
    assert x3[1].shape[0] == x1[1].shape[0] + 2 * n_answer
    # the same rows, the answer positions three times over (the model saw a 0/1 mask)
    assert torch.equal(torch.unique(x3[1], dim=0), torch.unique(x1[1], dim=0))


def test_prompt_stream_with_answers_appends_each_cells_answer(model):
    said = model.answer_tokens(SENTENCES)
    answers = dict(enumerate(said))
    cells = torch.arange(len(SENTENCES)).numpy()
    plain = list(prompt_batches(model, SENTENCES, cells, batch_size=4, seed=None, repeat=False))
    fed = list(
        prompt_batches(
            model, SENTENCES, cells, batch_size=4, seed=None, repeat=False, answers=answers
        )
    )
    (ids0, mask0), (ids1, mask1) = plain[0], fed[0]
    lengths = mask0.sum(1)
    for i, a in enumerate(said):
        L = int(lengths[i])
        assert ids1[i, :L].tolist() == ids0[i, :L].tolist()
        assert ids1[i, L : L + len(a) - 1].tolist() == a[:-1]
        assert int(mask1[i].sum()) == L + len(a) - 1


def test_answer_metrics_of_no_replacement_and_of_a_broken_one(model, trained_base):
    said = model.answer_tokens(SENTENCES)
    same = answer_metrics(model, {}, SENTENCES, said)
    assert same["answer_agreement"] == 1.0
    assert same["answer_token_agreement"] == 1.0
    assert same["answer_kl_replaced"] == pytest.approx(0.0, abs=1e-6)
    assert same["answer_ce_replaced"] == pytest.approx(same["answer_ce_original"])
    assert same["answer_n_tokens"] == sum(len(a) for a in said)
    # the trained transcoders: agreement at every answer position = greedy agreement
    tset = __import__("sctranscoder").get.transcoders(trained_base)
    tcs = dict(tset.items())
    got = answer_metrics(model, tcs, SENTENCES, said, batch_size=3)
    assert got["answer_agreement"] == prediction_agreement(model, tcs, SENTENCES)
    assert got["answer_kl_replaced"] > 0


def test_records_written_before_answer_tokens_read_as_trained_without():
    old = {k: v for k, v in TrainingConfig().to_dict().items() if not k.startswith("answer_")}
    assert TrainingConfig.from_record(old).answer_tokens is False
    assert TrainingConfig.from_dict(old).answer_tokens is True  # a new config: the default
    cfg = TrainingConfig(answer_tokens=True, answer_weight=3)
    assert TrainingConfig.from_record(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="answer_weight"):
        TrainingConfig(answer_weight=0)
