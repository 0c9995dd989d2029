"""The Q-Former (BLIP-2): learned queries that read patch features through cross-attention.

Queries and text share one stack of self-attention layers copied from a pretrained BERT-family encoder
(BERT, MiniLM, DistilBERT). A new, randomly initialised cross-attention block follows every
`cross_every`-th layer; only the queries use it. What queries and text may see of each other is set by
one of three masks (BLIP-2, Fig. 2):

    mode            used for  queries see       text sees
    unimodal        ITC       queries           text (bidirectional)
    bidirectional   ITM       queries + text    queries + text
    causal          ITG       queries           queries + earlier text

Padding is always masked. The three objectives are methods here so they can be read next to the masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

from qvlm import hub
from qvlm.config import ConfigError, QFormerConfig
from qvlm.models.dropout import Dropout
from qvlm.models.tiny import random_model, tiny_text_tokenizer

MODES = ("unimodal", "bidirectional", "causal")


def build_attention_mask(mode: str, num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Which positions each position may attend to in the joint sequence [queries; text].

    text_mask: [B, T], 1 for real tokens and 0 for padding.
    Returns a bool tensor [B, Nq+T, Nq+T]; True means "row may attend to column".
    Padding columns are masked for every row. Padding rows keep at least one visible column, so SDPA
    never sees an all-masked row (that would give NaN); their outputs are ignored downstream.
    """
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {MODES}")
    batch, text_len = text_mask.shape
    nq = num_queries
    total = nq + text_len
    visible = torch.cat([text_mask.new_ones(batch, nq), text_mask], dim=1).bool()  # [B, L]
    allowed = visible[:, None, :].expand(batch, total, total).clone()  # [B, L, L]
    if mode in ("unimodal", "causal"):
        allowed[:, :nq, nq:] = False  # queries never see text
    if mode == "unimodal":
        allowed[:, nq:, :nq] = False  # text never sees queries
    if mode == "causal":
        causal = torch.ones(text_len, text_len, dtype=torch.bool, device=text_mask.device).tril()
        allowed[:, nq:, nq:] &= causal
    return allowed


