"""The identifier's input embedding, trained with the tuners: pivotal tuning (Roich et al. 2022; in
diffusers' DreamBooth scripts `--train_text_encoder_ti`), with the identifier an existing word.

With e_w the text encoder's input embedding of token w and δ_w a learned row per token of the
identifier (zero at start), the text encoder reads

    e'_w = e_w + s·δ_w   for w among the identifier's tokens,   e'_w = e_w   for every other token,

s being the tuner's strength (`set_scale`). Every prompt without the identifier is encoded exactly
as before, at any strength; at strength 0, or at attach, so is every prompt. The U-Net then sees the
concept's word as a distinct, learned signal in every cross-attention, which is what lets its
tuners learn "draw this when the identifier is named" instead of "draw this" (docs/benchmarks.md,
"Res-Tuning: what makes it learn").

Why not diffusers' `load_textual_inversion`: it adds new tokens to the tokenizer and refuses a word
already in its vocabulary, so a prompt would have to name "<s0>" instead of the word the user chose;
here the word keeps its token and only its input row moves, in a module beside the frozen
embedding table that per-sample routing (`restuning.route`) and the strength reach like any tuner.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .core import AttachError, Attached, add_residual, attached, keep_tuners_out_of_state

# The pipeline attributes of the text encoders and their tokenizers (SDXL has two of each).
ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


class IdentifierEmbedding(nn.Module):
    """δ: one learned row per token of the identifier, added where the prompt holds that token."""

    def __init__(self, token_ids: list[int], width: int):
        super().__init__()
        self.token_ids = list(token_ids)
        self.delta = nn.Parameter(torch.zeros(len(token_ids), width))

    def forward(self, input_ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Σ_j [input_ids == id_j] δ_j, shaped like the embeddings of `input_ids`."""
        ids = torch.tensor(self.token_ids, device=input_ids.device)
        hits = (input_ids.unsqueeze(-1) == ids).to(self.delta.dtype)  # (batch, tokens, n)
        return (hits @ self.delta).to(dtype)


def token_ids(tokenizer, identifier: str) -> list[int]:
    """The identifier's own tokens; AttachError if it has none. Special tokens are left out: a
    tokenizer may spell an unknown piece as its end or padding token, which every prompt holds."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in tokenizer(identifier, add_special_tokens=False).input_ids if i not in special]
    if not ids:
        raise AttachError(f"the identifier {identifier!r} has no tokens of its own in this tokenizer (only special or unknown ones)")
    return list(dict.fromkeys(ids))


def attach_identifier(handle: Attached, identifier: str, encoders: dict, owner: nn.Module) -> None:
    """Add the identifier's learned rows to every text encoder of `encoders` ({pipeline attribute:
    (text encoder, tokenizer)}), as part of `handle` (keys `<attribute>.identifier`); the text
    encoders' own weights are frozen, and kept as the base model's in their state dicts."""
    if not encoders:
        raise AttachError(f"this tuner trains the embedding of its identifier {identifier!r}, which lives in the text encoder: "
                          "pass the pipeline (restuning.load(pipe, path)) or text_encoder= and tokenizer=")
    earlier = {id(p) for a in attached(owner).values() for p in a.parameters()}
    for attribute, (encoder, tokenizer) in encoders.items():
        if tokenizer is None:
            raise AttachError(f"the identifier {identifier!r} needs {attribute}'s tokenizer to find its tokens: pass the pipeline, "
                              "or tokenizer= beside text_encoder=")
        for p in encoder.parameters():
            if id(p) not in earlier:
                p.requires_grad_(False)
        table = encoder.get_input_embeddings()
        module = IdentifierEmbedding(token_ids(tokenizer, identifier), table.embedding_dim).to(table.weight.device)
        if not hasattr(table, "restuners"):
            table.restuners = nn.ModuleDict()
        table.restuners[handle.name] = module

        def hook(embedding, args, output, module=module):
            return add_residual(output, lambda: module(args[0], output.dtype), handle.name, handle.scale)

        def undo(table=table):
            del table.restuners[handle.name]
            if len(table.restuners) == 0:
                del table.restuners

        handle.handles.append(table.register_forward_hook(hook))
        handle.undo.append(undo)
        handle.modules[f"{attribute}.identifier"] = module
        keep_tuners_out_of_state(encoder, owner)

