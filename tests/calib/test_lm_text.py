"""The lm-adapter's text: an LM's samples read by the teacher's tokenizer, lined up token by token."""

from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizerFast

from calib.config import CalibConfig, GeneratorConfig, ModelSource, RandomModel, TaskConfig
from calib.generators.lm_adapter import LMAdapterGenerator, aligned_features
from calib.lm_text import align_tokens, sample_sequences, split_pair, write_text
from calib.models import embedding_table, load_backbone
from calib.zsaq import build_generator
from tests.models import SPECIAL_TOKENS, tiny_teacher

WORDS = [f"word{i}" for i in range(60)]  # more than the LM sampler's top-k of 50


def test_each_teacher_token_takes_the_lm_token_under_its_first_character():
    # text "unhappy cats": the LM reads "un|happy| cats", the teacher "[CLS] unh|##appy cat|##s [SEP] [PAD]"
    lm_offsets = [(0, 2), (2, 7), (7, 12)]
    teacher_offsets = [(0, 0), (0, 3), (3, 7), (8, 11), (11, 12), (0, 0), (0, 0)]
    assert align_tokens(teacher_offsets, lm_offsets) == [0, 0, 1, 2, 2, 2, 2]


def _word_tokenizer(words: list[str]) -> BertTokenizerFast:
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS + words)})


def test_text_of_another_vocabulary_is_framed_by_the_teacher_and_aligned_word_for_word():
    lm_tokenizer = _word_tokenizer(WORDS)
    teacher_tokenizer = _word_tokenizer(list(reversed(WORDS)))  # same words, other ids
    spec = RandomModel(family="gpt2", vocab_size=len(SPECIAL_TOKENS) + len(WORDS))
    lm = load_backbone(ModelSource(random=spec), TaskConfig(kind="causal-lm"))
    text = write_text(lm, 6, 12, 4, seed=0, tokenizers=(lm_tokenizer, teacher_tokenizer))
    assert text.teacher_ids.shape == (6, 12) and text.alignment.shape == (6, 12)
    for ids, mask, lm_ids, alignment in zip(text.teacher_ids, text.attention_mask, text.lm_ids, text.alignment):
        length = int(mask.sum())
        tokens = teacher_tokenizer.convert_ids_to_tokens(ids[:length].tolist())
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and length >= 2
        lm_tokens = lm_tokenizer.convert_ids_to_tokens(lm_ids.tolist())
        for position in range(1, length - 1):  # every word sits on the same word in the LM's row
            assert lm_tokens[alignment[position]] == tokens[position]


def test_a_text_splits_into_a_pair_at_the_space_nearest_its_middle():
    assert split_pair("one two three four") == ("one two", "three four", 8)
    assert split_pair("abcdef") == ("abc", "def", 3)


def test_the_share_asked_is_read_as_sentence_pairs_still_aligned_word_for_word():
    lm_tokenizer = _word_tokenizer(WORDS)
    teacher_tokenizer = _word_tokenizer(list(reversed(WORDS)))
    spec = RandomModel(family="gpt2", vocab_size=len(SPECIAL_TOKENS) + len(WORDS))
    lm = load_backbone(ModelSource(random=spec), TaskConfig(kind="causal-lm"))
    text = write_text(lm, 6, 12, 6, seed=0, tokenizers=(lm_tokenizer, teacher_tokenizer), pairs=0.5)
    separators = []
    for ids, mask, lm_ids, alignment in zip(text.teacher_ids, text.attention_mask, text.lm_ids, text.alignment):
        tokens = teacher_tokenizer.convert_ids_to_tokens(ids[: int(mask.sum())].tolist())
        separators.append(tokens.count("[SEP]"))
        lm_tokens = lm_tokenizer.convert_ids_to_tokens(lm_ids.tolist())
        for position, token in enumerate(tokens):  # both sentences' words sit on their words in the LM's row
            if token not in SPECIAL_TOKENS:
                assert lm_tokens[alignment[position]] == token
    assert separators == [2, 2, 2, 1, 1, 1]  # [CLS] a [SEP] b [SEP] for the first half, [CLS] text [SEP] after


