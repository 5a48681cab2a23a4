"""A LoRA taken from a full fine-tune: each layer's weight change, truncated by SVD.

A full student differs from its teacher by ``dW = W_student - W_teacher`` in every layer. For
each ``nn.Linear`` and ``nn.Conv2d`` (a convolution's kernel read as an ``out x (in k k)``
matrix) the best rank-R approximation of ``dW`` in the Frobenius norm is its truncated SVD
(Eckart-Young): ``dW ~ U_R S_R V_R^T``, written as LoRA factors ``B = U_R sqrt(S_R)``,
``A = sqrt(S_R) V_R^T`` (a convolution's ``A`` keeps the layer's kernel, stride and padding,
its ``B`` is 1x1, as peft's conv LoRA). A changed bias goes into peft's ``lora_B.bias``
(``lora_bias``), which diffusers loads. Each layer gets rank ``min(R, rank of dW)``; with R at
least every layer's full rank the LoRA reproduces the student's linear and convolution
layers exactly. Other changed parameters (normalisation scales, embeddings' tables) have no
LoRA form: :func:`lora_from_full` lists them with their relative change, so a user can see
what the LoRA leaves out.
"""
from __future__ import annotations

import torch
from torch import nn


def lora_from_full(student: nn.Module, base: nn.Module, rank: int) -> tuple[dict, dict]:
    """``(state, report)``: a peft-named LoRA state dict (``<module>.lora_A.weight``,
    ``<module>.lora_B.weight`` and, where any bias changed, ``<module>.lora_B.bias``, scale
    1: alpha = rank per layer) that turns ``base`` into ``student`` up to rank ``rank``.

    Args:
        student: the full student network (same architecture as ``base``).
        base: the teacher's network (adapters on it, if any, are ignored).
    Returns:
        report: ``{"rank", "layers", "energy_kept"}`` (the share of the squared Frobenius norm
        of all weight changes the LoRA keeps) and ``"not_represented"``: ``{name: relative
        change}`` of changed parameters outside linear / convolution layers.
    """
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    theirs = {n.replace(".base_layer", ""): p for n, p in base.named_parameters()
              if "lora_" not in n}
    ours = dict(student.named_parameters())
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise ValueError(f"the student has parameters its base lacks ({missing[:3]} ...): not "
                         "a fine-tune of this base")
    covered, state = set(), {}
    kept = total = 0.0
    layers = []
    for name, module in student.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or (
                isinstance(module, nn.Conv2d) and module.groups != 1):
            continue
        covered.add(f"{name}.weight")
        dW = (module.weight.detach() - theirs[f"{name}.weight"].detach()).float().cpu()
        db = None
        if module.bias is not None:
            covered.add(f"{name}.bias")
            db = (module.bias.detach() - theirs[f"{name}.bias"].detach()).float().cpu()
            db = db if db.abs().max() > 0 else None
        if dW.abs().max() == 0 and db is None:
            continue
        out = dW.shape[0]
        U, S, Vh = torch.linalg.svd(dW.reshape(out, -1), full_matrices=False)
        r = min(rank, S.numel())
        kept += float(S[:r].square().sum())
        total += float(S.square().sum())
        root = S[:r].sqrt()
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        if isinstance(module, nn.Conv2d):
            A, B = A.reshape(r, *dW.shape[1:]), B.reshape(out, r, 1, 1)
        state[f"{name}.lora_A.weight"] = A.contiguous()
        state[f"{name}.lora_B.weight"] = B.contiguous()
        layers.append((name, db))
    if any(db is not None for _, db in layers):
        # lora_bias is one switch for the whole adapter: every layer then carries a bias
        for name, db in layers:
            out = state[f"{name}.lora_B.weight"].shape[0]
            state[f"{name}.lora_B.bias"] = db if db is not None else torch.zeros(out)
    left = {}
    for n, p in ours.items():
        if n in covered:
            continue
        change = (p.detach() - theirs[n].detach()).float()
        if change.abs().max() > 0:
            left[n] = round(float(change.norm() / theirs[n].detach().float().norm()
                                  .clamp_min(1e-12)), 6)
    report = {"rank": rank, "layers": len(layers),
              "energy_kept": round(kept / total, 6) if total else 1.0,
              "not_represented": left}
    return state, report
