"""The training loss through a large LM head, scoring only the positions whose next token is trained.

trl's SFTTrainer gives the model a fused LM head (`trl.trainer.utils.add_fused_lm_head`) so that the
(batch, length, vocab) logits never exist. Where Triton is missing (CPU) that head projects every
position, prompt tokens and padding included, and folds each (tokens, 32k) tile into entropy and top-1
statistics besides the loss: a dozen elementwise passes per tile, and the backward GEMMs in float32.
With Gemma 3's 262k vocabulary the head is most of a CPU training step.

This head projects only the label-bearing rows and computes what the loss needs, once:

    per chunk of rows:  logits = h @ W.T (compute dtype); max, logsumexp and the target logit in float32;
                        when training, d nll / d h = (softmax - onehot) @ W right away (kept: rows x hidden)
    backward:           the incoming gradient times what the forward kept; no second projection.

`add_fast_lm_head(model)` installs it behind trl's switch: `model(..., labels=..., fused_lm_head=True)`
returns trl's `FusedCausalLMOutput`, so SFTTrainer's `compute_loss` and eval/perplexity.py use it as
they are. `log_probs`, `loss`, `label_mask` and `is_top1` are filled; `entropy` is not computed (NaN).
Same loss and gradients as the model's own full-logits loss: tests/test_fast_head.py.
"""
from __future__ import annotations

import functools
import math
import types

import torch
import torch.nn.functional as F

from eval.labels import IGNORE_INDEX

# Rows per chunk: a chunk's logits are rows x vocab; this bounds them to ~2^25 values (128 MiB in fp32).
CHUNK_VALUES = 1 << 25
# Config attributes that change the logits after the projection; a model with any of them keeps trl's head.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class HeadNLL(torch.autograd.Function):
    """-log softmax(hidden @ weight.T)[target] per row, and whether the target is a top-1 logit.

    The gradient with respect to `hidden` is computed in the forward pass, from the logits at hand (as
    Liger's fused linear cross-entropy does): row i's nll depends on row i of hidden only, so the backward
    is grad_nll[i] * d nll_i / d hidden_i, exact for any incoming gradient, and the logits are never
    computed twice. Two (rows, vocab) buffers serve every chunk: fresh ones per chunk cost more in page
    faults than the arithmetic. `weight` is frozen (head_nll takes another path when it is not); the rows
    `token_ids` of it may be replaced by trained ones, `token_rows` (peft's trainable tokens).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_ids, token_rows,
                dtype: torch.dtype, rows_per_chunk: int):
        n, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
        log_z = torch.empty(n, dtype=torch.float32, device=device)
        target_logit = torch.empty_like(log_z)
        is_top1 = torch.empty(n, dtype=torch.bool, device=device)
        want_grad = ctx.needs_input_grad[0] or (token_rows is not None and ctx.needs_input_grad[4])
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=device) if want_grad else None
        token_grad = torch.empty((n, len(token_ids)), device=device) if want_grad and token_rows is not None else None
        rows = -(-n // -(-n // rows_per_chunk)) if n else 1  # equal chunks: a 1-row remainder runs slowly
        logits_buf = torch.empty((rows, vocab), dtype=dtype, device=device)
        probs_buf = torch.empty((rows, vocab), dtype=torch.float32, device=device)
        with torch.autocast(device.type, enabled=False):
            w = weight.to(dtype)
            if token_rows is not None:
                trained = token_rows.to(dtype)
                change = trained - w[token_ids]  # what replacing the rows adds to d nll / d hidden
            for s in range(0, n, rows):
                e = min(s + rows, n)
                h = hidden[s:e].to(dtype)
                logits, probs, target = logits_buf[: e - s], probs_buf[: e - s], targets[s:e, None]
                torch.mm(h, w.t(), out=logits)
                if token_rows is not None:
                    logits.index_copy_(1, token_ids, h @ trained.t())
                probs.copy_(logits)                                          # float32 from here on
                target_logit[s:e] = probs.gather(1, target)[:, 0]
                top = probs.amax(dim=-1)
                is_top1[s:e] = target_logit[s:e] >= top
                total = probs.sub_(top[:, None]).exp_().sum(dim=-1)          # probs = exp(logits - max)
                log_z[s:e] = top + total.log()
                if want_grad:  # d nll / d logits = softmax - onehot(target); d nll / d hidden = that @ W
                    probs.mul_(total.reciprocal()[:, None])
                    probs.scatter_add_(1, target, torch.full(target.shape, -1.0, device=device))
                    logits.copy_(probs)
                    torch.mm(logits, w, out=grad_hidden[s:e])
                    if token_rows is not None:
                        token_grad[s:e] = probs[:, token_ids]                   # d nll / d (those logits)
                        grad_hidden[s:e] += token_grad[s:e].to(dtype) @ change
        ctx.save_for_backward(grad_hidden, token_grad, hidden if token_grad is not None else None)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(is_top1)
        return log_z - target_logit, is_top1

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor, _grad_top1):
        grad_hidden, token_grad, hidden = ctx.saved_tensors
        g = grad_nll.float()[:, None]
        grad = grad_hidden.float().mul_(g).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        grad_rows = (token_grad * g).t() @ hidden.float() if token_grad is not None and ctx.needs_input_grad[4] else None
        return grad, None, None, None, grad_rows, None, None


def _checkpointed_nll(hidden, weight, targets, rows_per_chunk):
    """The plain way, for a head whose weight is trained too: cross-entropy per chunk of rows, each chunk's
    logits recomputed in the backward instead of kept."""
    from torch.utils.checkpoint import checkpoint

    def chunk(h, t):
        logits = (h @ weight.t()).float()
        return F.cross_entropy(logits, t, reduction="none"), logits.argmax(-1) == t

    parts = [checkpoint(chunk, hidden[s:s + rows_per_chunk], targets[s:s + rows_per_chunk], use_reentrant=False)
             for s in range(0, hidden.shape[0], rows_per_chunk)]
    if not parts:
        return hidden.sum(-1) * 0, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def head_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_ids: torch.Tensor | None = None,
             token_rows: torch.Tensor | None = None, rows_per_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll per row in float32, is_top1 per row) for hidden [N, H], weight [V, H], targets [N]; with `token_ids`
    [K], the head's rows for those tokens are `token_rows` [K, H] instead of weight's.

    The projection runs in the autocast dtype when autocast is on (else in hidden's dtype); the softmax
    statistics always in float32."""
    if rows_per_chunk is None:
        rows_per_chunk = max(1, CHUNK_VALUES // weight.shape[0])
    if weight.requires_grad and torch.is_grad_enabled():
        if token_ids is not None:
            weight = weight.index_copy(0, token_ids, token_rows.to(weight.dtype))
        return _checkpointed_nll(hidden, weight, targets, rows_per_chunk)
    return HeadNLL.apply(hidden, weight, targets, token_ids, token_rows, _compute_dtype(hidden), rows_per_chunk)


def head_weights(head) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(weight, token_ids, token_rows) of an LM head: peft's trainable tokens (`trainable_token_indices`) keep
    the frozen weight and train a few of its rows; every other head is its weight alone."""
    layer = getattr(head, "token_adapter", None)
    if layer is None:
        return head.weight, None, None
    active = [a for a in layer.active_adapters if a in layer.token_indices]
    if layer.disable_adapters or layer.merged or not active:
        return layer.base_layer.weight, None, None
    weight = layer.base_layer.weight
    ids = torch.tensor([i for a in active for i in layer.token_indices[a]], device=weight.device)
    return weight, ids, torch.cat([layer.trainable_tokens_delta[a] for a in active])


def supports(model) -> bool:
    """True for a causal LM whose logits are hidden @ lm_head.weight.T, nothing more (no bias, softcap, scale,
    MoE router loss)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or head is None or getattr(head, "weight", None) is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, name, None) not in (None, 1.0) for name in LOGIT_TRANSFORMS):
        return False
    return getattr(head, "bias", None) is None and not getattr(text, "output_router_logits", False)


