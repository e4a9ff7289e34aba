"""The language-model loss without full-precision logits: cross-entropy computed in fp32 chunk by
chunk, its gradient kept in the logits' own dtype.

F.cross_entropy(logits.float(), ...) on (B*T, V) logits keeps an fp32 copy of them and their fp32
log-softmax for the backward pass: 8 bytes per logit beside the logits themselves (gpt2-small at
micro-batch 16: 6.6 GB). Here each chunk of rows is upcast, its loss summed and its gradient
softmax - onehot written straight away into one buffer of the logits' dtype; the logits can be
freed as soon as the forward pass returns, and the backward pass only scales that buffer. The
same mathematics (fp32 log-sum-exp, mean over tokens), no recomputation.
"""

from __future__ import annotations

import torch

# Rows per chunk: about 2**25 logits (128 MiB in fp32) whatever the vocabulary.
CHUNK_LOGITS = 2**25


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, vocab = logits.shape
        rows = max(1, CHUNK_LOGITS // vocab)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want_grad and n > rows else None  # one chunk: its own tensor
        for start in range(0, n, rows):
            chunk = logits[start:start + rows].float()
            t = targets[start:start + rows].unsqueeze(1)
            lse = torch.logsumexp(chunk, dim=1, keepdim=True)
            total += (lse - chunk.gather(1, t)).sum()
            if want_grad:
                g = (chunk - lse).exp_()  # softmax
                g.scatter_add_(1, t, torch.full_like(t, -1, dtype=g.dtype))  # minus the one-hot target
                # unscaled: fp16 keeps probabilities, not probabilities / n
                if grad is None:
                    grad = g.to(logits.dtype)
                else:
                    grad[start:start + rows] = g
        ctx.n = n
        if want_grad:
            ctx.save_for_backward(grad)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * (grad_out / ctx.n).to(grad.dtype), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) of (..., V) logits against integer targets of shape (...)."""
    return _CrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
