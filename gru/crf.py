"""A linear-chain CRF written by hand: path score, forward algorithm (log partition), Viterbi decoding.

A tag path y_1..y_T for emissions e (B, T, K) scores (equation (16) of the README)
    s(y) = start[y_1] + sum_t e_t[y_t] + sum_t transitions[y_{t-1}, y_t] + end[y_T]
and p(y | x) = exp(s(y)) / Z with Z = sum over all K^T paths of exp(s(y)).
"""

import torch
import torch.nn as nn


class CRF(nn.Module):
    """Learned scores for the first tag, the last tag and every pair of neighbouring tags."""

    def __init__(self, num_tags: int):
        super().__init__()
        self.num_tags = num_tags
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))  # [previous tag, next tag]
        self.start_scores = nn.Parameter(torch.zeros(num_tags))  # (K,)
        self.end_scores = nn.Parameter(torch.zeros(num_tags))  # (K,)

    def path_score(self, emissions, tags, mask):
        """s(y) of the given tag paths, equation (16): emissions (B, T, K), tags (B, T), mask (B, T) -> (B,)."""
        mask = mask.to(emissions.dtype)  # (B, T)
        lengths = mask.sum(1).long()  # (B,)
        emission_scores = emissions.gather(2, tags[:, :, None]).squeeze(2)  # (B, T)
        transition_scores = self.transitions[tags[:, :-1], tags[:, 1:]]  # (B, T-1)
        last_tags = tags.gather(1, (lengths - 1)[:, None]).squeeze(1)  # (B,)
        return (
            self.start_scores[tags[:, 0]]
            + (emission_scores * mask).sum(1)
            + (transition_scores * mask[:, 1:]).sum(1)
            + self.end_scores[last_tags]
        )

    def log_partition(self, emissions, mask):
        """log Z by the forward algorithm, equations (17)-(18): (B, T, K), (B, T) -> (B,).

        alpha_t[j] = log sum over paths ending in tag j at step t of exp(score so far)
                   = logsumexp_i(alpha_{t-1}[i] + transitions[i, j]) + e_t[j]
        """
        steps, step_mask = emissions.unbind(1), mask.unbind(1)  # T slices of (B, K) and (B,)
        alpha = self.start_scores + steps[0]  # (B, K)
        for t in range(1, len(steps)):
            # every previous tag i to every next tag j: (B, K, 1) + (K, K) -> (B, K, K), summed out over i
            next_alpha = torch.logsumexp(alpha[:, :, None] + self.transitions, dim=1) + steps[t]  # (B, K)
            alpha = torch.where(step_mask[t][:, None], next_alpha, alpha)  # padding leaves alpha unchanged
        return torch.logsumexp(alpha + self.end_scores, dim=1)  # (B,)

    def neg_log_likelihood(self, emissions, tags, mask):
        """-log p(y | x) = log Z - s(y) for each sentence: (B,)."""
        return self.log_partition(emissions, mask) - self.path_score(emissions, tags, mask)

    @torch.no_grad()
    def viterbi(self, emissions, mask) -> list[list[int]]:
        """The highest-scoring path of each sentence, equation (19): the forward algorithm with max for logsumexp."""
        batch_size, max_length, num_tags = emissions.shape
        best = self.start_scores + emissions[:, 0]  # (B, K): best score of a path ending in each tag
        keep = torch.arange(num_tags, device=emissions.device).expand(batch_size, num_tags)  # (B, K)
        backpointers = []
        for t in range(1, max_length):
            candidates = best[:, :, None] + self.transitions  # (B, K previous, K next)
            best_next, best_previous = candidates.max(dim=1)  # (B, K), (B, K)
            step = mask[:, t, None]  # (B, 1)
            best = torch.where(step, best_next + emissions[:, t], best)
            # on padding each tag points to itself, so one backward walk from the end serves every length
            backpointers.append(torch.where(step, best_previous, keep))
        tag = (best + self.end_scores).argmax(1)  # (B,)
        path = [tag]
        for pointers in reversed(backpointers):
            tag = pointers.gather(1, tag[:, None]).squeeze(1)  # (B,)
            path.append(tag)
        path = torch.stack(path[::-1], dim=1).tolist()  # (B, T)
        return [row[:length] for row, length in zip(path, mask.sum(1).tolist())]
