"""The batched sampler: every row's options at once, seeded rows reproducible whatever the batch,
draws that follow the filtered distribution."""

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from triptych.engines.hf.sampler import Row, Sampler, plain_greedy, uniform
from triptych.protocol import SamplingOptions

VOCAB = 64


def row(
    index: int = 0,
    seed: int = 1,
    step: int = 0,
    stops: frozenset[int] = frozenset(),
    **options: object,
) -> Row:
    return Row(
        index, SamplingOptions.model_validate({"max_tokens": 8, **options}), seed, step, stops
    )


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def draws(sampler: Sampler, scores: torch.Tensor, count: int, **options: object) -> Counter[int]:
    """`count` tokens of one row, each at a different step (fresh noise), from the same logits."""
    rows = [row(i, seed=7, step=i, **options) for i in range(count)]
    tokens = sampler.sample(scores.expand(count, -1).clone(), rows)
    return Counter(tokens.tolist())


def test_the_noise_is_uniform_and_keyed_by_seed_step_and_token() -> None:
    tokens = torch.arange(VOCAB).repeat(512, 1)
    u = uniform(torch.arange(512) * 977, torch.zeros(512, dtype=torch.long), tokens)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.002
    again = uniform(torch.tensor([5 * 977]), torch.tensor([0]), torch.tensor([[3, 9]]))
    assert torch.equal(again[0], u[5, [3, 9]])  # same key, same number, whatever the batch
    assert not torch.equal(uniform(torch.tensor([1 << 40]), torch.tensor([0]), tokens[:1]), u[:1])


def test_greedy_rows_take_the_argmax_and_need_no_sampling_pass() -> None:
    sampler = Sampler(VOCAB, 8, torch.device("cpu"))
    scores = logits(3)
    rows = [row(0, temperature=0), row(1, top_k=1), row(2, temperature=0.7)]
    assert [plain_greedy(r) for r in rows] == [True, True, False]
    tokens = sampler.sample(scores.clone(), rows)
    assert tokens[:2].tolist() == scores[:2].argmax(-1).tolist()


def test_a_seeded_row_draws_the_same_tokens_in_any_batch() -> None:
    sampler = Sampler(VOCAB, 8, torch.device("cpu"))
    scores = logits(1, seed=3)
    options = {"temperature": 0.9, "top_p": 0.9, "top_k": 20}
    alone = [
        int(sampler.sample(scores.clone(), [row(seed=42, step=s, **options)])) for s in range(6)
    ]
    for step in range(6):
        # other rows around it, one of which makes the batch look at the whole vocabulary
        neighbours = [row(1, seed=9, step=step, temperature=1.0), row(2, seed=5, temperature=0)]
        batch = torch.cat([logits(1, seed=11), scores, logits(1, seed=12)])
        rows = [neighbours[0], row(3, seed=42, step=step, **options), neighbours[1]]
        assert int(sampler.sample(batch, rows)[1]) == alone[step]
    assert len(set(alone)) > 1  # the steps draw different numbers
    other_seed = [
        int(sampler.sample(scores.clone(), [row(seed=43, step=s, **options)])) for s in range(6)
    ]
    assert other_seed != alone


def test_draws_follow_the_softmax_at_the_temperature() -> None:
    sampler = Sampler(VOCAB, 4096, torch.device("cpu"))
    scores = torch.tensor([2.0, 1.0, 0.5, 0.0] + [-30.0] * (VOCAB - 4))
    for temperature in (1.0, 0.5):
        seen = draws(sampler, scores, 4000, temperature=temperature)
        expected = torch.softmax(scores / temperature, -1)
        for token in range(4):
            p = float(expected[token])
            sd = math.sqrt(p * (1 - p) / 4000)
            assert abs(seen[token] / 4000 - p) < 5 * sd + 1e-3, (temperature, token)


