"""Which parameters Muon trains and which AdamW trains: by module, not by name (docs/design.md §2).

MuLoCo's recipe (after Muon and Moonlight) keeps Muon for the hidden matrices and gives AdamW
the embeddings, the output head, norms and biases. DeepSpeed picks Muon parameters by name
(a 2-D parameter whose name lacks "embed" and "lm_head"), which silently sends a Hugging Face
GPT-2's `wte`/`wpe` to Muon. Here the role follows from the module that owns a parameter:

- every `nn.Embedding` (token and position embeddings, subclasses included): AdamW;
- the output head: `get_output_embeddings()` where the model has it (Hugging Face models),
  else the last `nn.Linear` onto the token embedding's vocabulary outside the layer stack (no
  numeric index in its name); tied to the embedding or not: AdamW;
- any parameter that is not at least 2-D as a layer (norm gains, biases, scalars): AdamW;
- a name matching one of `streaming_muloco.inner.adamw_params` (regexes, `re.search`): AdamW;
- every other weight of 2 or more dimensions: Muon.

The split is a pure function of the model, so it is computed, checked and printed before any
process group exists, and handed to DeepSpeed in place of its own name-based tags.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

MUON, ADAMW = "muon", "adamw"


def layer_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape as a layer (under ZeRO-3's zero.Init the data is a flat placeholder)."""
    ds_shape = getattr(param, "ds_shape", None)
    return tuple(param.shape) if ds_shape is None else tuple(ds_shape)


def _hf_module(model: nn.Module, getter: str) -> nn.Module | None:
    """What a Hugging Face model's `get_input_embeddings` / `get_output_embeddings` returns, or
    None for models without the method (or whose method is not implemented or returns None)."""
    get = getattr(model, getter, None)
    if callable(get):
        with contextlib.suppress(NotImplementedError, AttributeError):
            module = get()
            if isinstance(module, nn.Module):
                return module
    return None


def _token_embedding(model: nn.Module) -> nn.Module | None:
    emb = _hf_module(model, "get_input_embeddings")
    if emb is not None:
        return emb
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(embeddings, key=lambda m: m.num_embeddings) if embeddings else None


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps hidden states to vocabulary logits, or None if none is found."""
    head = _hf_module(model, "get_output_embeddings")
    if head is not None:
        return head
    emb = _token_embedding(model)
    if not isinstance(emb, nn.Embedding):
        return None
    # Outside the layer stack only: an MLP can map onto as many features as the vocabulary has
    # tokens (the bundled tiny model's 64 -> 256), but it sits under a numeric index (blocks.1).
    heads = [m for name, m in model.named_modules() if isinstance(m, nn.Linear)
             and m.out_features == emb.num_embeddings and not any(part.isdigit() for part in name.split("."))]
    return heads[-1] if heads else None


@dataclass(frozen=True)
class RoleSplit:
    """Each parameter's inner optimizer and why (names as `model.named_parameters()` gives them)."""

    roles: dict[str, str]  # name -> MUON | ADAMW
    reasons: dict[str, str]  # name -> "matrix", "embedding", "output head", "1-D", "adamw_params 're'"
    numels: dict[str, int]

    def names(self, role: str) -> list[str]:
        return [n for n, r in self.roles.items() if r == role]

    def summary(self) -> str:
        """One line per role: tensor count, parameter total and, for AdamW, the reasons."""
        lines = []
        for role, label in ((MUON, "Muon"), (ADAMW, "AdamW")):
            names = self.names(role)
            total = sum(self.numels[n] for n in names)
            line = f"{label}: {len(names)} tensors, {total:,} params"
            if role == ADAMW and names:
                by_reason: dict[str, list[str]] = {}
                for n in names:
                    by_reason.setdefault(self.reasons[n], []).append(n)
                parts = []
                for reason, members in by_reason.items():
                    shown = ", ".join(members[:4]) + (f", ... ({len(members)} in all)" if len(members) > 4 else "")
                    parts.append(f"{reason}: {shown}")
                line += " (" + "; ".join(parts) + ")"
            lines.append(line)
        return "\n".join(lines)


def split_roles(model: nn.Module, adamw_params: tuple[str, ...] | list[str] = ()) -> RoleSplit:
    """Assign MUON or ADAMW to every parameter of `model` (rules in the module docstring).

    Raises ValueError for a pattern that does not compile or matches no parameter (a typo
    there would otherwise leave the parameter it meant on Muon without a word).
    """
    patterns = []
    for pat in adamw_params:
        try:
            patterns.append((pat, re.compile(pat)))
        except re.error as e:
            raise ValueError(f"adamw_params pattern {pat!r} is not a valid regular expression: {e}") from None
    head = output_head(model)
    owner_kind: dict[int, str] = {}
    for module in model.modules():
        kind = ("embedding" if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
                else "output head" if module is head else None)
        if kind is None:
            continue
        for p in module.parameters(recurse=False):
            owner_kind.setdefault(id(p), kind)  # a tied head's weight is the embedding's: either is AdamW
    roles, reasons, numels = {}, {}, {}
    matched = {pat: False for pat, _ in patterns}
    for name, p in model.named_parameters():
        numels[name] = p.numel() if getattr(p, "ds_numel", None) is None else int(p.ds_numel)
        hit = next((pat for pat, rx in patterns if rx.search(name)), None)
        if hit is not None:
            matched[hit] = True
            reason = f"adamw_params {hit!r}"
        elif id(p) in owner_kind:
            reason = owner_kind[id(p)]
        elif len(layer_shape(p)) < 2:
            reason = "1-D"
        else:
            reason = "matrix"
        roles[name] = MUON if reason == "matrix" else ADAMW
        reasons[name] = reason
    unused = [pat for pat, hit in matched.items() if not hit]
    if unused:
        raise ValueError(f"adamw_params pattern(s) {unused} match no parameter name (names look like "
                         f"{list(roles)[:3]})")
    return RoleSplit(roles, reasons, numels)


def tag(model: nn.Module, split: RoleSplit) -> None:
    """Set DeepSpeed's `use_muon` flag on every parameter from the split."""
    for name, p in model.named_parameters():
        p.use_muon = split.roles[name] == MUON


@contextlib.contextmanager
def deepspeed_tags_from(split: RoleSplit) -> Iterator[None]:
    """Within this block, DeepSpeed's Muon tagging (`deepspeed.set_optimizer_flags`, called by
    `deepspeed.initialize` and the engine) ends with our split instead of its name rule.

    DeepSpeed's own function still runs first, so whatever else it records (per-head Muon
    metadata) stays; only `use_muon` is overwritten. Looked up at call time by DeepSpeed, so
    replacing the module attribute reaches both callers without copying their code.
    """
    import deepspeed

    original = deepspeed.set_optimizer_flags

    def set_optimizer_flags(config_class, model: nn.Module) -> None:  # DeepSpeed's signature
        original(config_class, model)
        if any(hasattr(p, "use_muon") for p in model.parameters()):
            tag(model, split)

    deepspeed.set_optimizer_flags = set_optimizer_flags
    try:
        yield
    finally:
        deepspeed.set_optimizer_flags = original