def test_the_random_share_of_the_pool_is_uniform_teacher_tokens_the_lm_cannot_write():
    lm_tokenizer = _word_tokenizer(WORDS[:30])  # the teacher reads twice the LM's words
    teacher_tokenizer = _word_tokenizer(WORDS)
    spec = RandomModel(family="gpt2", vocab_size=len(SPECIAL_TOKENS) + 30)
    lm = load_backbone(ModelSource(random=spec), TaskConfig(kind="causal-lm"))
    text = write_text(lm, 6, 12, 8, seed=0, tokenizers=(lm_tokenizer, teacher_tokenizer), random_share=0.5)
    unwritable = set(WORDS[30:])
    seen = [
        unwritable & set(teacher_tokenizer.convert_ids_to_tokens(ids[: int(mask.sum())].tolist()))
        for ids, mask in zip(text.teacher_ids, text.attention_mask)
    ]
    assert not any(seen[:3]) and all(seen[3:])


def test_a_decoders_random_share_leaves_the_lms_top_k():
    teacher = tiny_teacher("gpt2")
    text = write_text(teacher.backbone, 8, 16, 16, seed=1, random_share=0.5)
    with torch.no_grad():
        top = teacher.backbone(input_ids=text.lm_ids).logits[:, :-1].topk(50, dim=-1).indices
    in_top_k = (top == text.lm_ids[:, 1:, None]).any(-1).float().mean(1)
    assert (in_top_k[:4] == 1).all() and (in_top_k[4:] < 0.5).all()  # sampled top-k rows, then uniform ones


def test_greedy_tokens_follow_the_lms_top_1_after_the_random_start_then_sampling_resumes():
    teacher = tiny_teacher("gpt2")
    ids = sample_sequences(teacher.backbone, 8, 16, seed=3, greedy_tokens=4)
    with torch.no_grad():
        top_1 = teacher.backbone(input_ids=ids).logits.argmax(-1)
    assert torch.equal(ids[:, 1:5], top_1[:, :4])  # positions 1-4: the LM's most likely next token
    assert not torch.equal(ids[:, 5:], top_1[:, 4:-1])  # then sampled, not greedy
    assert torch.equal(sample_sequences(teacher.backbone, 8, 16, seed=3)[:, 0], ids[:, 0])  # the same random starts


def test_a_decoder_generating_for_itself_keeps_its_ids_and_varies_lengths():
    teacher = tiny_teacher("gpt2")
    text = write_text(teacher.backbone, 8, 16, 5, seed=1)
    lengths = text.attention_mask.sum(1)
    assert ((lengths >= 5) & (lengths <= 16)).all() and len(set(lengths.tolist())) > 1
    assert torch.equal(text.teacher_ids, text.lm_ids * text.attention_mask)
    assert torch.equal(text.alignment[0], torch.arange(16))


def test_the_generator_starts_from_the_texts_own_embeddings():
    teacher = tiny_teacher("gpt2")
    text = write_text(teacher.backbone, 8, 16, 5, seed=1)
    with torch.no_grad():
        features = aligned_features(teacher.backbone, text.lm_ids, text.lm_mask, text.alignment)
    table = embedding_table(teacher)
    generator = LMAdapterGenerator(text, features, table, noise_dim=8, hidden=32, radius=0.25)
    rng = torch.Generator().manual_seed(0)
    rows = torch.randint(8, (4,), generator=torch.Generator().manual_seed(0))
    batch = generator.sample(4, rng)
    mask = text.attention_mask[rows]
    assert torch.equal(batch.attention_mask, mask)
    expected = table[text.teacher_ids[rows]] * mask.unsqueeze(-1)
    gap = (batch.inputs_embeds - expected).norm(dim=-1)[mask.bool()]
    assert gap.max() < 0.05 * table.norm(dim=-1).mean()  # a small residual, not a new embedding


@pytest.mark.parametrize("pool", [8, 24])
def test_the_pool_holds_as_many_different_sequences_as_asked(pool):
    """``calib.generator.pool``: the LM writes that many sequences once; the game's batches come from them."""
    calib = CalibConfig(samples=8, seq_len=16, generator=GeneratorConfig(kind="lm-adapter", pool=pool, min_len=4))
    generator = build_generator(calib, tiny_teacher("gpt2"), ())
    assert len(generator.base) == pool
    assert len({tuple(row.tolist()) for row in generator.lm_ids}) == pool
