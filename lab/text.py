"""The lab model's text encoder: CLIP-L geometry whose 12 transformer layers are exact identities
(zero attention output and MLP output projections, unit layer norms), so the conditioning of a
prompt is ``final_layer_norm(token_embedding[ids] + position_embedding)`` and only the embedding
rows of the prompt words (and the 77 positions) carry weights. ComfyUI's stock loader reads the
assembled CLIP-L as SD15's text encoder; the shipped file holds only the non-zero rows.
"""
from __future__ import annotations

import torch

WIDTH, POSITIONS, VOCAB = 768, 77, 49408


def tokenizer():
    import comfy.sd1_clip

    return comfy.sd1_clip.SDTokenizer()


def token_ids(texts) -> torch.Tensor:
    """``[len(texts), 77]`` token ids exactly as ComfyUI's SD1 tokenizer pads them."""
    tok = tokenizer()
    rows = []
    for text in texts:
        (pairs,) = tok.tokenize_with_weights(text)[:1]
        rows.append([int(t) for t, *_ in pairs])
    return torch.tensor(rows, dtype=torch.long)


class LabText(torch.nn.Module):
    """Trainable rows of the token embedding for ``vocab`` (token ids) and the position embedding."""

    def __init__(self, vocab: list[int], seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("vocab", torch.tensor(sorted(set(vocab)), dtype=torch.long))
        self.rows = torch.nn.Parameter(torch.randn(len(self.vocab), WIDTH, generator=g) * 0.5)
        self.position = torch.nn.Parameter(torch.randn(POSITIONS, WIDTH, generator=g) * 0.05)

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        lookup = torch.full((VOCAB,), -1, dtype=torch.long)
        lookup[self.vocab] = torch.arange(len(self.vocab))
        out = lookup[ids]
        if (out < 0).any():
            raise ValueError("a prompt uses a token outside the lab vocabulary")
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, 77]`` token ids -> ``[B, 77, 768]`` conditioning (what CLIPTextEncode returns)."""
        x = self.rows[self.index(ids)] + self.position
        return torch.nn.functional.layer_norm(x, (WIDTH,), eps=1e-5)

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The full CLIP-L state dict (keys as in an SD1.5 checkpoint under ``cond_stage_model.transformer.``)."""
        import comfy.sd1_clip

        clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
        sd = {}
        for key, value in clip.transformer.state_dict().items():
            if key.endswith("layer_norm1.weight") or key.endswith("layer_norm2.weight") or key.endswith("final_layer_norm.weight"):
                sd[key] = torch.ones_like(value)
            else:
                sd[key] = torch.zeros_like(value)
        emb = sd["text_model.embeddings.token_embedding.weight"]
        emb[self.vocab] = self.rows.detach().float()
        sd["text_model.embeddings.position_embedding.weight"] = self.position.detach().float().clone()
        if "text_projection.weight" in sd:
            sd["text_projection.weight"] = torch.eye(WIDTH)
        return sd
