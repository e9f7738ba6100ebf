"""The LM head on the CPU: log-probabilities of the answer tokens only, in one log-softmax.

TRL's trainers score tokens through a fused LM head (``trl.trainer.utils.add_fused_lm_head``): it never builds the
full (tokens x vocabulary) logits, projects only the positions whose label is not -100, and folds each vocabulary
tile into running log-sum-exp statistics. That design is for Triton GPUs. On other devices TRL (1.16) does two
things that cost the CPU dearly:

- it scores *every* position, prompt included (fixed tile shapes spare compilers such as Neuron's a recompile per
  batch; eager CPU code has no such need), and on chat data the prompt is about 30% of the tokens;
- its fallback for the per-tile kernel is about twenty full passes of element-wise torch ops over each tile in the
  forward and backward, plus a second projection to recompute the tiles in the backward.

``use_cpu_lm_head(True)`` keeps TRL's fused head and changes only what happens on the CPU: the answer positions
alone are projected, once, and PyTorch's own ``log_softmax`` (and autograd) do the rest. The numbers are the same
(tested against TRL's function, values and gradients). On the embedded model TRL's head took 37% of a CPU
training step; the log-softmax, its backward and the logged entropy now take 9%, and the default recipe went from
136 to 168-213 tokens/s (docs/benchmarks.md). The price is memory: the
answer tokens' logits live until the backward, so a batch whose logits would pass ``WHOLE_LOGITS_LIMIT`` values
goes through TRL's tiled function instead. GPU tensors always do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Above this many logit values (1 GiB in fp32) a batch keeps TRL's tiled function, which never holds them all.
WHOLE_LOGITS_LIMIT = 2**28

_ORIGINALS: dict[str, Any] = {}


def answer_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                     outputs: tuple[str, ...] = ("log_probs",)) -> tuple[torch.Tensor | None, ...]:
    """What TRL's ChunkedLogProbFunction returns, (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1),
    from whole logits. Log-probs and entropy carry gradients (GRPO's entropy bonus needs them); the rest do not."""
    logits = F.linear(hidden, weight, bias).float()  # TRL too projects in the compute dtype, then works in fp32
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits / temperature
    all_log_probs = torch.log_softmax(logits, dim=-1)
    log_probs = all_log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(all_log_probs.exp() * all_log_probs).sum(-1) if "entropy" in outputs else None
    with torch.no_grad():
        log_sum_sq = torch.logsumexp(2 * all_log_probs, dim=-1) if "log_sum_sq_probs" in outputs else None
        mean_logits = logits.mean(-1) if "mean_logits" in outputs else None
        # argmax returns the first maximum: a tie with an earlier token is not a top-1 hit, as in TRL's kernel
        is_top1 = logits.argmax(-1) == targets if "is_top1" in outputs else None
    return log_probs, entropy, log_sum_sq, mean_logits, is_top1


class _LogProbsByDevice:
    """Stands in for TRL's ChunkedLogProbFunction (same ``apply`` signature): whole logits for CPU batches that fit
    WHOLE_LOGITS_LIMIT, TRL's own function for everything else."""

    @staticmethod
    def apply(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: float | None = None,
              logit_scale: float = 1.0, outputs: tuple[str, ...] = ("log_probs",)) -> tuple[Any, ...]:
        if hidden.device.type == "cpu" and hidden.shape[0] * weight.shape[0] <= WHOLE_LOGITS_LIMIT:
            return answer_log_probs(hidden, weight, bias, targets, temperature, final_logit_softcapping,
                                    logit_scale, outputs)
        return _ORIGINALS["_ChunkedLogProbFunction"].apply(hidden, weight, bias, targets, temperature, chunk_size,
                                                           final_logit_softcapping, logit_scale, outputs)


def _answer_positions_only(device: torch.device) -> bool:
    # In trl.trainer.utils this name only decides whether the fused head drops the -100 positions before
    # projecting; the kernel choice reads its own copy in trl.kernels.chunked_logprob.
    return device.type == "cpu" or _ORIGINALS["_use_triton"](device)


def use_cpu_lm_head(enabled: bool) -> bool:
    """Install (or, with False, remove) the CPU path in TRL's fused LM head; True when it is installed.

    Process-wide, like any library patch, but harmless to other runs: GPU tensors never take it. TRL is pinned
    (requirements.txt); if a future TRL renames these internals the patch is skipped and training is unchanged."""
    import trl.trainer.utils as trl_utils

    patches = {"_ChunkedLogProbFunction": _LogProbsByDevice, "_use_triton": _answer_positions_only}
    if not all(hasattr(trl_utils, name) for name in patches):
        return False
    if not _ORIGINALS:  # the first call sees TRL's own functions: nothing else patches these names
        _ORIGINALS.update({name: getattr(trl_utils, name) for name in patches})
    for name, replacement in patches.items():
        setattr(trl_utils, name, replacement if enabled else _ORIGINALS[name])
    return enabled
