"""The LM loss without full logits equals the loss with them."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tests.worker.helpers import tiny_lora_model
from worker.training.example import IGNORE_INDEX
from worker.training.loss import (
    SMALL_LOGITS_BYTES,
    _logits_fit,
    chunked_lm_loss,
    chunked_lm_loss_sum,
    head_linear,
    head_vocab,
    liger_pays,
    pick_loss,
)


def test_chunked_loss_matches_full_logits() -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    targets[::5] = IGNORE_INDEX
    full = nn.functional.cross_entropy(head(hidden), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    full_grads = torch.autograd.grad(full, [hidden, head.weight])
    chunked = chunked_lm_loss_sum(head, hidden, targets, chunk_rows=4)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight])
    torch.testing.assert_close(chunked, full)
    for got, want in zip(chunked_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_small_logits_are_kept_rather_than_recomputed_and_give_the_same() -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    calls: list[int] = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    chunked = chunked_lm_loss_sum(head, hidden, targets, chunk_rows=8)
    (want,) = torch.autograd.grad(chunked, hidden)
    assert calls == [8, 8, 7, 7, 8, 8]  # each chunk, then recomputed in the backward (last chunk first)
    calls.clear()
    whole = chunked_lm_loss_sum(head, hidden, targets)  # 23 x 50 fp32 logits: kept, one pass
    (got,) = torch.autograd.grad(whole, hidden)
    assert calls == [23]
    torch.testing.assert_close(whole, chunked)
    torch.testing.assert_close(got, want)


def test_head_linear_finds_the_trained_copy_of_a_saved_head() -> None:
    model = tiny_lora_model(modules_to_save=["lm_head"])
    head = model.get_base_model().get_output_embeddings()
    linear = head_linear(head)
    assert linear is not None and linear.weight.requires_grad  # the trained copy, not the frozen original
    with model.disable_adapter():
        frozen = head_linear(head)
        assert frozen is not None and not frozen.weight.requires_grad
    assert head_linear(nn.Linear(4, 4)) is not None


def test_a_lora_wrapped_head_has_no_plain_linear_to_fuse() -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(4, 8)), LoraConfig(r=2, target_modules=["0"]))
    head = model.base_model.model[0]
    assert head_linear(head) is None
    assert pick_loss(torch.device("cpu"), head, captured=False, chunk_rows=4)[0] == "chunked"


def test_chunked_correct_count_equals_the_argmax_of_full_logits() -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    predicted = head(hidden).argmax(-1)
    targets = torch.randint(0, 50, (23,))
    targets[::2] = predicted[::2]  # about half right by construction
    targets[::5] = IGNORE_INDEX  # ignored rows never count, even where the argmax would match
    want = int(((predicted == targets) & (targets != IGNORE_INDEX)).sum())
    assert 5 <= want < 23
    for chunk_rows in (4, 7, 4096):  # checkpointed chunks, and all logits kept in one pass
        sums = chunked_lm_loss(head, hidden, targets, chunk_rows=chunk_rows)
        assert sums.correct is not None and sums.correct.dtype == torch.long and int(sums.correct) == want
        sums.loss_sum.backward()  # the count rides along without disturbing the backward
    empty = chunked_lm_loss(head, hidden[:0], targets[:0])
    assert empty.correct is not None and int(empty.correct) == 0


def test_a_tied_heads_trainable_copy_is_sized_by_its_weight_not_its_out_features(tiny_model_dir: Path) -> None:
    # The seed's defaults train lm_head and embed_tokens; on a tied model PEFT's copy of the head is
    # nn.Linear(vocab, hidden) sharing the embedding's (vocab, hidden) weight: out_features is the hidden size.
    from shared.config import TrainConfig
    from worker.training.model_loading import load_base_model, prepare_model

    config = TrainConfig(model_name=str(tiny_model_dir))
    base, _, _ = load_base_model(config, torch.device("cpu"), lambda event, message: None)
    vocab, hidden = base.get_input_embeddings().weight.shape
    model = prepare_model(base, config, None)
    head = model.get_output_embeddings()
    linear = head_linear(head)
    assert linear is not None and linear.out_features == hidden != vocab  # what PEFT builds, misleadingly
    assert head_vocab(head) == vocab
    # Rows whose logits fit by the hidden size but not by the vocabulary are recomputed in chunks, not kept.
    rows = SMALL_LOGITS_BYTES // (4 * vocab) + 1
    assert rows * hidden * 4 <= SMALL_LOGITS_BYTES
    assert not _logits_fit(head, rows, chunk_rows=rows)
    assert _logits_fit(head, rows - 1, chunk_rows=rows)


def test_liger_is_used_only_where_the_vocabulary_is_small_against_the_hidden_size() -> None:
    """Liger re-reads the head about V/H times a step: a 0.5B model's 151,936 x 896 head takes the chunked loss."""
    assert not liger_pays(nn.Linear(896, 151_936, bias=False, device="meta"))  # Qwen2.5-0.5B: V/H ~ 170
    assert liger_pays(nn.Linear(3584, 152_064, bias=False, device="meta"))  # Qwen2.5-7B: V/H ~ 42
    lora_head = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    assert not liger_pays(lora_head.base_model.model[0])  # no plain linear to fuse
    name, _ = pick_loss(
        torch.device("cuda"), nn.Linear(896, 151_936, bias=False, device="meta"), captured=False, chunk_rows=4096
    )
    assert name == "chunked"