def test_top_k_top_p_and_min_p_keep_only_their_candidates() -> None:
    sampler = Sampler(VOCAB, 2000, torch.device("cpu"))
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04] + [0.0] * (VOCAB - 5)) + 1e-9
    scores = probs.log()
    assert set(draws(sampler, scores, 2000, top_k=2)) == {0, 1}
    assert set(draws(sampler, scores, 2000, top_p=0.8)) == {0, 1, 2}  # 0.4 + 0.3 < 0.8
    assert set(draws(sampler, scores, 2000, min_p=0.45)) == {0, 1, 2}  # p >= 0.18
    mixed = draws(sampler, scores, 2000, top_k=4, top_p=0.75, min_p=0.1)
    assert set(mixed) == {0, 1, 2}
    # renormalized over what is kept: 0.4 / 0.9 of the draws are token 0
    assert abs(mixed[0] / 2000 - 0.4 / 0.9) < 0.05


def test_penalties_and_min_tokens() -> None:
    sampler = Sampler(VOCAB, 8, torch.device("cpu"))
    scores = torch.linspace(-3, 3, VOCAB).view(1, -1)
    best = VOCAB - 1
    sampler.start(0, SamplingOptions(max_tokens=8, repetition_penalty=2.0), prompt=[best])
    assert (
        int(sampler.sample(scores.clone(), [row(0, temperature=0, repetition_penalty=2.0)])) != best
    )
    sampler.start(1, SamplingOptions(max_tokens=8, frequency_penalty=2.0), prompt=[])
    first = int(sampler.sample(scores.clone(), [row(1, temperature=0, frequency_penalty=2.0)]))
    assert first == best  # nothing generated yet: no penalty
    second = int(
        sampler.sample(scores.clone(), [row(1, step=1, temperature=0, frequency_penalty=2.0)])
    )
    assert second != best  # counted once, pushed down by 2
    kept = row(2, stops=frozenset({best}), temperature=0, min_tokens=2)
    assert not plain_greedy(kept)
    assert int(sampler.sample(scores.clone(), [kept])) != best
    late = row(2, step=2, stops=frozenset({best}), temperature=0, min_tokens=2)
    assert plain_greedy(late)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_seeded_row_draws_the_same_on_the_gpu() -> None:
    scores = logits(4, seed=5)
    rows = [row(i, seed=100 + i, step=3, temperature=0.8, top_k=10, top_p=0.9) for i in range(4)]
    on_cpu = Sampler(VOCAB, 8, torch.device("cpu")).sample(scores.clone(), rows)
    on_gpu = Sampler(VOCAB, 8, torch.device("cuda")).sample(scores.cuda(), rows)
    assert on_gpu.tolist() == on_cpu.tolist()


def test_logprobs_come_from_the_distribution_drawn_from() -> None:
    """After penalties and temperature (greedy counts as 1), before top-k/top-p cut it; rows that
    did not ask share the step."""
    sampler = Sampler(VOCAB, 8, torch.device("cpu"))
    scores = logits(3, seed=5)
    rows = [
        row(0, temperature=0, logprobs=2),
        row(1, temperature=0.5, top_k=3, seed=1, logprobs=0),
        row(2, temperature=0),
    ]
    assert not plain_greedy(rows[0])
    tokens, logprobs = sampler.choose(scores.clone(), rows)
    assert logprobs is not None
    raw = torch.log_softmax(scores[0], -1)
    assert int(tokens[0]) == int(scores[0].argmax())
    assert float(logprobs.chosen[0]) == pytest.approx(float(raw[tokens[0]]))
    assert logprobs.top_ids[0].tolist() == torch.topk(raw, 2).indices.tolist()
    warm = torch.log_softmax(scores[1] / 0.5, -1)  # not renormalised over the top 3
    assert float(logprobs.chosen[1]) == pytest.approx(float(warm[tokens[1]]))
    assert int(tokens[2]) == int(scores[2].argmax())
    penalized = Sampler(VOCAB, 8, torch.device("cpu"))
    asked = row(0, temperature=0, logprobs=1, repetition_penalty=2.0)
    penalized.start(0, asked.options, [])
    first = int(penalized.sample(scores[:1].clone(), [asked]))
    _, after = penalized.choose(scores[:1].clone(), [replace(asked, step=1)])
    assert after is not None and int(after.top_ids[0, 0]) != first  # after the penalty
