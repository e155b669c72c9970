"""One rollout: the ESR proposes candidates, the frozen LSR judges and picks, the picks earn rewards.
Nothing here carries gradient; the trainer turns a rollout into a loss (rag_capg.training.trainer).

    lists   = G Gumbel-top-K draws per query         the ESR as a Plackett-Luce policy over the logits
    scores  = LSR(x, lists)                          the judge behind the score cache
    picks   = top-L (or sampled) of the scores       the LSR's choice from each list
    rewards = mapping(score) >= 0, then the baseline what the estimator credits to each pick

Every random draw is a function of (seed, step, query index) alone, never of the process layout or of
which other queries share the micro-batch: each query gets its own generators (``noise_generator``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rag_capg.errors import InputError
from rag_capg.judges.rewards import pick, to_reward
from rag_capg.pg.estimators import group_baseline_rewards
from rag_capg.pg.policy import sample_plackett_luce

# Streams of noise_generator's seed offsets: one per kind of draw.
GUMBEL, LSR_PICK, TAIL_SAMPLES = 0, 1, 2


def noise_generator(seed: int, step: int, query_index: int, device) -> torch.Generator:
    """A generator private to one (step, query): the query's randomness does not depend on which process
    handles it, nor on how many queries share its micro-batch."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1_000_033 + query_index)
    return g


def batch_indices(num_queries: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The global batch of `step`: a seeded permutation per epoch, cut into batches (last partial dropped).
    The data order is therefore a function of the step counter, which is all a checkpoint has to store."""
    per_epoch = num_queries // batch_size
    epoch, position = divmod(step, per_epoch)
    perm = torch.randperm(num_queries, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[position * batch_size:(position + 1) * batch_size].tolist()


@dataclass
class Rollout:
    """B queries x G candidate lists each; row b * G + g is query b's g-th list."""

    lists: torch.Tensor        # (B*G, K) columns of the logits, in sampled (Plackett-Luce) order
    candidates: torch.Tensor   # (B*G, K) corpus indices of those columns (the same unless softmax=top_m)
    picks: torch.Tensor        # (B*G, L) columns the LSR picked, each one in its row of `lists`
    rewards: torch.Tensor      # (B*G, L) float32 >= 0, after the baseline: what the estimator credits
    raw_rewards: torch.Tensor  # (B*G, L) the mapped scores before the baseline (logged)
    kept: torch.Tensor         # (B,) bool, False for a query the judge failed on (lsr_on_error=skip_query)
    candidate_rows: list[list[int]]  # `candidates` as host lists (copied once, for the judge)


@torch.no_grad()
def rollout(logits: torch.Tensor, *, query_idx: list[int], queries, corpus, judge, args, step: int,
            mask: torch.Tensor | None = None, column_ids: torch.Tensor | None = None) -> Rollout:
    """Sample, judge, pick and reward for the B queries ``query_idx`` (rows of ``logits``, (B, N')).

    ``mask`` / ``column_ids`` come with a restricted softmax: columns never to be drawn, and the corpus
    index of each column. ``judge`` is a ScoreCache; ``args`` a CAPGConfig."""
    dev = logits.device
    G, K, L = args.group_size, args.candidates, args.num_picks
    rows = logits.detach().repeat_interleave(G, dim=0)  # (B*G, N')
    lists = sample_plackett_luce(rows, K, mask=None if mask is None else mask.repeat_interleave(G, dim=0),
                                 generator=[noise_generator(args.seed + GUMBEL, step, i, dev) for i in query_idx])
    cand = lists if column_ids is None else column_ids.repeat_interleave(G, dim=0).gather(1, lists)
    cand_rows = cand.tolist()  # the one host copy of the candidates: the judge works on ids and texts
    rep = [i for i in query_idx for _ in range(G)]
    scores, skipped = judge.score_with_skips(
        [queries.ids[i] for i in rep], [queries.texts[i] for i in rep],
        [[corpus.ids[j] for j in row] for row in cand_rows], [[corpus.texts[j] for j in row] for row in cand_rows])
    kept = ~skipped.view(len(query_idx), G).any(dim=1)
    scores = torch.nan_to_num(scores.float().cpu(), nan=0.0)  # skipped rows are NaN; they are dropped
    positions = pick(scores, L, policy=args.lsr_policy, temperature=args.lsr_temperature,
                     generator=[noise_generator(args.seed + LSR_PICK, step, i, "cpu") for i in query_idx])
    try:
        raw = to_reward(scores.gather(1, positions), args.reward_mapping)  # (B*G, L), >= 0
    except ValueError as err:  # e.g. a signed judge under reward_mapping=identity
        raise InputError(str(err), field="reward_mapping") from None
    rewards = group_baseline_rewards(raw.view(-1, G, L)).reshape(-1, L) if args.baseline == "group_min_shift" \
        else raw
    return Rollout(lists=lists, candidates=cand, picks=lists.gather(1, positions.to(dev)),
                   rewards=rewards.to(dev, torch.float32), raw_rewards=raw, kept=kept,
                   candidate_rows=cand_rows)


def candidate_recall(ro: Rollout, query_idx: list[int], queries, corpus_ids: list[str]) -> tuple[float, float]:
    """(sum, count) over lists of labelled queries: the share of a query's relevant passages in its list."""
    G = ro.lists.shape[0] // max(len(query_idx), 1)
    total, count = 0.0, 0
    for row, ids in enumerate(ro.candidate_rows):
        rel = queries.qrels.get(queries.ids[query_idx[row // G]]) or {}
        if rel:
            total += len(rel.keys() & {corpus_ids[j] for j in ids}) / len(rel)
            count += 1
    return total, float(count)