def add_fast_lm_head(model) -> bool:
    """Make `model(..., labels=..., fused_lm_head=True)` score through `head_nll`; any other call is the
    model's own forward. Takes a transformers model or a peft model (patches its base). Replaces trl's fused
    head if it is there. False (and nothing changed) for a model `supports` refuses."""
    from trl.trainer.utils import FusedCausalLMOutput

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not supports(base):
        return False
    own_forward = types.MethodType(type(base).forward, base)

    @functools.wraps(type(base).forward)  # generate() checks its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return own_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # the backbone (peft's LoRA layers inside)
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        sharded = hasattr(head, "unshard")  # FSDP2: this head's own forward never runs, so gather its weight here
        if sharded:
            head.unshard()
        weight, token_ids, token_rows = head_weights(head)
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != IGNORE_INDEX
        nll, top1 = head_nll(hidden[mask], weight, labels[mask], token_ids, token_rows)
        if sharded and not torch.is_grad_enabled():
            head.reshard()  # in training FSDP2 reshards it after the backward (and reduces its gradients first)
        # masked_scatter keeps an all-masked batch connected to the graph: a differentiable zero
        log_probs = nll.new_zeros(mask.shape).masked_scatter(mask, -nll)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=nll.sum() / denominator, log_probs=log_probs,
            entropy=torch.full(mask.shape, math.nan, device=mask.device),
            is_top1=torch.zeros_like(mask).masked_scatter(mask, top1), label_mask=mask)

    forward.tunebook_fast_head = True
    base.forward = types.MethodType(forward, base)
    return True


def is_installed(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.forward, "tunebook_fast_head", False)
