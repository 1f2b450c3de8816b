"""The generator: differentiable through both models, ascent raises the discrepancy, the game is seeded."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from calib.config import (
    CalibConfig,
    GeneratorConfig,
    PriorConfig,
    QuantConfig,
    SamSgaConfig,
    SharpnessConfig,
    WeightQuant,
)
from calib.errors import ConfigError
from calib.generators.soft_tokens import SoftTokenGenerator
from calib.inputs import Batch, random_token_source
from calib.learn import sample_losses
from calib.models import embedding_table
from calib.sam_sga import SamSga
from calib.selection import BestStudent
from calib.student import build_student, init_ranges
from calib.zsaq import anchor_source, build_generator, generated_set
from tests.models import tiny_teacher

W4 = QuantConfig(weights=WeightQuant(bits=4, granularity="per-group", group_size=32))


def _game(
    family="bert", kind="soft-tokens", sharpness=False, adversarial=True, seed=0, rounds=4, select_every=0,
    schedule="constant", radius=0.05, choose=0.0,
):  # fmt: skip
    teacher = tiny_teacher(family)
    calib = CalibConfig(
        samples=16, seq_len=16, batch_size=8, seed=seed,
        generator=GeneratorConfig(kind=kind, batch_size=4, min_len=4, lr=1e-2, radius=radius, choose=choose),
        sam_sga=SamSgaConfig(rounds=rounds, adversarial=adversarial, checkpoint_every=2, select_every=select_every,
                             select_samples=6, schedule=schedule),
        sharpness=SharpnessConfig(enabled=sharpness),
        priors=PriorConfig(embedding_stats=0.0),  # the pure game: no plausibility terms
    )  # fmt: skip
    rng = torch.Generator().manual_seed(seed)
    generator = build_generator(calib, teacher, ())
    student = build_student(teacher, W4)
    init_ranges(student, W4, generated_set(generator, 16, 8, rng).batches(8))
    return SamSga(teacher, student, generator, calib, W4.learn, rng), calib


@pytest.mark.parametrize(("family", "kind"), [("bert", "soft-tokens"), ("gpt2", "lm-adapter")])
def test_generator_gradient_reaches_its_parameters_through_both_models(family, kind):
    game, _ = _game(family, kind)
    batch = game.generator.sample(4, torch.Generator().manual_seed(1))
    teacher_out = batch.run(game.teacher)
    student_out = batch.run(game.student)
    params = [p for p in game.generator.parameters() if p.requires_grad]
    (g_teacher,) = torch.autograd.grad(teacher_out.output.pow(2).sum(), params[:1], retain_graph=True)
    (g_student,) = torch.autograd.grad(student_out.output.pow(2).sum(), params[:1], retain_graph=True)
    assert g_teacher.abs().sum() > 0 and g_student.abs().sum() > 0
    discrepancy = game._discrepancy(batch, batch.run(game.teacher, output_hidden_states=True))
    grads = torch.autograd.grad(discrepancy, params)
    assert all(g.abs().sum() > 0 for g in grads)


def test_ascent_increases_the_discrepancy_on_a_fixed_student():
    game, _ = _game()
    probe = torch.Generator()

    def discrepancy() -> float:
        probe.manual_seed(123)  # the same noise each time: only the generator's parameters change
        with torch.no_grad():
            batch = game.generator.sample(16, probe)
            return game._discrepancy(batch, batch.run(game.teacher, output_hidden_states=True)).item()

    before = discrepancy()
    for _ in range(30):
        game.generator_step()  # the student never steps here
    assert discrepancy() > 1.1 * before


def test_student_steps_lower_the_discrepancy_on_a_fixed_generator():
    game, _ = _game(adversarial=False)
    probe = torch.Generator()

    def discrepancy() -> float:
        probe.manual_seed(7)
        with torch.no_grad():
            batch = game.generator.sample(16, probe)
            return game._discrepancy(batch, batch.run(game.teacher, output_hidden_states=True)).item()

    before = discrepancy()
    game.play(25, show_progress=False)
    assert discrepancy() < before


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_game_is_deterministic_and_resumes_from_its_state(schedule):
    full, _ = _game(seed=3, schedule=schedule)
    checkpoints = []
    full.play(4, checkpoint=lambda: checkpoints.append(copy.deepcopy(full.state_dict())), show_progress=False)
    assert [c["round"] for c in checkpoints] == [2]  # every 2 rounds, not after the last
    resumed, _ = _game(seed=3, schedule=schedule)
    resumed.load_state_dict(checkpoints[0])
    resumed.play(4, show_progress=False)
    assert resumed.history.student_discrepancy == full.history.student_discrepancy
    rates = [[group["lr"] for group in game.student_optimizer.param_groups] for game in (resumed, full)]
    assert rates[0] == rates[1]
    for a, b in zip(resumed.student_params, full.student_params):
        assert torch.equal(a, b)


def test_a_cosine_schedule_anneals_the_students_rates_to_zero_over_the_game():
    game, _ = _game(schedule="cosine")  # 4 rounds of one student step

    def rates() -> list[float]:
        return [group["lr"] for group in game.student_optimizer.param_groups]

    start, halfway = rates(), []
    game.play(4, checkpoint=lambda: halfway.extend(rates()), show_progress=False)  # checkpoint_every=2
    assert halfway == pytest.approx([rate / 2 for rate in start])
    assert rates() == pytest.approx([0.0] * len(start))


def test_selection_ends_the_game_on_the_best_held_out_state_and_survives_a_resume():
    """Scores at round 0, every 2 rounds and the last; the student ends on the lowest-scoring state (scored again,
    it gives that score), and a resumed game selects what the whole one does."""
    full, _ = _game(seed=4, rounds=5, select_every=2)
    checkpoints = []
    full.play(5, checkpoint=lambda: checkpoints.append(copy.deepcopy(full.state_dict())), show_progress=False)
    rounds = [int(r) for r, _ in full.history.held_out]
    assert rounds == [0, 2, 4, 5]
    best_round, best = min(full.history.held_out, key=lambda score: score[1])
    assert full.history.selected_round == best_round
    assert full.selection.check(99) == pytest.approx(best, rel=1e-5)
    resumed, _ = _game(seed=4, rounds=5, select_every=2)
    resumed.load_state_dict(checkpoints[-1])
    resumed.play(5, show_progress=False)
    assert resumed.history.held_out == full.history.held_out[:4]
    assert resumed.history.selected_round == full.history.selected_round
    for a, b in zip(resumed.student_params, full.student_params):
        assert torch.equal(a, b)


def test_selection_restores_the_starting_state_when_every_later_one_scores_worse():
    param = torch.nn.Parameter(torch.tensor([1.0]))
    samples = [Batch(torch.ones(1, 2, dtype=torch.long), input_ids=torch.zeros(1, 2, dtype=torch.long))] * 2
    selection = BestStudent(samples, [None, None], lambda batch, _: param.pow(2).sum(), [param])
    for round_, value in ((0, 1.0), (1, 3.0), (2, 2.0)):
        with torch.no_grad():
            param.fill_(value)
        selection.check(round_)
    selection.restore()
    assert param.item() == 1.0 and selection.best_round == 0
    assert selection.scores == [(0, 1.0), (1, 9.0), (2, 4.0)]


def test_sharpness_aware_generation_adds_a_term_and_reports_its_cost():
    game, _ = _game(sharpness=True)
    game.play(2, show_progress=False)
    assert len(game.history.sharpness) == 2 and all(0.0 <= v <= 2.0 for v in game.history.sharpness)
    assert game.history.sharpness_seconds > 0


def test_soft_tokens_temperature_anneals():
    teacher = tiny_teacher()
    gen = SoftTokenGenerator(embedding_table(teacher), torch.arange(100), 8, 2, 4, 16, (1.0, 0.25))
    gen.set_progress(0.5)
    assert gen.temperature == pytest.approx(0.5)
    gen.set_progress(1.0)
    assert gen.temperature == pytest.approx(0.25)
    batch = gen.sample(3, torch.Generator().manual_seed(0))
    assert batch.inputs_embeds.shape == (3, 8, 64) and (batch.attention_mask.sum(1) >= 2).all()
    assert dataclasses.is_dataclass(batch)


def test_an_anchor_takes_its_share_of_the_students_loss_on_fresh_random_tokens():
    game, calib = _game(adversarial=False)
    share = 0.25
    calib = dataclasses.replace(calib, sam_sga=dataclasses.replace(calib.sam_sga, anchor=share))
    anchor = random_token_source(game.teacher, None, calib.seq_len)
    game = SamSga(game.teacher, game.student, game.generator, calib, W4.learn, torch.Generator().manual_seed(5),
                  anchor=anchor)  # fmt: skip
    replay = torch.Generator().manual_seed(5)  # the stream the step draws from, drawn again
    generated = game.generator.sample(game.stream_batch, replay)
    tokens = anchor.sample(game.stream_batch, replay)
    assert tokens.input_ids is not None and tokens.inputs_embeds is None  # ids: the student's own word table
    with torch.no_grad():
        expected = sum(
            weight * game._discrepancy(batch, batch.run(game.teacher, output_hidden_states=True))
            for batch, weight in ((generated, 1 - share), (tokens, share))
        )
    game.sam = None  # a plain step reports the loss it descends at the current student
    assert game.student_step().item() == pytest.approx(expected.item(), rel=1e-5)


def test_an_anchor_share_without_its_source_is_refused():
    game, calib = _game()
    calib = dataclasses.replace(calib, sam_sga=dataclasses.replace(calib.sam_sga, anchor=0.5))
    with pytest.raises(ValueError, match="anchor"):
        SamSga(game.teacher, game.student, game.generator, calib, W4.learn, torch.Generator())


def test_the_lm_text_anchor_is_the_adapters_text_as_its_lm_wrote_it():
    """``anchor_inputs: lm-text``: the student's anchor share is on the pooled text's ids, what the adapter's
    samples are before their residual (LLM-QAT's inputs), drawn from the step's stream."""
    game, calib = _game("gpt2", "lm-adapter", adversarial=False)
    share = 0.5
    sam_sga = dataclasses.replace(calib.sam_sga, anchor=share, anchor_inputs="lm-text")
    calib = dataclasses.replace(calib, sam_sga=sam_sga)
    anchor = anchor_source(calib, game.teacher, None, game.generator)
    assert anchor is game.generator.text
    text = anchor.sample(6, torch.Generator().manual_seed(3))
    rows = torch.randint(len(game.generator.base), (6,), generator=torch.Generator().manual_seed(3))
    table = embedding_table(game.teacher)
    mask = text.attention_mask.unsqueeze(-1)
    torch.testing.assert_close(table[text.input_ids] * mask, game.generator.base[rows] * mask)
    game = SamSga(game.teacher, game.student, game.generator, calib, W4.learn, torch.Generator().manual_seed(5),
                  anchor=anchor)  # fmt: skip
    replay = torch.Generator().manual_seed(5)
    generated = game.generator.sample(game.stream_batch, replay)
    unmoved = anchor.sample(game.stream_batch, replay)
    with torch.no_grad():
        expected = sum(
            weight * game._discrepancy(batch, batch.run(game.teacher, output_hidden_states=True))
            for batch, weight in ((generated, 1 - share), (unmoved, share))
        )
    game.sam = None
    assert game.student_step().item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_lm_text_anchor_without_the_lm_adapter_is_a_config_error():
    game, calib = _game(adversarial=False)  # soft tokens: no text to anchor on
    calib = dataclasses.replace(calib, sam_sga=dataclasses.replace(calib.sam_sga, anchor=0.5, anchor_inputs="lm-text"))
    with pytest.raises(ConfigError, match="anchor_inputs: lm-text needs the lm-adapter"):
        anchor_source(calib, game.teacher, None, game.generator)


def _pool_discrepancies(game: SamSga) -> torch.Tensor:
    """The student's discrepancy on each text of the generator's pool."""
    generator = game.generator
    with torch.no_grad():
        batch = Batch(generator.mask, inputs_embeds=generator.base * generator.mask.unsqueeze(-1))
        student, teacher = batch.run(game.student, True), batch.run(game.teacher, True)
        return sample_losses(game.teacher.kind, student, teacher, batch.attention_mask, game.learn)


def test_choosing_texts_ascends_the_expected_discrepancy_without_moving_them():
    """``radius: 0`` + ``choose``: the texts reach the models as rows of the embedding table (what a causal LM
    reads), the adapter stays as it was, and the choice's ascent raises the pool's expected discrepancy."""
    game, _ = _game("gpt2", "lm-adapter", radius=0.0, choose=0.2)
    generator = game.generator
    assert game.generator_params == [generator.choice]
    batch = generator.sample(6, torch.Generator().manual_seed(2))
    table = embedding_table(game.teacher)
    pooled = generator.text.ids[batch.source]
    torch.testing.assert_close(batch.inputs_embeds, table[pooled] * batch.attention_mask.unsqueeze(-1))
    adapter = copy.deepcopy(generator.adapter.state_dict())
    losses = _pool_discrepancies(game)
    for _ in range(30):
        game.generator_step()  # the student never steps here
    probs = torch.softmax(generator.choice.detach(), 0)
    assert (probs * losses).sum() > 1.05 * losses.mean()  # uniform at the start
    assert torch.corrcoef(torch.stack([generator.choice.detach(), losses]))[0, 1] > 0.4
    assert all(torch.equal(adapter[k], v) for k, v in generator.adapter.state_dict().items())


def test_a_game_that_chooses_texts_is_deterministic_and_resumes_from_its_state():
    full, _ = _game("gpt2", "lm-adapter", seed=3, choose=0.2)
    checkpoints = []
    full.play(4, checkpoint=lambda: checkpoints.append(copy.deepcopy(full.state_dict())), show_progress=False)
    resumed, _ = _game("gpt2", "lm-adapter", seed=3, choose=0.2)
    resumed.load_state_dict(checkpoints[0])
    resumed.play(4, show_progress=False)
    assert resumed.history.student_discrepancy == full.history.student_discrepancy
    assert torch.equal(resumed.generator.choice, full.generator.choice)
    assert not torch.equal(full.generator.choice, torch.zeros_like(full.generator.choice))


@pytest.mark.parametrize(
    ("kind", "radius", "choose", "message"),
    [("soft-tokens", 0.05, 0.1, "choose: soft tokens have no pool"), ("lm-adapter", 0.0, 0.0, "radius: 0 leaves")],
)
def test_a_choice_without_a_pool_or_nothing_to_move_is_a_config_error(kind, radius, choose, message):
    with pytest.raises(ConfigError, match=message):
        _game("gpt2", kind, radius=radius, choose=choose)