@dataclass
class TextEncoderSpec:
    """The shape of the BERT-family encoder the Q-Former is copied from (layout-independent)."""

    layout: str  # "bert" or "distilbert"
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    act: str

    @classmethod
    def from_config(cls, c) -> TextEncoderSpec:
        if c.model_type == "distilbert":
            return cls("distilbert", c.dim, c.n_layers, c.n_heads, c.hidden_dim, c.vocab_size,
                       c.max_position_embeddings, 0, 1e-12, c.activation)
        return cls("bert", c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
                   c.vocab_size, c.max_position_embeddings, getattr(c, "type_vocab_size", 0),
                   c.layer_norm_eps, c.hidden_act)


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention` (flash / memory-efficient kernels)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim or dim, dim)
        self.value = nn.Linear(kv_dim or dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D], context [B, S, Dkv], mask bool [B, 1, L, S] or None -> [B, L, D]."""
        b, length, dim = x.shape
        q, k = self._split(self.query(x)), self._split(self.key(context))  # [B, H, L, D/H], [B, H, S, D/H]
        v = self._split(self.value(context))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.out(y.transpose(1, 2).reshape(b, length, dim))

    def probabilities(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The unmasked attention weights `forward` applies (SDPA never returns them), for inspection:
        x [B, L, D], context [B, S, Dkv] -> [B, H, L, S], each row summing to 1."""
        q, k = self._split(self.query(x)), self._split(self.key(context))
        return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-1)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> one slice per head [B, H, N, D/H]."""
        return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, eps: float, dropout: float):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.act = nn.GELU() if "gelu" in act else nn.ReLU()
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.down(self.act(self.up(x)))))  # post-LN, as in BERT


class QFormerLayer(nn.Module):
    def __init__(self, spec: TextEncoderSpec, vision_width: int, has_cross: bool, separate_query_ffn: bool,
                 dropout: float):
        super().__init__()
        self.self_attn = Attention(spec.hidden, spec.heads, dropout=dropout)
        self.self_norm = nn.LayerNorm(spec.hidden, eps=spec.eps)
        self.cross_attn = Attention(spec.hidden, spec.heads, kv_dim=vision_width, dropout=dropout) if has_cross else None
        self.cross_norm = nn.LayerNorm(spec.hidden, eps=spec.eps) if has_cross else None
        self.ffn = FeedForward(spec.hidden, spec.intermediate, spec.act, spec.eps, dropout)
        self.query_ffn = (FeedForward(spec.hidden, spec.intermediate, spec.act, spec.eps, dropout)
                          if separate_query_ffn else None)
        self.drop = Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, num_queries: int,
                vision: torch.Tensor | None) -> torch.Tensor:
        """h [B, Nq+T, D]; mask bool [B, 1, Nq+T, Nq+T]; vision [B, P, Dv] -> [B, Nq+T, D]."""
        h = self.self_norm(h + self.drop(self.self_attn(h, h, mask)))
        queries, text = h[:, :num_queries], h[:, num_queries:]
        if self.cross_attn is not None and num_queries > 0:
            queries = self.cross_norm(queries + self.drop(self.cross_attn(queries, vision)))
        queries = (self.query_ffn or self.ffn)(queries)
        text = self.ffn(text)
        return torch.cat([queries, text], dim=1)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig, spec: TextEncoderSpec, vision_width: int):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        d = spec.hidden
        self.num_queries = cfg.num_queries
        self.word_embeddings = nn.Embedding(spec.vocab, d)
        self.position_embeddings = nn.Embedding(spec.max_positions, d)
        self.token_type_embedding = nn.Parameter(torch.zeros(d)) if spec.type_vocab else None
        self.embed_norm = nn.LayerNorm(d, eps=spec.eps)
        self.embed_drop = Dropout(cfg.dropout)
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, d) * 0.02)
        self.layers = nn.ModuleList(
            QFormerLayer(spec, vision_width, has_cross=(i % cfg.cross_every == 0),
                         separate_query_ffn=cfg.separate_query_ffn, dropout=cfg.dropout)
            for i in range(spec.layers)
        )
        # Heads (all new): ITC projections, ITM classifier, ITG language-model head tied to the embeddings.
        self.vision_proj = nn.Linear(d, cfg.embed_dim)
        self.text_proj = nn.Linear(d, cfg.embed_dim)
        self.itm_head = nn.Linear(d, 2)
        self.itg_transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=spec.eps))
        self.itg_bias = nn.Parameter(torch.zeros(spec.vocab))
        if not cfg.learn_temperature and not 0.001 <= cfg.temperature <= 0.5:
            raise ConfigError(f"qformer.temperature={cfg.temperature} is outside BLIP-2's range [0.001, 0.5]; "
                              "choose a value in it, or set qformer.learn_temperature=true to start there")
        init_temp = math.log(1.0 / cfg.temperature)
        self.log_inv_temp = nn.Parameter(torch.tensor(init_temp), requires_grad=cfg.learn_temperature)
        self._init_new_weights()

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def build(cls, cfg: QFormerConfig, vision_width: int, device: str | torch.device = "cpu"):
        """Build the Q-Former and copy embeddings and layers from `cfg.name` (or its `random_init`).

        Returns (qformer, tokenizer). On `device="meta"` nothing is allocated or copied (parameter counts).
        """
        if cfg.random_init is not None:
            encoder = random_model(AutoModel, cfg.random_init, device=device)
            tokenizer = tiny_text_tokenizer()
        else:
            encoder = hub.from_pretrained(AutoModel.from_pretrained, cfg.name, "Q-Former text encoder",
                                         use_safetensors=True)
            tokenizer = hub.from_pretrained(AutoTokenizer.from_pretrained, cfg.name, "Q-Former tokenizer")
        spec = TextEncoderSpec.from_config(encoder.config)
        with torch.device(device):
            qformer = cls(cfg, spec, vision_width)
        if str(device) != "meta":
            qformer.copy_from_text_encoder(encoder)
        return qformer, tokenizer

    def _init_new_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def copy_from_text_encoder(self, encoder: nn.Module) -> None:
        """Copy embeddings and every layer's self-attention and FFN (BERT or DistilBERT layout)."""
        sd = encoder.state_dict()
        if self.spec.layout == "distilbert":
            emb, names = "embeddings.", _DISTILBERT_LAYER
            layer_prefix = "transformer.layer.{}."
        else:
            emb, names = "embeddings.", _BERT_LAYER
            layer_prefix = "encoder.layer.{}."
        sd = {k.removeprefix("bert."): v for k, v in sd.items()}
        with torch.no_grad():
            self.word_embeddings.weight.copy_(sd[emb + "word_embeddings.weight"])
            self.position_embeddings.weight.copy_(sd[emb + "position_embeddings.weight"])
            if self.token_type_embedding is not None:
                self.token_type_embedding.copy_(sd[emb + "token_type_embeddings.weight"][0])
            self.embed_norm.weight.copy_(sd[emb + "LayerNorm.weight"])
            self.embed_norm.bias.copy_(sd[emb + "LayerNorm.bias"])
            for i, layer in enumerate(self.layers):
                ours = layer.state_dict()
                for our_name, their_name in names.items():
                    ours[our_name].copy_(sd[layer_prefix.format(i) + their_name])
                if layer.query_ffn is not None:
                    layer.query_ffn.load_state_dict(layer.ffn.state_dict())

    def pretrained_parameter_names(self) -> set[str]:
        """Names of parameters copied from the text encoder (they get the low learning rate)."""
        copied = {"word_embeddings.weight", "position_embeddings.weight", "embed_norm.weight", "embed_norm.bias"}
        if self.token_type_embedding is not None:
            copied.add("token_type_embedding")
        for i in range(len(self.layers)):
            copied |= {f"layers.{i}.{name}" for name in _BERT_LAYER}
        return copied

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, vision: torch.Tensor | None, input_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, mode: str = "unimodal",
                use_queries: bool = True) -> torch.Tensor:
        """Run [queries; text] through the layers under one attention mode.

        vision [B, P, Dv] patch features (None when use_queries=False); input_ids/text_mask [B, T].
        Returns hidden states [B, Nq+T, D] (Nq = 0 without queries, T = 0 without text).
        """
        parts, batch = [], (vision.shape[0] if vision is not None else input_ids.shape[0])
        nq = self.num_queries if use_queries else 0
        if use_queries:
            parts.append(self.query_tokens.expand(batch, -1, -1))
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions)
            if self.token_type_embedding is not None:
                text = text + self.token_type_embedding
            parts.append(text)
            text_mask = text_mask if text_mask is not None else torch.ones_like(input_ids)
        else:
            text_mask = torch.ones(batch, 0, dtype=torch.long, device=vision.device)
        h = self.embed_drop(self.embed_norm(torch.cat(parts, dim=1)))
        mask = None
        if nq == 0 or input_ids is not None:
            mask = build_attention_mask(mode, nq, text_mask)[:, None]  # [B, 1, L, L]
        for layer in self.layers:
            h = layer(h, mask, nq, vision)
        return h

    def image_queries(self, vision: torch.Tensor) -> torch.Tensor:
        """Patch features [B, P, Dv] -> query outputs [B, Nq, D] (what stage 2 feeds the adapter)."""
        return self(vision, use_queries=True)

    def instructed_queries(self, vision: torch.Tensor, input_ids: torch.Tensor,
                           text_mask: torch.Tensor) -> torch.Tensor:
        """Query outputs that have read the instruction too (InstructBLIP): [B, P, Dv], [B, T] -> [B, Nq, D].

        The instruction's tokens join the queries' self-attention under the ITM mask (bidirectional),
        so the queries extract what the question asks about, not only a fixed summary of the image.
        """
        return self(vision, input_ids, text_mask, mode="bidirectional")[:, : self.num_queries]

    @torch.no_grad()
    def query_attention(self, vision: torch.Tensor, input_ids: torch.Tensor | None = None,
                        text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Where each query looks: its cross-attention weights over the image tokens, averaged over heads
        and over the cross-attention layers. [B, P, Dv] -> [B, Nq, P], each row summing to 1.

        With `input_ids` / `text_mask` (an instruction-aware model), the queries have read that text too,
        as they do in stage 2."""
        maps: list[torch.Tensor] = []  # one [B, Nq, P] per cross-attention layer

        def record(module: Attention, args: tuple, output: torch.Tensor) -> None:
            queries, image = args[:2]
            maps.append(module.probabilities(queries, image).float().mean(dim=1))

        hooks = [layer.cross_attn.register_forward_hook(record) for layer in self.layers
                 if layer.cross_attn is not None]
        try:
            if input_ids is None:
                self.image_queries(vision)
            else:
                self.instructed_queries(vision, input_ids, text_mask)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack(maps).mean(dim=0)

    def image_embeds(self, vision: torch.Tensor) -> torch.Tensor:
        """[B, P, Dv] -> L2-normalised ITC embeddings per query [B, Nq, E]."""
        return F.normalize(self.vision_proj(self.image_queries(vision)), dim=-1)

    def text_embeds(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] -> L2-normalised ITC embedding [B, E] of the text alone (no queries): its [CLS] token or,
        with `text_pooling="mean"`, the mean over its tokens (padding excluded)."""
        h = self(None, input_ids, text_mask, use_queries=False)  # [B, T, D]
        if self.cfg.text_pooling == "mean":
            weights = text_mask.unsqueeze(-1).to(h.dtype)  # [B, T, 1]
            pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            pooled = h[:, 0]
        return F.normalize(self.text_proj(pooled), dim=-1)

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """[Ni, Nq, E] x [Nt, E] -> cosine similarity [Ni, Nt] (max or mean over queries, per config)."""
        if self.cfg.itc_pooling == "max":  # BLIP-2: the best-matching query
            return torch.einsum("iqe,te->iqt", image_embeds, text_embeds).max(dim=1).values
        pooled = F.normalize(image_embeds.mean(dim=1), dim=-1)  # article: mean of queries vs [CLS]
        return pooled @ text_embeds.t()

    @property
    def inv_temperature(self) -> torch.Tensor:
        # BLIP-2 clamps the learnable temperature to [0.001, 0.5]; a fixed one is checked at construction.
        inv = self.log_inv_temp.exp()
        return inv.clamp(2.0, 1000.0) if self.cfg.learn_temperature else inv

    # -- the three stage-1 objectives --------------------------------------------------------------

    def itc_loss(self, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over the rows of this process's b items against all B items of the batch.

        sim_i2t [b, B]: its images vs every caption; sim_t2i [b, B]: its captions vs every image;
        positives bool [b, B] (pairs are symmetric, so one matrix serves both directions). Repeated
        captions count as positives, not false negatives: the target is uniform over a row's positives.
        On one process b == B, sim_t2i == sim_i2t.T.
        """
        targets = positives.float() / positives.sum(1, keepdim=True)
        i2t = -(targets * (sim_i2t * self.inv_temperature).log_softmax(dim=1)).sum(1).mean()
        t2i = -(targets * (sim_t2i * self.inv_temperature).log_softmax(dim=1)).sum(1).mean()
        return (i2t + t2i) / 2

    def itm_loss(self, vision: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
                 sim: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """Image-text matching with hard negatives drawn from the ITC similarities (BLIP-2 / ALBEF):
        each image gets a negative text and each text a negative image, sampled ∝ softmax(sim)."""
        with torch.no_grad():
            scaled = sim.float() * self.inv_temperature
            w_i2t = scaled.softmax(dim=1).masked_fill(positives, 0)  # [B, B] over texts, per image
            w_t2i = scaled.t().softmax(dim=1).masked_fill(positives.t(), 0)  # over images, per text
            # A row whose every candidate is a positive (all captions equal) has no negative: drop it.
            has_neg_text, has_neg_image = w_i2t.sum(1) > 0, w_t2i.sum(1) > 0
            neg_text = torch.multinomial(w_i2t + (~has_neg_text)[:, None].float(), 1).squeeze(1)
            neg_image = torch.multinomial(w_t2i + (~has_neg_image)[:, None].float(), 1).squeeze(1)
        vis = torch.cat([vision, vision, vision[neg_image]])  # pos, (image, neg text), (neg image, text)
        ids = torch.cat([input_ids, input_ids[neg_text], input_ids])
        mask = torch.cat([text_mask, text_mask[neg_text], text_mask])
        labels = torch.cat([torch.ones_like(neg_text), torch.zeros_like(neg_text), torch.zeros_like(neg_text)])
        keep = torch.cat([torch.ones_like(has_neg_text), has_neg_text, has_neg_image])
        h = self(vis[keep], ids[keep], mask[keep], mode="bidirectional")
        logits = self.itm_head(h[:, : self.num_queries]).mean(dim=1)  # [3B, 2]
        return F.cross_entropy(logits, labels[keep])

    def itm_scores(self, vision: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Match probability for aligned pairs: vision [N, P, Dv], text [N, T] -> [N]."""
        h = self(vision, input_ids, text_mask, mode="bidirectional")
        return self.itm_head(h[:, : self.num_queries]).mean(dim=1).softmax(-1)[:, 1]

    def itg_loss(self, vision: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Image-grounded text generation: text predicts its next token seeing queries + earlier text.
        The first text token ([CLS]) acts as the BOS token."""
        h = self(vision, input_ids, text_mask, mode="causal")[:, self.num_queries:]  # [B, T, D]
        logits = F.linear(self.itg_transform(h[:, :-1]), self.word_embeddings.weight, self.itg_bias)
        labels = input_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


# Our layer parameter names -> theirs, per layout.
_BERT_LAYER = {
    "self_attn.query.weight": "attention.self.query.weight", "self_attn.query.bias": "attention.self.query.bias",
    "self_attn.key.weight": "attention.self.key.weight", "self_attn.key.bias": "attention.self.key.bias",
    "self_attn.value.weight": "attention.self.value.weight", "self_attn.value.bias": "attention.self.value.bias",
    "self_attn.out.weight": "attention.output.dense.weight", "self_attn.out.bias": "attention.output.dense.bias",
    "self_norm.weight": "attention.output.LayerNorm.weight", "self_norm.bias": "attention.output.LayerNorm.bias",
    "ffn.up.weight": "intermediate.dense.weight", "ffn.up.bias": "intermediate.dense.bias",
    "ffn.down.weight": "output.dense.weight", "ffn.down.bias": "output.dense.bias",
    "ffn.norm.weight": "output.LayerNorm.weight", "ffn.norm.bias": "output.LayerNorm.bias",
}
_DISTILBERT_LAYER = {
    "self_attn.query.weight": "attention.q_lin.weight", "self_attn.query.bias": "attention.q_lin.bias",
    "self_attn.key.weight": "attention.k_lin.weight", "self_attn.key.bias": "attention.k_lin.bias",
    "self_attn.value.weight": "attention.v_lin.weight", "self_attn.value.bias": "attention.v_lin.bias",
    "self_attn.out.weight": "attention.out_lin.weight", "self_attn.out.bias": "attention.out_lin.bias",
    "self_norm.weight": "sa_layer_norm.weight", "self_norm.bias": "sa_layer_norm.bias",
    "ffn.up.weight": "ffn.lin1.weight", "ffn.up.bias": "ffn.lin1.bias",
    "ffn.down.weight": "ffn.lin2.weight", "ffn.down.bias": "ffn.lin2.bias",
    "ffn.norm.weight": "output_layer_norm.weight", "ffn.norm.bias": "output_layer_norm.bias",
}
