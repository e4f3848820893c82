"""Direct preference optimisation by hand: teach the model to prefer one answer over another, with no reward model.

The loss (Rafailov et al., 2023), for a prompt x, a chosen answer y_w and a rejected answer y_l:

    loss = -log sigma( beta [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

log pi(y|x) is the log-probability of the whole answer: the SUM of its tokens' log-probabilities (never the
mean), over the answer's tokens only (the prompt's tokens are context, not something the model says).
pi_ref is the model before DPO: with LoRA, the same model with its adapters switched off (no second copy in
memory); for full fine-tuning, the model as it was before the first step. Either way its log-probabilities of
every pair are computed once, before training, and kept as numbers.
"""

import torch
import torch.nn.functional as F


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | tokens before it) for every position: logits (B, T, V), targets (B, T) -> (B, T)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V), in float32 even from a bf16 model
    return log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)


def answer_log_probs(model, inputs: torch.Tensor, targets: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) of each row: the sum of the answer tokens' log-probabilities. All (B, T) -> (B,).

    answer_mask[b, t] is True where targets[b, t] is a token of the answer (the model's turn and its end token).
    """
    logits, _ = model(inputs)  # (B, T, V)
    return (token_log_probs(logits, targets) * answer_mask).sum(dim=-1)  # (B,)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """The DPO loss of a batch of pairs (each argument (B,): summed answer log-probs) and its metrics.

    The implicit reward of an answer is r(y) = beta (log pi(y|x) - log pi_ref(y|x)): how much more likely the
    model has made it than the reference did. The loss pushes r(y_w) - r(y_l) up through a logistic link.
    """
    chosen_rewards = beta * (policy_chosen - reference_chosen)  # (B,)
    rejected_rewards = beta * (policy_rejected - reference_rejected)  # (B,)
    margins = chosen_rewards - rejected_rewards  # (B,)
    loss = -F.logsigmoid(margins).mean()  # -log sigma(m), computed without overflow for large |m|
    metrics = {
        "loss": float(loss.detach()),
        "accuracy": float((margins > 0).float().mean()),  # pairs where the chosen answer has the larger reward
        "margin": float(margins.detach().mean()),
        "chosen_reward": float(chosen_rewards.detach().mean()),
        "rejected_reward": float(rejected_rewards.detach().mean()),
    }
    return loss, metrics
