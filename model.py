"""DeepSeek-V3 in one file, to be read beside the technical report (arXiv 2412.19437).

Part 1, the model: the architecture alone, bottom-up, every piece before its use.
    ModelArgs ............ hyper-parameters and presets ("tiny", "small", "deepseek-v3")
    RMSNorm, RoPE/YaRN ... §2.1.1, eq. 1-11 (decoupled RoPE), context extension §4.3
    MLA .................. §2.1.1: Multi-head Latent Attention, expanded and absorbed forms
    MLP, Gate, MoE ....... §2.1.2: DeepSeekMoE, sigmoid gating, group-limited routing, aux-loss-free bias
    Block, MTPModule ..... §2.2: Multi-Token Prediction
    Transformer .......... trunk, forward with its losses (eq. 17-20, 25), SFT sample masking (§5.1),
                           the bias update
Part 2, the engineering, each section acting on the built model from outside:
    FP8 .................. §3.3: 1x128 activation tiles, 128x128 weight blocks, e4m3, fp32 accumulation;
                           the Hopper tensor-core path and FP8 weight storage
    expert back-ends ..... part 1's loop over experts as a gather, grouped or batched GEMMs, or per-expert products
    generation ........... latent KV cache, plain and MTP speculative decoding, sampling (§2.2, §5.4.3)
    parallelism .......... tensor-parallel attention and FFN, expert-parallel MoE (§3.4), applied by shard()
    checkpoint I/O ....... the published Hugging Face layout (BF16 or FP8 with 128x128 block scales),
                           the tokenizer's side files (begin, end and FIM token ids)
    accounting ........... parameters, FLOPs, KV-cache and per-rank weight bytes without allocating (meta device)

Shape letters: B batch, T query tokens, S cached keys, D model dim, H heads, C kv_lora_rank,
R qk_rope_head_dim, E routed experts, K experts per token, N tokens (B*T), I expert width, V vocabulary.
"""
import contextlib
import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


# ==============================================================================================
# Part 1: the model
# ==============================================================================================

@dataclass
class ModelArgs:
    vocab_size: int = 260              # 256 bytes + 4 specials for our byte tokenizer
    dim: int = 256
    inter_dim: int = 768               # dense SwiGLU width (first n_dense_layers layers)
    n_layers: int = 4
    n_dense_layers: int = 1            # "first_k_dense_replace": V3 keeps 3 dense layers (§4.2)
    n_heads: int = 4                   # n_h
    norm_eps: float = 1e-6
    max_seq_len: int = 1024
    init_std: float = 0.006            # §4.2; presets scale it with 1/sqrt(dim) for toy widths
    # mla (§2.1.1)
    q_lora_rank: int = 128             # d_c': query compression; 0 = one plain wq (V2-Lite style)
    kv_lora_rank: int = 64             # d_c: the latent that the cache keeps
    qk_nope_head_dim: int = 32         # d_h
    qk_rope_head_dim: int = 16         # d_h^R: the decoupled RoPE part, one key head shared by all
    v_head_dim: int = 32
    # moe (§2.1.2)
    moe_inter_dim: int = 128           # width of one fine-grained expert
    n_routed_experts: int = 16         # N_r
    n_shared_experts: int = 1          # N_s
    n_activated_experts: int = 4       # K_r of eq. 14, 16, 18
    n_expert_groups: int = 4           # node-limited routing, simulated by groups (§2.1.2)
    n_limited_groups: int = 2          # M: groups a token may use
    score_func: str = "sigmoid"        # V3: sigmoid + bias; "softmax" = V2 family
    route_scale: float = 2.5           # routed_scaling_factor
    norm_topk_prob: bool = True        # eq. 13: normalise the K chosen affinities
    balance_alpha: float = 1e-4        # α of the sequence-wise balance loss, eq. 17-20
    balance_scope: str = "sequence"    # f, P of eq. 18, 20 per "sequence" (§2.1.2) or per "batch" (§4.5.3)
    bias_update_speed: float = 1e-3    # γ of the aux-loss-free bias update (§2.1.2, §4.2)
    # mtp (§2.2)
    n_mtp: int = 1                     # D, MTP depth; V3 uses 1
    # yarn (§4.3); rope_factor 1 = plain RoPE
    rope_theta: float = 10000.0
    rope_factor: float = 1.0           # s: context extension factor (40 for V3's 128K)
    original_seq_len: int = 4096
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    # fp8 (§3.3), both applied by part 2's FP8 section
    fp8: bool = False                  # train with FP8 GEMMs (emulated off Hopper)
    fp8_weights: bool = False          # keep projection weights in FP8 with 128x128 scales (inference)

    def __post_init__(self):
        positive = {"vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "kv_lora_rank",
                    "qk_rope_head_dim", "v_head_dim", "n_expert_groups", "n_limited_groups"}
        # the other sizes may be 0 (q_lora_rank, n_mtp; n_routed_experts for a dense-only model)
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v) is int and (v < 0 or v == 0 and f.name in positive):
                raise ValueError(f"ModelArgs.{f.name} must be {'positive' if f.name in positive else '>= 0'}, got {v}")
        E, G, M = self.n_routed_experts, self.n_expert_groups, self.n_limited_groups
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even (RoPE rotates pairs of dims)")
        if not E and self.n_dense_layers < self.n_layers:
            raise ValueError(f"ModelArgs.n_routed_experts is 0 but layers {self.n_dense_layers} to {self.n_layers - 1} "
                             f"are MoE layers; set n_dense_layers={self.n_layers} (dense only) or n_routed_experts > 0")
        if E and (E % G or not (0 < self.n_activated_experts <= M * (E // G) and M <= G)):
            raise ValueError("need n_routed_experts divisible by n_expert_groups, n_limited_groups <= "
                             "n_expert_groups and 0 < n_activated_experts <= n_limited_groups * experts per group")
        if self.score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}")
        if self.balance_scope not in ("sequence", "batch"):
            raise ValueError(f"balance_scope must be 'sequence' or 'batch', got {self.balance_scope!r}")

    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf_config(cls, config):  # a published config.json; see "Checkpoint I/O"
        return args_from_hf_config(config)

    def to_hf_config(self):
        return hf_config(self)


PRESETS = {
    # Parameter counts are accounting()'s: the main model with its embedding and output head,
    # "active" counting K_r of the N_r routed experts; the MTP module comes on top (train.py's
    # sum(p.numel() for p in model.parameters()) includes it).
    # tiny: 6.26M parameters (2.72M active; 6.13M without embedding and head), 8.19M with the
    # 1.93M of the MTP module. Trains on a 2-core laptop CPU in minutes. init_std is the
    # paper's 0.006 scaled by sqrt(7168 / 256), keeping the initial activation scale of V3.
    # γ = 0.01 rather than 0.001: a run of 1,000 steps must balance within tens of steps.
    "tiny": dict(init_std=0.006 * math.sqrt(7168 / 256), max_seq_len=1024, bias_update_speed=0.01),
    # 0.47B parameters (0.13B active), 0.52B with the MTP module: one GPU.
    "small": dict(bias_update_speed=0.003, dim=1024, inter_dim=2816, n_layers=12, n_heads=16, q_lora_rank=384,
                  kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  moe_inter_dim=384, n_routed_experts=32, n_activated_experts=6,
                  n_expert_groups=4, n_limited_groups=2, max_seq_len=2048,
                  init_std=0.006 * math.sqrt(7168 / 1024)),
    # The published 671B configuration (DeepSeek-V3 config.json); shapes and accounting only.
    "deepseek-v3": dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048,
                        n_layers=61, n_dense_layers=3, n_heads=128, q_lora_rank=1536,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
                        n_activated_experts=8, n_expert_groups=8, n_limited_groups=4,
                        route_scale=2.5, max_seq_len=163840, rope_theta=10000.0, rope_factor=40,
                        original_seq_len=4096, beta_fast=32, beta_slow=1, mscale=1.0,
                        mscale_all_dim=1.0, init_std=0.006),
}


# ----------------------------------------------------------------------------------------------
# RMSNorm, rotary embeddings with YaRN, Linear

class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 whatever the input dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def yarn_mscale(factor, mscale=1.0):
    """YaRN attention temperature m (§4.3 cites Peng et al.): 0.1 * mscale * ln(factor) + 1."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def precompute_freqs_cis(args):
    """Rotations e^{i * pos * freq} for the R/2 pairs, stored as real numbers (cos, sin):
    (max_seq_len, R/2, 2).

    With YaRN (rope_factor > 1) the frequencies that turn fewer than beta_slow times over the
    original context are interpolated (divided by the factor), those that turn more than
    beta_fast times are kept, and a linear ramp blends the band between.
    """
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if args.rope_factor > 1:
        def pair_index(turns):  # the pair whose wavelength fits `turns` times in the context
            return dim * math.log(args.original_seq_len / (turns * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(pair_index(args.beta_fast)), 0)
        high = min(math.ceil(pair_index(args.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / args.rope_factor * ramp + freqs * (1 - ramp)
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64), freqs)  # (max_seq_len, R/2)
    m = yarn_mscale(args.rope_factor, args.mscale) / yarn_mscale(args.rope_factor, args.mscale_all_dim)
    return (m * torch.stack([angles.cos(), angles.sin()], dim=-1)).float()


def apply_rope(x, freqs_cis):
    """Rotate (B, T, H, R) by freqs (T, R/2, 2) or (B, T, R/2, 2); dims (2i, 2i+1) form one pair,
    the interleaved layout of the published weights (not the half-split layout of Llama in HF).
    The complex product (x0 + i x1)(cos + i sin), written out in real arithmetic."""
    cos, sin = freqs_cis.view(-1, x.size(1), 1, x.size(-1) // 2, 2).unbind(-1)  # (B|1, T, 1, R/2)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)                        # (B, T, H, R/2)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def segment_positions(segment_ids):
    """Segment ids (B, T) -> RoPE positions (B, T) counted from each segment's first token, which
    is where the id differs from the one before (a segment is a run of equal ids: give adjacent
    samples different ids). SFT's packed samples (§5.1) then each see the positions they have alone."""
    i = torch.arange(segment_ids.size(1), device=segment_ids.device)
    starts = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (1, 0), value=True)   # (B, T)
    first = torch.where(starts, i, 0).cummax(dim=1).values                           # (B, T)
    return i - first


class Linear(nn.Module):
    """y = x W^T, no bias: every projection of the model. The FP8 section swaps in its FP8 form."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x):
        return F.linear(x, self.weight)

    def dense_weight(self, dtype):
        return self.weight  # the FP8-stored form dequantizes its blocks to dtype


# ----------------------------------------------------------------------------------------------
# Multi-head Latent Attention (§2.1.1, eq. 1-11)

class MLA(nn.Module):
    """Queries go through a low-rank bottleneck (q_lora_rank); keys and values share one
    compressed latent c_KV of kv_lora_rank dims, plus one RoPE key head k^R shared by all heads.

    Two equal forms of the same attention (a test holds them equal):
    - expanded (training, prefill): up-project the latent to per-head k_nope and v, then
      ordinary causal attention;
    - absorbed (decoding): since q_nope . (W_UK c) = (W_UK^T q_nope) . c, fold W_UK into the query
      and W_UV into the output, and attend directly over the cached latents. The cache then holds
      only c_KV and k^R: kv_lora_rank + qk_rope_head_dim numbers per token and layer (576 for V3,
      versus 2 * 128 * 128 = 32,768 for multi-head attention with the same heads).
    """

    def __init__(self, args):
        super().__init__()
        self.args, self.n_heads, H = args, args.n_heads, args.n_heads
        if args.q_lora_rank:
            self.wq_a = Linear(args.dim, args.q_lora_rank)                 # W^DQ, eq. 6
            self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)          # §4.2, see below
            self.wq_b = Linear(args.q_lora_rank, H * args.qk_head_dim)     # W^UQ, W^QR, eq. 7-8: see below
        else:
            self.wq = Linear(args.dim, H * args.qk_head_dim)
        self.wkv_a = Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim)  # [W^DKV; W^KR], eq. 1, 3
        self.kv_norm = RMSNorm(args.kv_lora_rank, args.norm_eps)
        self.wkv_b = Linear(args.kv_lora_rank, H * (args.qk_nope_head_dim + args.v_head_dim))  # W^UK, W^UV, eq. 2, 5
        self.wo = Linear(H * args.v_head_dim, args.dim)                    # W^O, eq. 11
        # q_norm and kv_norm are not in eq. 1-11: they are §4.2's "additional RMSNorm layers after
        # the compressed latent vectors" c^Q and c^KV. wq_b and wkv_b hold their two matrices
        # interleaved per head, not stacked: rows of head h are [W^UQ_h; W^QR_h] ([W^UK_h; W^UV_h]),
        # the layout of the published q_b_proj and kv_b_proj, split by the rearranges in forward.
        # YaRN scales the logits by m^2 (m = mscale_all_dim temperature) on top of 1/sqrt(d)
        self.softmax_scale = args.qk_head_dim ** -0.5 * yarn_mscale(args.rope_factor, args.mscale_all_dim) ** 2
        self.kv_cache = self.pe_cache = None  # (B, S, C), (B, S, R): set up by generation (part 2)

    def forward(self, x, freqs_cis, pos=None, kv_len=None, mask=None):
        """x (B, T, D) -> (B, T, D). pos None: training, causal over x. pos (B, T): the absolute
        positions of x, whose latents are written to the cache; then kv_len None is a prefill
        (expanded, causal over x) and kv_len an int is decoding: the absorbed form over the
        cached keys [0, kv_len). mask (B, 1, T, S) bool, the keys each query may attend (S = T
        expanded, kv_len absorbed; causality included), replaces the causal mask in either form:
        SFT's sample mask (§5.1), see Transformer.attention_inputs."""
        a, B = self.args, x.size(0)
        q = self.wq_b(self.q_norm(self.wq_a(x))) if a.q_lora_rank else self.wq(x)
        q = rearrange(q, "b t (h d) -> b t h d", h=self.n_heads)           # (B, T, H, qk_head_dim)
        q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, freqs_cis)
        kv, k_pe = self.wkv_a(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)                                                # (B, T, C)
        k_pe = apply_rope(k_pe.unsqueeze(2), freqs_cis)                      # (B, T, 1, R)
        if pos is not None:
            rows = torch.arange(B, device=x.device)[:, None]
            self.kv_cache[rows, pos] = kv.to(self.kv_cache.dtype)
            self.pe_cache[rows, pos] = k_pe.squeeze(2).to(self.pe_cache.dtype)
        if kv_len is None:
            o = self.attend_expanded(q_nope, q_pe, kv, k_pe, mask)
        else:
            o = self.attend_absorbed(q_nope, q_pe, pos, kv_len, mask)
        return self.wo(o.flatten(2))                                         # (B, T, D)

    def attend_expanded(self, q_nope, q_pe, kv, k_pe, mask=None):
        a = self.args
        kv = rearrange(self.wkv_b(kv), "b t (h d) -> b t h d", h=self.n_heads)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)    # (B, T, H, *)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)  # (B, T, H, qk_head_dim)
        # A mask (SFT's samples) keeps SDPA off flash attention, which MLA's unequal qk and v head
        # dims rule out anyway: on CUDA a fused kernel that takes a mask (memory-efficient, cuDNN)
        # runs it, on the CPU the fused CPU kernel. flex_attention could skip whole masked blocks,
        # at the price of a compiled kernel and a block mask per batch: a second path, not taken.
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return o.transpose(1, 2)                                             # (B, T, H, v_head_dim)

    def attend_absorbed(self, q_nope, q_pe, pos, kv_len, mask=None):
        a = self.args
        wkv_b = self.wkv_b.dense_weight(q_nope.dtype).unflatten(0, (self.n_heads, -1))  # (H, nope + v, C)
        w_uk, w_uv = wkv_b.split([a.qk_nope_head_dim, a.v_head_dim], dim=1)
        kv, pe = self.kv_cache[:pos.size(0), :kv_len], self.pe_cache[:pos.size(0), :kv_len]  # (B, S, C), (B, S, R)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)                # (B, T, H, C)
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, kv.to(q_lat.dtype))
                  + torch.einsum("bthr,bsr->bhts", q_pe, pe.to(q_pe.dtype))) * self.softmax_scale
        visible = mask if mask is not None else \
            torch.arange(kv_len, device=pos.device) <= pos[:, None, :, None]     # (B, 1, T, S)
        probs = scores.float().masked_fill(~visible, float("-inf")).softmax(-1).type_as(q_lat)
        o = torch.einsum("bhts,bsc->bthc", probs, kv.to(probs.dtype))      # (B, T, H, C)
        return torch.einsum("bthc,hdc->bthd", o, w_uv)                      # (B, T, H, v_head_dim)


# ----------------------------------------------------------------------------------------------
# DeepSeekMoE (§2.1.2, eq. 12-20)

class MLP(nn.Module):
    """SwiGLU feed-forward w2(silu(w1 x) * w3 x): the dense layers and the shared experts."""

    def __init__(self, dim, inter_dim):
        super().__init__()
        self.w1, self.w2, self.w3 = Linear(dim, inter_dim), Linear(inter_dim, dim), Linear(dim, inter_dim)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router (eq. 13-16). Affinity s = sigmoid(u W^T) in float32 (eq. 15). A per-expert bias b
    (a buffer, not trained by gradient) is added for the top-k *selection* only (eq. 16); the
    gating weights come from the unbiased s, normalised over the chosen experts (eq. 13) and
    scaled by route_scale. So the bias steers load without distorting the mixture the model learns.

    Group-limited routing (§2.1.2's node-limited routing): experts form n_expert_groups groups (one
    node each in V3); a group scores the sum of its two best biased affinities, and only the top
    n_limited_groups (M) groups stay eligible. The report sums each group's K_r/M best; the
    official code and Hugging Face sum the best 2, which is K_r/M for V3 (8/4) but not for the
    `small` preset (6/2 = 3): we follow the published code, which the published weights were
    trained with. A group of one expert scores that expert alone. Masked experts get -inf, not
    0: a biased score can be negative, and 0 would then beat it and pick an expert from a dropped
    group."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        if args.score_func == "sigmoid":
            self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))
        else:
            self.bias = None

    def forward(self, x):
        """x (N, D) -> weights (N, K) float32, indices (N, K), affinities s (N, E) float32."""
        a = self.args
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())                 # (N, E)
        s = logits.sigmoid() if a.score_func == "sigmoid" else logits.softmax(-1)
        biased = s if self.bias is None else s + self.bias
        if a.n_expert_groups > 1:
            groups = biased.unflatten(-1, (a.n_expert_groups, -1))            # (N, G, E/G)
            group_score = (groups.topk(min(2, groups.size(-1)), dim=-1).values.sum(-1) if self.bias is not None
                           else groups.amax(-1))                              # V2: best expert
            keep = group_score.topk(a.n_limited_groups, dim=-1).indices      # (N, n_limited)
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            biased = groups.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        idx = biased.topk(a.n_activated_experts, dim=-1).indices             # (N, K)
        w = s.gather(1, idx)
        if a.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return w * a.route_scale, idx, s

    @torch.no_grad()
    def update_bias(self, load, gamma):
        """Aux-loss-free balancing (§2.1.2): after each step, b_i -= γ for overloaded experts and
        b_i += γ for underloaded ones (the sign of mean load minus expert load)."""
        self.bias += gamma * torch.sign(load.mean() - load)


class Experts(nn.Module):
    """The N_r routed experts: E SwiGLU FFNs with stacked weights w1, w3 (E, I, D), w2 (E, D, I).

    forward is eq. 12's routed sum written as every implementation computes it: group the
    (token, expert) pairs by expert, run each expert once over its rows, add the rows back
    weighted by g. The loop over experts is the reference; `backend` is the hook through which
    part 2's expert back-ends run the same sum as one grouped or batched GEMM (tests hold them
    equal to this loop)."""

    backend = None  # set in "Expert back-ends" (part 2); None runs the loop below

    def __init__(self, args):
        super().__init__()
        E, D, I = args.n_routed_experts, args.dim, args.moe_inter_dim
        self.w1 = nn.Parameter(torch.empty(E, I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))
        self.w3 = nn.Parameter(torch.empty(E, I, D))

    def ffn(self, x, e):
        """Expert e's SwiGLU on its rows x (n, D)."""
        return (F.silu(x @ self.w1[e].mT) * (x @ self.w3[e].mT)) @ self.w2[e].mT

    def forward(self, x, weights, idx):
        """x (N, D), weights/idx (N, K) -> sum_k weights[:, k] * FFN_{idx[:, k]}(x): (N, D)."""
        if self.backend is not None:
            return self.backend(x, weights, idx)
        (N, K), E = idx.shape, self.w1.size(0)
        flat = idx.flatten()                                # (N*K,) the expert of each pair
        order = flat.argsort(stable=True)                   # pairs grouped by expert
        token = order // K                                  # (N*K,) the token of each sorted pair
        rows = x[token].split(flat.bincount(minlength=E).tolist())
        h = torch.cat([self.ffn(r, e) for e, r in enumerate(rows)])         # (N*K, D)
        h = h * weights.flatten()[order, None].to(h.dtype)
        return torch.zeros_like(h[:N]).index_add_(0, token, h)


class MoE(nn.Module):
    """y = sum_i g_i FFN_i^routed(x) + FFN^shared(x): eq. 12 without its residual u_t, which Block
    adds. In training it also counts the tokens per expert (`load`, summed until the next bias
    update) and computes the balance loss alpha * sum_i f_i P_i (eq. 17-20) into `balance_loss`:
    per sequence and averaged over the sequences (V3's complementary loss, and DeepSeek-V2's
    expert-level loss with a larger α), or over the whole batch at once (balance_scope "batch",
    §4.5.3). A sequence is a packed row, as in pre-training (§4.1), also when SFT isolates the
    samples in it (§5.1): the load to balance is what the row's tokens make together, and one
    f and P per row need no per-sample lengths."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.gate = Gate(args)
        self.experts = Experts(args)
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) \
            if args.n_shared_experts else None
        self.register_buffer("load", torch.zeros(args.n_routed_experts), persistent=False)
        self.balance_loss = None

    def forward(self, x):
        a, (B, T, D) = self.args, x.shape
        flat = x.reshape(-1, D)                                              # (N, D)
        weights, idx, s = self.gate(flat)
        y = self.experts(flat, weights, idx).type_as(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training:
            with torch.no_grad():
                self.load += idx.flatten().bincount(minlength=a.n_routed_experts)
            # eq. 18-20: f_i = E / (K T) * #tokens of the sequence routed to i, P_i = mean_t s'_i,t.
            # f counts the experts the tokens were actually sent to (biased and group-limited
            # selection), the load the loss is meant to even out; eq. 18 read literally takes the
            # top-K of the unbiased s. They agree while the bias is small; f carries no gradient.
            # The batch-wise loss (§4.5.3) is the same formula over one "sequence" of all B*T
            # tokens: a sequence may then lean on a few experts as long as the batch is even.
            n_seq = B if a.balance_scope == "sequence" else 1                # sequences f, P run over
            L = B * T // n_seq                                                # tokens per sequence
            chosen = torch.zeros(n_seq, a.n_routed_experts, device=x.device)
            chosen.scatter_add_(1, idx.view(n_seq, -1), torch.ones(n_seq, L * idx.size(1), device=x.device))
            f = chosen * a.n_routed_experts / (a.n_activated_experts * L)             # (n_seq, E)
            P = (s / s.sum(-1, keepdim=True)).view(n_seq, L, -1).mean(1)             # (n_seq, E)
            self.balance_loss = a.balance_alpha * (f * P).sum(-1).mean()
        return y.view(B, T, D)


# ----------------------------------------------------------------------------------------------
# Block, Multi-Token Prediction (§2.2)

class Block(nn.Module):
    def __init__(self, layer_id, args):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args)
        moe = args.n_routed_experts > 0 and layer_id >= args.n_dense_layers  # V3: layers 3 on (§4.2)
        self.ffn = MoE(args) if moe else MLP(args.dim, args.inter_dim)

    def forward(self, x, freqs_cis, pos=None, kv_len=None, mask=None):
        x = x + self.attn(self.attn_norm(x), freqs_cis, pos, kv_len, mask)
        return x + self.ffn(self.ffn_norm(x))


class MTPModule(nn.Module):
    """Depth-k MTP module (eq. 21-23): h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], then
    one Transformer block (eq. 22), then the shared output head predicts t_{i+k+1} (eq. 23). The
    concatenation puts the embedding first, the reverse of eq. 21 as printed: it is the order the
    published eh_proj (M_k) expects, as in the official code. The embedding and head are the main
    model's (shared); `norm` is the published `shared_head.norm`."""

    def __init__(self, args):
        super().__init__()
        self.enorm, self.hnorm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = Linear(2 * args.dim, args.dim)                       # M_k, eq. 21
        self.block = Block(args.n_layers, args)  # a MoE block unless the model is dense only
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h_prev, emb_next, freqs_cis, pos=None, kv_len=None, mask=None):
        """h_prev (B, T, D) from depth k-1 (normalised), emb_next = Emb(t_{i+k}) (B, T, D)."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.norm(self.block(h, freqs_cis, pos, kv_len, mask))


# ----------------------------------------------------------------------------------------------
# Transformer

class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)   # kept in high precision
        self.mtp = nn.ModuleList(MTPModule(args) for _ in range(args.n_mtp))
        self.register_buffer("freqs_cis", precompute_freqs_cis(args), persistent=False)
        self.init_weights()
        if args.fp8 or args.fp8_weights:  # §3.3: FP8 projections, see "FP8" in part 2
            use_fp8(self, store=args.fp8_weights)

    @torch.no_grad()
    def init_weights(self):
        """N(0, init_std) for every matrix (§4.2), ones for norms, zero routing bias."""
        for p in self.parameters():
            nn.init.ones_(p) if p.dim() == 1 else nn.init.normal_(p, std=self.args.init_std)
        for m in self.moe_layers():
            if m.gate.bias is not None:
                m.gate.bias.zero_()
            m.load.zero_()

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def attention_inputs(self, tokens, segment_ids=None):
        """RoPE rotations and attention mask of a forward over all of tokens (B, T).
        Pre-training (§4.1) packs documents into rows without a cross-document mask: positions
        0..T-1 for every row, causal attention (mask None). SFT (§5.1) packs samples too but
        keeps them "isolated and mutually invisible": with segment_ids (B, T), the mask
        (B, 1, T, T) lets token t see tokens first..t, first where its segment starts, and
        positions restart at each segment (segment_positions; under the mask RoPE's scores,
        which depend on relative positions only, are the same either way, but each sample then
        gets the rotations it has alone). -> freqs (T or B, T, R/2, 2), mask or None."""
        T = tokens.size(1)
        if segment_ids is None:
            return self.freqs_cis[:T], None
        if segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids must have the shape of tokens {tuple(tokens.shape)}, "
                             f"got {tuple(segment_ids.shape)}")
        pos = segment_positions(segment_ids)                                  # (B, T)
        i = torch.arange(T, device=tokens.device)
        first = (i - pos)[:, :, None]                                         # (B, T, 1)
        mask = (i <= i[:, None]) & (i >= first)                               # (B, T, T): keys first..t
        return self.freqs_cis[pos], mask.unsqueeze(1)

    def trunk(self, tokens, pos=None, kv_len=None, segment_ids=None):
        """tokens (B, T) -> final normalised hidden states (B, T, D). pos and kv_len: see MLA;
        segment_ids: see attention_inputs. A cached call (pos given) takes no segment_ids: its
        queries attend cached keys whose segments the latent cache does not keep."""
        if pos is None:
            freqs, mask = self.attention_inputs(tokens, segment_ids)
        elif segment_ids is None:
            freqs, mask = self.freqs_cis[pos], None
        else:
            raise ValueError("segment_ids apply to a forward over whole rows, not to cached decoding")
        return self.blocks(tokens, freqs, mask, pos, kv_len)

    def blocks(self, tokens, freqs, mask=None, pos=None, kv_len=None):
        """The embedding, every Block, the final RMSNorm, with the rotations and mask given."""
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, freqs, pos, kv_len, mask)
        return self.norm(h)

    def forward(self, tokens, targets=None, mtp_weight=0.3, segment_ids=None):
        """Logits (B, T, V) for every position. With targets (B, T) = next tokens (-1 ignored)
        also a dict of losses: "loss" = ce + mtp_weight * mtp + balance, where mtp is the mean
        over depths k of the cross-entropy for t_{i+k+1} (λ/D sum_k L_MTP^k, eq. 25) and balance
        the sum of the sequence-wise balance losses of the MoE layers that ran (eq. 17).
        segment_ids (B, T): SFT's sample masking (§5.1), see attention_inputs; each segment gets
        the logits and the ce and mtp losses it would get alone, whereas the balance loss still
        counts each packed row as one sequence (the routing of every token is unchanged)."""
        for m in self.moe_layers():
            m.balance_loss = None  # only the layers this call runs report one
        freqs, mask = self.attention_inputs(tokens, segment_ids)  # for the trunk and the MTP modules
        h = self.blocks(tokens, freqs, mask)
        logits = self.head(h)
        if targets is None:
            return logits
        ce = lambda lg, tg: F.cross_entropy(lg.float().flatten(0, 1), tg.flatten(), ignore_index=-1)
        losses = {"ce": ce(logits, targets)}
        mtp, T = [], tokens.size(1)
        for k, module in enumerate(self.mtp, start=1):
            if T <= k:
                break
            # position i (< T-k) combines h^{k-1}_i with Emb(t_{i+k}) and predicts t_{i+k+1}:
            # the first T-k positions, their rotations and the top-left (T-k, T-k) of the mask
            h = module(h[:, :-1], self.embed(tokens[:, k:]), freqs[..., :T - k, :, :],
                       mask=None if mask is None else mask[..., :T - k, :T - k])
            target = targets[:, k:]
            if mask is not None:  # t_{i+k} in another sample than i: no prediction across it
                same = mask[:, 0, k:, :T - k].diagonal(dim1=-2, dim2=-1)  # (B, T-k): t_{i+k} sees i
                target = target.masked_fill(~same, -1)
            mtp.append(ce(self.head(h), target))
        losses["mtp"] = torch.stack(mtp).mean() if mtp else logits.new_zeros((), dtype=torch.float32)
        bal = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        losses["balance"] = torch.stack(bal).sum() if bal else torch.zeros_like(losses["mtp"])
        losses["loss"] = losses["ce"] + mtp_weight * losses["mtp"] + losses["balance"]
        return logits, losses

    @torch.no_grad()
    def update_bias(self, gamma):
        """Apply the sign rule to every MoE layer's gate with the loads counted over the whole
        optimizer step, reset the counts, and return MaxVio = max load / mean load - 1 per layer."""
        maxvio = []
        for m in self.moe_layers():
            maxvio.append(m.load.max() / m.load.mean().clamp(min=1) - 1)
            if gamma and m.gate.bias is not None:
                m.gate.update_bias(m.load, gamma)
            m.load.zero_()
        return torch.stack(maxvio) if maxvio else torch.zeros(0)

    # Entry points to part 2: generation and checkpoints in the published layout
    def generate(self, tokens, max_new_tokens, temperature=0.0, top_p=1.0, speculative=False, **kw):
        """Append max_new_tokens to tokens (B, T0); see generate() in "Generation"."""
        return generate(self, tokens, max_new_tokens, temperature, top_p, speculative, **kw)

    def save_pretrained(self, path, **kw):
        save_pretrained(self, path, **kw)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, rank=0, world_size=1, placement=None):
        """Load a folder in the published layout; see load_pretrained() in "Checkpoint I/O"."""
        return load_pretrained(path, device, dtype, rank, world_size, placement)


# ==============================================================================================
# Part 2: the engineering. Each section acts on part 1's model from outside.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# FP8 (§3.3, Figures 6-7): e4m3 values with one float32 scale per tile, fp32 accumulation.
# First the recipe (quantize, multiply, the three training GEMMs), then where it runs: Hopper's
# scaled_mm or an emulation, and FP8 weight storage for published FP8 checkpoints.

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                       # largest finite e4m3 value
FP8_BLOCK = 128                       # 1x128 activation tiles, 128x128 weight blocks (§3.3.2); not
                                      # N_C, the interval (also 128) of §3.3.2's promotion to FP32
ACT, WEIGHT = (1, FP8_BLOCK), (FP8_BLOCK, FP8_BLOCK)


def _tiles(x, block):
    """(..., M, K) -> zero-padded view (..., Mb, bm, Kb, bk) of (bm, bk) tiles."""
    (M, K), (bm, bk) = x.shape[-2:], block
    if M % bm or K % bk:
        x = F.pad(x, (0, -K % bk, 0, -M % bm))
    return x.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bm))


def fp8_quantize(x, block=ACT, pow2=False):
    """Quantize the last two dims (M, K) of x in (bm, bk) tiles -> (q e4m3 (..., M, K),
    scale float32 (..., ceil(M/bm), ceil(K/bk))), x ~= q * scale. Edge tiles are partial; an
    all-zero tile gets a tiny scale, not a division by zero. pow2 rounds scales up to powers
    of two (the ue8m0 format of later DeepSeek releases)."""
    M, K = x.shape[-2:]
    tiles = _tiles(x.float(), block)                                     # (..., Mb, bm, Kb, bk)
    scale = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / FP8_MAX    # (..., Mb, Kb)
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[..., :, None, :, None]).to(FP8_DTYPE)
    return q.flatten(-4, -3).flatten(-2)[..., :M, :K].contiguous(), scale


def fp8_dequantize(q, scale, block=WEIGHT, dtype=torch.float32):
    M, K = q.shape[-2:]
    x = _tiles(q.to(torch.float32), block) * scale[..., :, None, :, None]
    return x.flatten(-4, -3).flatten(-2)[..., :M, :K].to(dtype)


def fp8_gemm(qa, sa, a_block, qb, sb, b_block, out_dtype=torch.float32):
    """a @ b^T from quantized operands a (..., M, K), b (..., N, K), each tiled along the
    contraction dim K: (1, 128) for activations and gradients, (128, 128) for weights; leading
    dims (the stacked experts) are batch dims. Real e4m3 tensor-core GEMM on Hopper: one
    fp8_scaled_mm per leading index (layouts a CPU checks with torch's meta function, which the
    block-wise form of scaled_grouped_mm lacks), the contraction dim zero-padded to whole tiles,
    N a multiple of 128 (else emulated). Elsewhere an emulation that multiplies the same e4m3
    numbers: dequantize, then a float32 matmul with float32 accumulation, as the paper's
    promotion does."""
    if fp8_real_available(qa.device) and qb.size(-2) % FP8_BLOCK == 0:  # N: whole weight blocks
        if qa.dim() > 2:
            return torch.stack([fp8_gemm(qa[i], sa[i], a_block, qb[i], sb[i], b_block, out_dtype)
                                for i in range(qa.size(0))])                  # (E, M, N)
        pad = -qa.size(-1) % FP8_BLOCK   # K: zeros complete the last tile, whose scale exists already
        if pad:
            qa, qb = (torch.cat([q, q.new_zeros(q.size(0), pad)], 1) for q in (qa, qb))
        return fp8_scaled_mm(qa, sa, a_block, qb, sb, b_block).to(out_dtype)
    with torch.autocast(qa.device.type, enabled=False):  # the emulation's product stays float32
        return (fp8_dequantize(qa, sa, a_block) @ fp8_dequantize(qb, sb, b_block).mT).to(out_dtype)


def fp8_matmul(a, a_block, b, b_block, out_dtype):
    """Quantize both operands online (scales from the current max, §3.3) and multiply."""
    return fp8_gemm(*fp8_quantize(a, a_block), a_block, *fp8_quantize(b, b_block), b_block, out_dtype)


class FP8Matmul(torch.autograd.Function):
    """y = x @ w^T with all three training GEMMs on FP8 inputs (Figure 6):
    Fprop  y  = Q(x; 1x128)   @ Q(w; 128x128)^T
    Dgrad  dx = Q(dy; 1x128)  @ Q(w^T; 128x128)^T
    Wgrad  dw = Q(dy^T; 1x128) @ Q(x^T; 1x128)^T   (x and dy tiled 128x1 along tokens)
    x (..., M, K), w (..., N, K); batch dims allow the stacked experts. Master weights and
    gradients stay in their own (higher) precision."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return fp8_matmul(x, ACT, w, WEIGHT, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = fp8_matmul(dy, ACT, w.mT, WEIGHT, x.dtype)
        dw = fp8_matmul(dy.mT, ACT, x.mT, ACT, w.dtype)
        return dx, dw


class FP8Linear(Linear):
    """Part 1's Linear with its products on e4m3. High-precision weight (training with --fp8):
    the three GEMMs of FP8Matmul while gradients are on. FP8 weight (a published FP8 checkpoint):
    `weight` e4m3 with one float32 `scale` per 128x128 block (the published `weight_scale_inv`,
    a multiplier despite its name), activations quantized per 1x128 tile on Hopper, the weight
    dequantized elsewhere."""

    def dense_weight(self, dtype):
        return fp8_dequantize(self.weight, self.scale, dtype=dtype) if self.weight.dtype == FP8_DTYPE else self.weight

    def forward(self, x):
        if self.weight.dtype == FP8_DTYPE:
            return fp8_weight_matmul(x.flatten(0, -2), self.weight, self.scale).unflatten(0, x.shape[:-1])
        if torch.is_grad_enabled():
            return FP8Matmul.apply(x.flatten(0, -2), self.weight).unflatten(0, x.shape[:-1])
        return F.linear(x, self.weight)


def fp8_weight_matmul(x, w, scale):
    """x (..., M, K) @ W^T for an e4m3 weight W (..., N, K) with 128x128 block scales: the e4m3
    GEMM on Hopper (x quantized per 1x128 tile), elsewhere W dequantized to x's dtype."""
    if fp8_real_available(x.device):
        return fp8_gemm(*fp8_quantize(x, ACT), ACT, w, scale, WEIGHT, x.dtype)
    return x @ fp8_dequantize(w, scale, dtype=x.dtype).mT


def expert_matmul(experts, x, w, scale=None):
    """x (..., M, K) @ w^T for a weight w (..., N, K) of the routed experts `experts`: one expert's,
    or all E stacked. High precision; FP8-trained (FP8Matmul while gradients are on); or FP8-stored
    with its 128x128 block scales (e4m3 GEMM on Hopper, elsewhere these blocks alone dequantized)."""
    if w.dtype == FP8_DTYPE:
        return fp8_weight_matmul(x, w, scale)
    if getattr(experts, "fp8_train", False) and torch.is_grad_enabled():
        return FP8Matmul.apply(x, w)
    return x @ w.mT


@torch.no_grad()
def use_fp8(model, store=False):
    """Swap FP8Linear into every projection (embedding, head, gate and norms stay high precision,
    §3.3) and run the routed experts' products through FP8Matmul. store=True also quantizes the
    weights to e4m3 with 128x128 block scales (FP8 inference, half the bytes of BF16)."""
    for m in list(model.modules()):
        if type(m) is Linear:
            m.__class__ = FP8Linear
            if store:
                q, s = fp8_quantize(m.weight, WEIGHT)
                m.weight = nn.Parameter(q, requires_grad=False)
                m.scale = nn.Parameter(s, requires_grad=False)
        elif isinstance(m, Experts):
            m.fp8_train = not store
            for name in ("w1", "w2", "w3") if store else ():
                q, s = fp8_quantize(getattr(m, name), WEIGHT)
                setattr(m, name, nn.Parameter(q, requires_grad=False))
                setattr(m, name + "_scale", nn.Parameter(s, requires_grad=False))
    return model


def fp8_real_available(device):
    """Hardware FP8 with block scales: torch's scaled_mm with BlockWise scaling, which torch 2.13
    supports on SM90 (Hopper) with CUDA >= 12.9 only (torch refuses it elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda" or not (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        return False
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return torch.cuda.get_device_capability(device) == (9, 0) and cuda >= (12, 9)


def fp8_scaled_mm(qa, sa, a_block, qb, sb, b_block):
    """Hopper's block-scaled e4m3 GEMM with the layouts cuBLAS expects (torch's scaled_mm tests):
    b column-major; 1x128 scales outer-dim-major (stride 1 along M, also for M = 1); 128x128
    scales of b as (ceil(K/128) padded to a multiple of 4, N/128), transposed. float32 out."""
    kind = {ACT: F.ScalingType.BlockWise1x128, WEIGHT: F.ScalingType.BlockWise128x128}
    outer_major = lambda s: torch.empty_strided(s.shape, (1, s.size(0)), dtype=s.dtype, device=s.device).copy_(s)
    sa = outer_major(sa)
    sb = outer_major(sb) if b_block == ACT else F.pad(sb, (0, -sb.size(1) % 4)).t()
    return F.scaled_mm(qa, qb.t(), sa, kind[a_block], sb, kind[b_block], output_dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Expert back-ends: part 1's Experts.forward loops over the experts; these compute the same sum
# in fewer, larger products, or in a form a compiled step can trace. Picked per call by
# expert_backend, for the hardware, the precision and the number of (token, expert) pairs:
#   gather   - CPU decoding (fewer pairs than experts), and any compiled inference step that
#              grouped_mm cannot take: each pair multiplies its expert's weights in place, no sort,
#              no host sync, so the step stays one graph; FP8-stored weights: only the chosen
#              experts' blocks are dequantized;
#   grouped  - torch's grouped GEMM over the sorted pairs: CUDA in bfloat16 (its only dtype there)
#              and CPU with few pairs per expert, where every row stride is whole 16 bytes;
#   segments - one product per expert on exactly its own sorted rows, N*K in all however uneven
#              the load: FP8 (training: FP8Matmul; stored: the e4m3 weights; on Hopper one
#              scaled_mm each), and CUDA where grouped_mm cannot run (float32, unaligned widths);
#   padded   - pairs padded per expert to (E, cap, D) and batched matmuls: CPU training in high
#              precision (three large products; E x the largest load in rows, up to E/K times N*K
#              while the routing is uneven, e.g. at initialisation).

def expert_backend(is_cuda, dtype, n_pairs, n_experts, fp8, compiling, widths):
    """'gather', 'grouped', 'segments' or 'padded' for one call. dtype: the compute dtype (autocast's
    if on); fp8: None, 'train' (FP8Matmul) or 'stored' (e4m3 weights); compiling: a compiled inference
    step (no host sync, no loop over a data-dependent count); widths: the row lengths the products
    stride over (dim, moe_inter_dim)."""
    # grouped_mm: bfloat16 only on CUDA (its kernel and meta function); rows of whole 16 bytes everywhere
    aligned = all(w * dtype.itemsize % 16 == 0 for w in widths)
    grouped = hasattr(F, "grouped_mm") and not fp8 and aligned and (
        dtype == torch.bfloat16 if is_cuda else n_pairs < n_experts * 8)
    if fp8 == "train":
        return "segments"
    if not is_cuda and (n_pairs < n_experts or compiling):
        return "gather"
    if grouped:
        return "grouped"
    if compiling:
        return "gather"
    return "segments" if is_cuda or fp8 else "padded"


def fast_experts(self, x, weights, idx):
    """Experts.forward through the back-ends above; same arguments and result as the loop."""
    (N, K), E = idx.shape, self.w1.size(0)
    parallel = getattr(self, "placement", None) is not None  # expert parallel (see shard)
    if parallel:  # local ids of this rank's pairs; another rank's pair gets id E, weight 0
        idx = local_pairs(self, idx)
        weights = weights * (idx < E)
    fp8 = ("stored" if self.w1.dtype == FP8_DTYPE else
           "train" if getattr(self, "fp8_train", False) and torch.is_grad_enabled() else None)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    compiled_inference = torch.compiler.is_compiling() and not torch.is_grad_enabled()
    backend = expert_backend(x.is_cuda, dtype, N * K, E, fp8, compiled_inference, (x.size(1), self.w1.size(1)))
    if backend == "gather":
        return gather_experts(self, x, weights, idx.clamp(max=E - 1))
    flat = idx.flatten()                             # (N*K,) one entry per token-expert pair
    order = flat.argsort(stable=True)                # pairs grouped by expert, id E last
    counts = flat.bincount(minlength=E)[:E]
    if parallel:
        order = order[:int(counts.sum())]            # drop the other ranks' pairs
    if backend == "padded":
        expert = flat[order]
        slot = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
        cap = -(-int(counts.max()) // 64) * 64       # rounded up: few distinct shapes to compile
        pair = torch.full((E, cap), N * K, device=x.device)                 # N*K = padding
        pair[expert, slot] = order
        h = padded_experts(self, F.pad(x, (0, 0, 0, 1))[pair // K])        # (E, cap, D)
    else:
        pair, xs = order, x[order // K]                                     # (N*K, D) sorted by expert
        h = grouped_experts(self, xs, counts, dtype) if backend == "grouped" else segment_experts(self, xs, counts)
    w = F.pad(weights.flatten(), (0, 1))[pair].to(h.dtype)                  # 0 for padding
    y = h.new_zeros(N + 1, x.size(1))                                       # row N: padding
    return y.index_add_(0, (pair // K).flatten(), (h * w[..., None]).flatten(0, -2))[:N]


def gather_experts(self, x, weights, idx):
    """Each token's K experts' weights gathered, one at a time (fewer temporaries alive), and
    x repeated per expert, so each (token, expert) pair is its own one-row product. FP8-stored
    weights: the gathered e4m3 blocks and their scales are dequantized, the other experts' not."""
    N, K = idx.shape

    def gather(name):                                                           # (N, K, *, *)
        w = getattr(self, name).index_select(0, idx.flatten())
        if w.dtype == FP8_DTYPE:
            w = fp8_dequantize(w, getattr(self, name + "_scale").index_select(0, idx.flatten()), dtype=x.dtype)
        return w.unflatten(0, (N, K))
    xk = x[:, None].expand(-1, K, -1)                                           # (N, K, D)
    h = (F.silu(torch.einsum("nkd,nkid->nki", xk, gather("w1")))
         * torch.einsum("nkd,nkid->nki", xk, gather("w3")))                     # (N, K, I)
    y = torch.einsum("nki,nkdi->nkd", h, gather("w2"))                          # (N, K, D)
    return torch.einsum("nk,nkd->nd", weights.to(y.dtype), y)


def grouped_experts(self, xs, counts, dtype):
    """One grouped GEMM per projection over the expert segments of xs (N*K, D), sorted by expert."""
    offs = counts.cumsum(0).to(torch.int32)
    mm = lambda t, w: F.grouped_mm(t.to(dtype), w.to(dtype).mT, offs=offs)  # autocast skips grouped_mm
    return mm(F.silu(mm(xs, self.w1)) * mm(xs, self.w3), self.w2)


def segment_experts(self, xs, counts):
    """Each expert's SwiGLU on exactly its own rows of xs (N*K, D), sorted by expert -> (N*K, D):
    one product per expert and projection (so each can be FP8), experts without rows skipped.
    Reading the counts is one host sync. The weights are unbound once, so that their gradients
    come back as one stacked tensor (indexing w[e] would give one zero-filled (E, ...) per expert)."""
    w = {n: getattr(self, n).unbind(0) for n in ("w1", "w2", "w3")}
    s = {n: getattr(self, n + "_scale").unbind(0) for n in w if hasattr(self, n + "_scale")}  # FP8-stored
    mm = lambda t, n, e: expert_matmul(self, t, w[n][e], s[n][e] if s else None)
    rows = xs.split(counts.tolist())                                       # E views, (count_e, D)
    h = [mm(F.silu(mm(r, "w1", e)) * mm(r, "w3", e), "w2", e) for e, r in enumerate(rows) if len(r)]
    return torch.cat(h) if h else xs


def padded_experts(self, buf):
    """buf (E, cap, D): each expert's rows padded to the largest count -> (E, cap, D) by batched
    matmuls (E * cap - N*K idle rows when the load is uneven)."""
    mm = lambda t, n: expert_matmul(self, t, getattr(self, n), getattr(self, n + "_scale", None))
    return mm(F.silu(mm(buf, "w1")) * mm(buf, "w3"), "w2")


Experts.backend = fast_experts


# ----------------------------------------------------------------------------------------------
# Generation (§2.2, §5.4.3): latent KV cache, absorbed decoding, MTP speculative decoding,
# compiled static-shape steps, sampling

def setup_cache(model, batch_size, max_len):
    """Give every MLA a latent cache of at least (batch_size, max_len); the length is rounded up
    to a multiple of 256, since a compiled decode step is specialised to the cache's shape."""
    a, p = model.args, model.embed.weight
    dtype, max_len = p.dtype, min(-(-max_len // 256) * 256, a.max_seq_len)
    for m in model.modules():
        if isinstance(m, MLA) and (m.kv_cache is None or m.kv_cache.size(0) < batch_size
                                   or m.kv_cache.size(1) < max_len or m.kv_cache.dtype != dtype):
            m.kv_cache = torch.zeros(batch_size, max_len, a.kv_lora_rank, device=p.device, dtype=dtype)
            m.pe_cache = torch.zeros(batch_size, max_len, a.qk_rope_head_dim, device=p.device, dtype=dtype)


def decode_step(model, tokens, pos, kv_len):
    """tokens (B, T) at positions pos (B, T), attending cached keys [0, kv_len) in the absorbed
    form -> hidden states (B, T, D) and logits (B, T, V)."""
    h = model.trunk(tokens, pos, kv_len)
    return h, model.head(h)


def next_token(model, tokens, pos, kv_len, temperature, top_p, top_k):
    """One plain decoding step: tokens (B, 1) at pos (B, 1) -> the next tokens (B,)."""
    return sample(decode_step(model, tokens, pos, kv_len)[1][:, -1], temperature, top_p, top_k)


def draft_step(model, h, next_tokens, pos, kv_len=None):
    """MTP draft: main hidden states h (B, T, D) at pos paired with the tokens that follow them
    (B, T) -> logits (B, T, V) for the token after those. kv_len None: a prefill."""
    return model.head(model.mtp[0](h, model.embed(next_tokens), model.freqs_cis[pos], pos, kv_len))


def speculative_step(model, out, n, draft, q, kv_len, temperature, top_p, top_k):
    """One round of MTP speculative decoding on the token buffer out (B, L + 2), in place: row b
    holds n[b] tokens (done at L; the 2 spare columns take a finished row's writes), and d =
    draft (B,) is the MTP module's guess for the next one, with probabilities q (B, V) (None
    when greedy). The main model scores (last token, d) in one forward: d is accepted if it is
    the greedy choice, or when sampling with probability min(1, p(d)/q(d)), else replaced by a
    sample of max(p - q, 0), which keeps p's distribution; an accepted d brings the token after
    it. Then the MTP module drafts at both positions. -> n, draft, q for the next round, and
    accept (B,)."""
    L, rows = out.size(1) - 2, torch.arange(out.size(0), device=out.device)
    pick = lambda logits: sample(logits, temperature, top_p, top_k)
    active = n < L
    pos = (n - 1)[:, None] + torch.arange(2, device=out.device)      # (B, 2)
    h, logits = decode_step(model, torch.stack([out[rows, n - 1], draft], 1), pos, kv_len)
    if temperature == 0:
        target = logits[:, 0].argmax(-1)
        accept = target == draft
    else:
        p0 = probs(logits[:, 0], temperature, top_p, top_k)
        ratio = p0.gather(1, draft[:, None]) / q.gather(1, draft[:, None])
        accept = torch.rand_like(ratio[:, 0]) < ratio[:, 0]
        residual = (p0 - q).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p0)
        target = draw(residual)
    accept &= active
    tok0, tok1 = torch.where(accept, draft, target), pick(logits[:, 1])
    out[rows, torch.where(active, n, L + 1)] = tok0
    out[rows, torch.where(accept, n + 1, L + 1)] = tok1
    drafts = draft_step(model, h, torch.stack([tok0, tok1], 1), pos, kv_len)  # (B, 2, V)
    last = drafts[rows, accept.long()]  # the draft made at the last accepted position
    q = probs(last, temperature, top_p, top_k) if temperature else None
    return torch.where(active, n + 1 + accept.long(), n).clamp(max=L), pick(last), q, accept


def compiled_steps(model):
    """next_token and speculative_step through torch.compile, made once per model. Shapes are
    static (kv_len is always the cache length: keys past each position are masked, not cut), so
    one graph serves every step; torch recompiles only for a new batch size or cache length. The
    C++ wrapper calls the kernels without Python between them, but cannot call collectives yet
    (so not under tensor/expert parallelism). decompose_mm_pass compiles one row's matrix-vector
    products as fused loops instead of BLAS calls (CPU; a no-op for these shapes on CUDA)."""
    if not hasattr(model, "_compiled_steps"):
        options = {"cpp_wrapper": getattr(model, "world_size", 1) == 1,
                   "post_grad_fusion_options": {"decompose_mm_pass": {}}}
        c = lambda f: torch.compile(f, fullgraph=True, dynamic=False, options=options)
        model._compiled_steps = (c(lambda *a: next_token(model, *a)),
                                 c(lambda *a: speculative_step(model, *a)))
    return model._compiled_steps


@torch.inference_mode()
def generate(model, tokens, max_new_tokens, temperature=0.0, top_p=1.0, speculative=False,
             top_k=0, callback=None, stats=None, compile=False, stop_tokens=()):
    """Append max_new_tokens to tokens (B, T0) -> (B, T0 + max_new_tokens), or fewer once every
    row has produced one of stop_tokens (what follows a row's first stop token is unspecified:
    more tokens, or zeros where a speculative row lags the others). The prompt goes
    through in one forward (expanded attention, filling the cache), then each step feeds only
    the new token(s) through the absorbed form. speculative=True drafts with the first MTP
    module and verifies in the main model; greedy output is unchanged and sampled output
    keeps the main model's distribution (rejection sampling). compile=True runs the steps
    through compiled_steps, attending the whole cache (the first call waits for the compiler).
    callback(out, lengths) is called after each step with the buffer and the per-row number
    of valid tokens."""
    B, T0 = tokens.shape
    total = T0 + max_new_tokens
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    if total + speculative > model.args.max_seq_len:  # verification looks one position ahead
        raise ValueError(f"prompt ({T0}) + new tokens ({max_new_tokens}) exceed the context "
                         f"of {model.args.max_seq_len}; shorten the prompt or generate fewer")
    if speculative and not len(model.mtp):
        raise ValueError("speculative decoding needs an MTP module (n_mtp >= 1)")
    setup_cache(model, B, total + speculative)
    if compile:
        step, spec_step = compiled_steps(model)
    else:
        step, spec_step = partial(next_token, model), partial(speculative_step, model)
    S = model.layers[0].attn.kv_cache.size(1)
    span = (lambda kv_len: S) if compile else (lambda kv_len: kv_len)  # compiled: static shapes
    out = torch.zeros(B, total + 2, dtype=torch.long, device=tokens.device)  # + 2: speculative_step
    out[:, :T0] = tokens
    pos = torch.arange(T0, device=tokens.device).expand(B, T0)
    h = model.trunk(tokens, pos)                                      # prefill: fills the cache
    pick = lambda logits: sample(logits, temperature, top_p, top_k)
    out[:, T0] = tok = pick(model.head(h[:, -1]))                     # (B,)
    n = torch.full((B,), T0 + 1, device=tokens.device)  # tokens known per row
    if callback:
        callback(out[:, :total], n)
    stop = torch.tensor(stop_tokens, dtype=torch.long, device=tokens.device)
    cols = torch.arange(total, device=tokens.device)

    def ended():  # every row holds a stop token among its new tokens
        if not len(stop_tokens):
            return False
        new = (cols >= T0) & (cols < n[:, None])                                 # (B, total)
        return bool((torch.isin(out[:, :total], stop) & new).any(1).all())
    if ended():
        return out[:, :T0 + 1]
    # Within one generate the steps' inputs change values, never shapes, dtypes or constants:
    # only the first call of each loop (which may compile) checks dynamo's guards.
    unguarded = lambda later: (torch.compiler.set_stance(skip_guard_eval_unsafe=True)
                               if compile and later else contextlib.nullcontext())
    if not speculative:
        for t in range(T0 + 1, total):
            p = torch.full((B, 1), t - 1, device=tokens.device)
            with unguarded(t > T0 + 1):
                out[:, t] = tok = step(tok[:, None], p, span(t), temperature, top_p, top_k)
            n.fill_(t + 1)
            if callback:
                callback(out[:, :total], n)
            if ended():
                return out[:, :t + 1]
        return out[:, :total]

    # MTP prefill: position i pairs the main hidden state h_i with Emb(t_{i+1}) -> draft t_{i+2}
    mtp_logits = draft_step(model, h, out[:, 1:T0 + 1], pos)[:, -1]
    q = probs(mtp_logits, temperature, top_p, top_k) if temperature else None
    draft = pick(mtp_logits)
    while (least := int(n.min())) < total:
        if stats is not None:
            stats["drafted"] = stats.get("drafted", 0) + int((n < total).sum())
        with unguarded(least > T0 + 1):
            n, draft, q, accept = spec_step(out, n, draft, q, span(int(n.max()) + 1),
                                            temperature, top_p, top_k)
        if stats is not None:
            stats["accepted"] = stats.get("accepted", 0) + int(accept.sum())
        if callback:
            callback(out[:, :total], n)
        if ended():
            return out[:, :int(n.max())]
    return out[:, :total]


def probs(logits, temperature=1.0, top_p=1.0, top_k=0):
    """Softmax of logits / temperature restricted to the top_k tokens and to the smallest set
    whose probability reaches top_p (nucleus). float32 (..., V)."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = logits.softmax(-1)
    if top_p < 1.0:
        sp, si = p.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp >= top_p         # mass before this token already reaches top_p
        p = p.scatter(-1, si, sp.masked_fill(drop, 0.0))
        p = p / p.sum(-1, keepdim=True)
    return p


def draw(weights):
    """(..., V) non-negative weights -> one index per row, i with probability w_i / sum(w): an
    exponential race, argmax_i w_i / E_i with E_i ~ Exp(1) (the first of clocks with rates w_i to
    ring is i with that probability). E = -log(u) for u uniform, clamped so that E is never 0.
    Unlike torch.multinomial it fuses into a compiled step."""
    race = -torch.rand_like(weights, dtype=torch.float32).clamp_(min=1e-20).log()
    return (weights / race).argmax(-1)


def sample(logits, temperature=0.0, top_p=1.0, top_k=0):
    """(B, V) -> (B,) token ids; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw(probs(logits, temperature, top_p, top_k))


# ----------------------------------------------------------------------------------------------
# Parallelism for inference (§3.4): tensor-parallel attention and FFN, expert-parallel MoE with
# redundant experts, applied to a built model (as gpt-fast's apply_tp does): each rank keeps its
# slice of the split weights and the experts a placement gives it, and forward hooks add up the
# ranks' partial outputs. Training uses data parallelism (train.py). Under torchrun, with the
# process group initialised.

def shard(model, rank, world_size, placement=None):
    """Keep rank's part of `model` (of world_size ranks), best on the meta device before loading:
    attention: heads [r H/n, (r+1) H/n): rows of wq (or wq_b) and wkv_b, columns of wo;
    dense FFN and shared experts: 1/n of the width: rows of w1 and w3, columns of w2;
    routed experts: those that `placement` puts on rank r, one tuple of ranks per expert per MoE
    layer (default home_placement: [r E/n, (r+1) E/n); redundant_placement adds copies);
    output head: 1/n of the vocabulary rows.
    Replicated: embedding, norms, router, wq_a, wkv_a (so the latent cache), MTP eh_proj."""
    a = model.args
    splits = dict(n_heads=a.n_heads, vocab_size=a.vocab_size, inter_dim=a.inter_dim,
                  n_routed_experts=a.n_routed_experts, shared_inter_dim=a.n_shared_experts * a.moe_inter_dim)
    for name, v in splits.items():
        if v % world_size:
            raise ValueError(f"{name} ({v}) does not split over {world_size} ranks; "
                             "use a number of ranks that divides it")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
    experts = [m for m in model.modules() if isinstance(m, Experts)]  # main layers, then MTP
    placement = placement or [home_placement(a.n_routed_experts, world_size)] * len(experts)
    check_placement(placement, len(experts), a.n_routed_experts, world_size)

    def keep(module, name, dim):  # this rank's 1/world_size of a parameter along dim
        p = getattr(module, name)
        n = p.size(dim) // world_size
        setattr(module, name, nn.Parameter(p.narrow(dim, rank * n, n).clone(), requires_grad=p.requires_grad))

    for name, _ in list(model.named_parameters()):  # the split dims of the checkpoint table NAMES
        module, _, leaf = name.rpartition(".")
        if (d := split_dim(name, a.n_layers)) is not None:
            keep(model.get_submodule(module), leaf, d)
    for m, place in zip(experts, placement):  # whole experts: local slot j holds expert held[j]
        m.placement, m.rank, m.world_size = place, rank, world_size
        m.held = [e for e, ranks in enumerate(place) if rank in ranks]
        for name in ("w1", "w2", "w3"):
            p = getattr(m, name)
            setattr(m, name, nn.Parameter(p[m.held].clone(), requires_grad=p.requires_grad))
    for m in model.modules():
        if isinstance(m, MLA):
            m.n_heads //= world_size
        elif isinstance(m, Block):
            m.attn.register_forward_hook(all_reduce)
            m.ffn.register_forward_hook(all_reduce)
    model.head.register_forward_hook(all_gather_vocab)
    model.world_size = world_size
    return model


def all_reduce(module, inputs, y):
    """Forward hook: the sum of the ranks' partial outputs (their heads' share of wo; their FFN
    columns and experts)."""
    torch.distributed.all_reduce(y)
    return y


def all_gather_vocab(module, inputs, y):
    """Forward hook on the head: every rank's vocabulary slice of the logits, concatenated."""
    parts = [torch.empty_like(y) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, y.contiguous())
    return torch.cat(parts, dim=-1)


# Expert placement. A placement gives each routed expert of a MoE layer the ranks that hold a
# copy of it, the first its home. Every rank routes every token (the router is replicated), so
# every rank knows every (token, expert) pair, and one rule, the same on all ranks, says which
# copy computes it: no pair is computed twice or dropped, and no routing is sent between ranks.

def home_placement(n_experts, world_size):
    """Expert e on rank e // (E/n) alone: n contiguous ranges."""
    per = n_experts // world_size
    return [(e // per,) for e in range(n_experts)]


def redundant_placement(loads, n_redundant, world_size):
    """Redundant experts (§3.4, prefilling: "duplicates high-load experts and deploys them
    redundantly", 32 of them, one more expert on each of 32 GPUs, "striving to balance the load
    across GPUs"). loads: per MoE layer, the (E,) pairs routed to each expert on a calibration
    text (expert_load). Each layer goes down its experts from the most loaded and gives one a
    second copy on the rank of least expected load (its pairs, with half of each copied expert's
    moved to the copy) among the ranks other than its home with room left, if that rank then
    stays below the home's load (else the copy would raise the busiest rank, not lower it),
    until n_redundant copies; unloaded experts get none. Room is ceil(n_redundant / n) copies a
    rank, so the ranks' memory stays even, as in the report. The report also re-arranges the
    home experts within a node; here they stay where home_placement puts them. -> a placement."""
    room = -(-n_redundant // world_size)
    placement = []
    for load in loads:
        load = load.double().cpu()
        E = load.numel()
        place = [list(p) for p in home_placement(E, world_size)]
        expected = load.view(world_size, -1).sum(1)                              # (n,) pairs per rank
        extra, added = [0] * world_size, 0
        for e in load.argsort(descending=True, stable=True).tolist():
            if added == n_redundant or load[e] == 0:
                break
            home, half = place[e][0], load[e] / 2
            free = [r for r in range(world_size) if r != home and extra[r] < room]
            r = min(free, key=lambda r: (float(expected[r]), r), default=None)
            if r is not None and expected[r] + half < expected[home]:
                place[e].append(r)
                extra[r], added = extra[r] + 1, added + 1
                expected[home] -= half
                expected[r] += half
        placement.append([tuple(p) for p in place])
    return placement


def check_placement(placement, n_layers, n_experts, world_size):
    if len(placement) != n_layers or any(len(p) != n_experts for p in placement):
        raise ValueError(f"a placement needs {n_layers} MoE layers of {n_experts} experts each")
    for p in placement:
        for ranks in p:
            if not ranks or len(set(ranks)) != len(ranks) or not all(0 <= r < world_size for r in ranks):
                raise ValueError(f"placement {ranks}: each expert needs one or more distinct ranks "
                                 f"in [0, {world_size})")


def local_pairs(self, idx):
    """Expert parallel: idx (N, K) expert ids of the (token, expert) pairs -> the local ids (N, K)
    of the pairs this rank computes (its slot of the expert), E_local for the rest. A pair of an
    expert with c copies goes to copy o mod c, o the pair's order among that expert's pairs in
    this call (token-major): every rank computes the same o, so each pair runs on exactly one
    rank, and a duplicated expert's pairs split evenly (within one) between its copies. Counts
    the pairs too, per expert and per rank (expert_load); not inside a compiled step."""
    E = len(self.placement)
    ranks, copies, slot = placement_tables(self, idx.device)
    flat = idx.flatten()                                               # (P,) P = N*K
    order = flat.argsort(stable=True)
    count = flat.bincount(minlength=E)                                 # (E,)
    o = torch.empty_like(flat)
    o[order] = torch.arange(flat.numel(), device=idx.device) - (count.cumsum(0) - count)[flat[order]]
    by = ranks[flat, o % copies[flat]]                                 # (P,) the rank computing each pair
    if not torch.compiler.is_compiling():
        n, old = self.world_size, getattr(self, "counted", None)
        new = count, torch.stack([by.bincount(minlength=n), ranks[flat, 0].bincount(minlength=n)])
        self.counted = new if old is None else (old[0] + new[0], old[1] + new[1])
    return torch.where(by == self.rank, slot[flat], self.w1.size(0)).view_as(idx)


def placement_tables(self, device):
    """The placement as tensors, made once per device: ranks (E, most copies), the copies' ranks
    (padded with the home); copies (E,); slot (E,), the local slot of each expert (E_local where
    this rank holds none)."""
    if getattr(self, "tables", None) is None or self.tables[0].device != device:
        p, width = self.placement, max(map(len, self.placement))
        ranks = torch.tensor([r + r[:1] * (width - len(r)) for r in p], device=device)
        slot = torch.full((len(p),), len(self.held), device=device)
        slot[self.held] = torch.arange(len(self.held), device=device)
        self.tables = ranks, torch.tensor([len(r) for r in p], device=device), slot
    return self.tables


def reset_expert_load(model):
    """Forget the pairs that local_pairs counted."""
    for m in model.modules():
        if isinstance(m, Experts):
            m.counted = None


def expert_load(model):
    """The pairs counted since reset_expert_load, per MoE layer: per expert (L, E); per rank as
    the placement sends them (L, n); per rank if every expert had its first copy only (L, n)."""
    counted = [(getattr(m, "counted", None), m) for m in model.modules()
               if isinstance(m, Experts) and getattr(m, "placement", None) is not None]
    counted = [c or (torch.zeros(len(m.placement), dtype=torch.long), torch.zeros(2, m.world_size, dtype=torch.long))
               for c, m in counted]
    per_expert, per_rank = (torch.stack([c[i].cpu() for c in counted]) for i in (0, 1))
    return per_expert, per_rank[:, 0], per_rank[:, 1]


# ----------------------------------------------------------------------------------------------
# Checkpoint I/O in the published Hugging Face layout: config.json, *.safetensors (sharded with
# model.safetensors.index.json or not), FP8 weights with 128x128 block scales

class CheckpointError(Exception):
    pass


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


SIDE_FILE_BYTES = 64 << 20  # config, index, tokenizer: DeepSeek-V3's are 2 KB, 8.9 MB and 7.8 MB


def read_file(path, limit=SIDE_FILE_BYTES, fix="replace or remove it"):
    """The bytes of a file read beside the weights (config.json, the index, the tokenizer's files, a
    prompt): a regular file (opened without blocking, then checked: a FIFO would hang the read, a
    device never end) of at most `limit` bytes, or a CheckpointError that ends with `fix`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror}); {fix}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path} is not a regular file (a FIFO, socket or device); {fix}")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise CheckpointError(f"cannot read {path} ({e.strerror}); {fix}") from None
    if len(data) > limit:
        raise CheckpointError(f"{path} is larger than {limit >> 20} MiB, more than such a file holds; {fix}")
    return data


def atomic_write(dest, write):
    """write(tmp) to a temporary name beside dest, flush it to the disk, then rename it over dest:
    a kill at any moment leaves the previous file or the new one, never a torn one; after the
    rename and the folder's fsync a power loss does too. The name is unique to this process and
    call (two writers never share one); remove_stale_temporaries cleans up after a kill."""
    dest = str(dest)
    tmp = f"{dest}.tmp{os.getpid()}.{os.urandom(4).hex()}"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it (safetensors writes 0600)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        fd = os.open(os.path.dirname(os.path.abspath(dest)), os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself
        finally:
            os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(folder):
    """Delete atomic_write's temporary files in folder whose writer process is gone (a kill)."""
    for f in Path(folder).glob("*.tmp*"):
        m = re.search(r"\.tmp(\d+)(\.[0-9a-f]{8})?$", f.name)
        if not m or not f.is_file():
            continue
        try:
            os.kill(int(m[1]), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue  # another user's live process, or not a process id
        with contextlib.suppress(OSError):
            f.unlink()


def available_memory(device):
    """Bytes that `device` can still allocate (CPU: MemAvailable), or None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def memory_shortfall(need, device):
    """-> None when `need` bytes fit on device, else a sentence saying how much is missing."""
    have = available_memory(device)
    if have is None or need <= have:
        return None
    return f"needs {need / 2**30:.3g} GiB on {device} and {have / 2**30:.3g} GiB is available"


REQUIRED = object()
# config.json keys read as sizes: (smallest, largest). The largest are far above any published
# model and keep a hostile file from asking for billions of layers before anything is allocated.
CONFIG_INTS = {"vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 17), "intermediate_size": (1, 1 << 20),
               "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 4096), "kv_lora_rank": (1, 1 << 16),
               "qk_nope_head_dim": (0, 1 << 14), "qk_rope_head_dim": (2, 1 << 14), "v_head_dim": (1, 1 << 14),
               "q_lora_rank": (0, 1 << 17), "moe_intermediate_size": (0, 1 << 20), "n_routed_experts": (0, 1 << 16),
               "n_shared_experts": (0, 1024), "num_experts_per_tok": (0, 1 << 16), "n_group": (1, 1 << 16),
               "topk_group": (1, 1 << 16), "first_k_dense_replace": (0, 1024),
               "num_nextn_predict_layers": (0, 64), "max_position_embeddings": (1, 1 << 22),
               "original_max_position_embeddings": (1, 1 << 22)}
ZERO_OK = {"rms_norm_eps", "routed_scaling_factor", "aux_loss_alpha", "bias_update_speed", "mscale",
           "mscale_all_dim", "initializer_range"}  # the other numbers divide or take logarithms


def _config_get(c, key, default=REQUIRED, where=""):
    """c[key] checked against what it must be: an int in CONFIG_INTS' range, else a finite number,
    or (for the strings and flags) the type of the default. null means the default."""
    v = c.get(key)
    if v is None:
        if default is REQUIRED:
            raise ValueError(f"{where}{key} is missing; a DeepSeek-V3 config.json names it")
        return default
    if key in CONFIG_INTS:
        low, high = CONFIG_INTS[key]
        if type(v) is not int or not low <= v <= high:
            raise ValueError(f"{where}{key} must be an integer from {low} to {high}, got {v!r}")
    elif isinstance(default, bool) or isinstance(default, str):
        if type(v) is not type(default):
            raise ValueError(f"{where}{key} must be a {type(default).__name__}, got {v!r}")
    elif type(v) not in (int, float) or not math.isfinite(v) or v < 0 or v > 1e12 or v == 0 and key not in ZERO_OK:
        low = "from 0" if key in ZERO_OK else "above 0"
        raise ValueError(f"{where}{key} must be a number {low} to 1e12, got {v!r}")
    return v


def args_from_hf_config(c):
    """Read a published config.json (DeepSeek-V3, or the V2 family with softmax scoring). Every
    value is checked for its type and range: the file may come from anywhere."""
    if not isinstance(c, dict):
        raise ValueError(f"config.json must hold a JSON object, found a {type(c).__name__}")
    if c.get("model_type") not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"unsupported model_type {c.get('model_type')!r}; expected 'deepseek_v3' (or 'deepseek_v2')")
    rs = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if not isinstance(rs, dict):
        raise ValueError(f"rope_scaling must be an object or null, got {rs!r}")
    yarn = rs.get("type", rs.get("rope_type")) == "yarn"
    get = partial(_config_get, c)
    rope = partial(_config_get, rs, where="rope_scaling.")
    n_routed = get("n_routed_experts", 0)
    n_layers = get("num_hidden_layers")
    return ModelArgs(
        vocab_size=get("vocab_size"), dim=get("hidden_size"), inter_dim=get("intermediate_size"),
        n_layers=n_layers, n_heads=get("num_attention_heads"),
        n_dense_layers=get("first_k_dense_replace", 0) if n_routed else n_layers,
        norm_eps=get("rms_norm_eps", 1e-6), max_seq_len=get("max_position_embeddings", 4096),
        q_lora_rank=get("q_lora_rank", 0), kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
        v_head_dim=get("v_head_dim"), moe_inter_dim=get("moe_intermediate_size", 0),
        n_routed_experts=n_routed, n_shared_experts=get("n_shared_experts", 0),
        n_activated_experts=get("num_experts_per_tok", 0),
        n_expert_groups=get("n_group", 1), n_limited_groups=get("topk_group", 1),
        score_func=get("scoring_func", "softmax"), route_scale=get("routed_scaling_factor", 1.0),
        norm_topk_prob=get("norm_topk_prob", False), balance_alpha=get("aux_loss_alpha", 1e-4),
        bias_update_speed=get("bias_update_speed", 1e-3), n_mtp=get("num_nextn_predict_layers", 0),
        rope_theta=get("rope_theta", rope("rope_theta", 10000.0)),
        rope_factor=rope("factor", 1.0) if yarn else 1.0,
        original_seq_len=rope("original_max_position_embeddings", 4096),
        beta_fast=rope("beta_fast", 32), beta_slow=rope("beta_slow", 1),
        mscale=rope("mscale", 1.0), mscale_all_dim=rope("mscale_all_dim", 1.0),
        init_std=get("initializer_range", 0.006))


def hf_config(a):
    """ModelArgs -> the published config.json (dict)."""
    c = dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.inter_dim,
        moe_intermediate_size=a.moe_inter_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_heads,
        n_routed_experts=a.n_routed_experts, n_shared_experts=a.n_shared_experts,
        num_experts_per_tok=a.n_activated_experts, n_group=a.n_expert_groups,
        topk_group=a.n_limited_groups, routed_scaling_factor=a.route_scale,
        norm_topk_prob=a.norm_topk_prob, scoring_func=a.score_func,
        topk_method="noaux_tc" if a.score_func == "sigmoid" else "group_limited_greedy",
        first_k_dense_replace=a.n_dense_layers, q_lora_rank=a.q_lora_rank or None,
        kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
        rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
        max_position_embeddings=a.max_seq_len, num_nextn_predict_layers=a.n_mtp,
        hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
        rope_interleave=True, initializer_range=a.init_std,
        aux_loss_alpha=a.balance_alpha, bias_update_speed=a.bias_update_speed,
        rope_scaling=None if a.rope_factor <= 1 else dict(
            type="yarn", factor=a.rope_factor, original_max_position_embeddings=a.original_seq_len,
            beta_fast=a.beta_fast, beta_slow=a.beta_slow, mscale=a.mscale, mscale_all_dim=a.mscale_all_dim))
    if a.fp8_weights:
        c["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                        weight_block_size=[FP8_BLOCK, FP8_BLOCK])
    return c


# Our module -> its published name (inside model.layers.{i}. for a block's modules), and the dim
# along which tensor parallelism splits its weight (None: every rank holds all of it; routed
# experts are split by expert instead, see shard). MTP module k is model.layers.{n_layers + k}.
NAMES = {
    "embed": ("model.embed_tokens", None),
    "norm": ("model.norm", None),
    "head": ("lm_head", 0),
    "attn_norm": ("input_layernorm", None),
    "ffn_norm": ("post_attention_layernorm", None),
    "attn.wq": ("self_attn.q_proj", 0),
    "attn.wq_a": ("self_attn.q_a_proj", None),
    "attn.q_norm": ("self_attn.q_a_layernorm", None),
    "attn.wq_b": ("self_attn.q_b_proj", 0),
    "attn.wkv_a": ("self_attn.kv_a_proj_with_mqa", None),
    "attn.kv_norm": ("self_attn.kv_a_layernorm", None),
    "attn.wkv_b": ("self_attn.kv_b_proj", 0),
    "attn.wo": ("self_attn.o_proj", 1),
    "ffn.w1": ("mlp.gate_proj", 0),                                  # dense FFN
    "ffn.w3": ("mlp.up_proj", 0),
    "ffn.w2": ("mlp.down_proj", 1),
    "ffn.shared_experts.w1": ("mlp.shared_experts.gate_proj", 0),
    "ffn.shared_experts.w3": ("mlp.shared_experts.up_proj", 0),
    "ffn.shared_experts.w2": ("mlp.shared_experts.down_proj", 1),
    "ffn.gate": ("mlp.gate", None),                                 # bias: e_score_correction_bias
    "ffn.experts.w1": ("mlp.experts.{j}.gate_proj", None),          # stacked (E, ...) here
    "ffn.experts.w3": ("mlp.experts.{j}.up_proj", None),
    "ffn.experts.w2": ("mlp.experts.{j}.down_proj", None),
    "enorm": ("enorm", None),                                        # MTP module
    "hnorm": ("hnorm", None),
    "eh_proj": ("eh_proj", None),
    "shared_head.norm": ("shared_head.norm", None),
}
LEAVES = {"weight": "weight", "scale": "weight_scale_inv", "bias": "e_score_correction_bias"}


def _split_name(name, n_layers):
    """Our parameter name -> (published prefix, NAMES key, leaf)."""
    prefix = ""
    if m := re.fullmatch(r"layers\.(\d+)\.(.*)", name):
        prefix, name = f"model.layers.{m[1]}.", m[2]
    elif m := re.fullmatch(r"mtp\.(\d+)\.(block\.)?(.*)", name):
        prefix, name = f"model.layers.{n_layers + int(m[1])}.", m[3]
        name = "shared_head." + name if not m[2] and name.startswith("norm.") else name
    if m := re.fullmatch(r"(ffn\.experts\.w\d)(_scale)?", name):   # stacked experts' parameters
        return prefix, m[1], "scale" if m[2] else "weight"
    module, leaf = name.rsplit(".", 1)
    return prefix, module, leaf


def hf_name(name, n_layers):
    """Our parameter name -> the published one; stacked experts give a template with {j}.
    e.g. layers.3.ffn.experts.w1 -> model.layers.3.mlp.experts.{j}.gate_proj.weight,
         mtp.0.norm.weight      -> model.layers.61.shared_head.norm.weight (n_layers = 61)."""
    prefix, module, leaf = _split_name(name, n_layers)
    return prefix + NAMES[module][0] + "." + LEAVES[leaf]


def split_dim(name, n_layers):
    return NAMES[_split_name(name, n_layers)[1]][1]


def hf_state_dict(model):
    """Our state dict under the published names; stacked experts split per expert, and each
    MTP layer given its copies of the shared embedding and head, as the published files do."""
    out, n = {}, model.args.n_layers
    for name, t in model.state_dict().items():
        hf = hf_name(name, n)
        if "{j}" in hf:
            out.update({hf.format(j=j): t[j].clone() for j in range(t.size(0))})
        else:
            out[hf] = t.detach().clone()
    for k in range(len(model.mtp)):
        out[f"model.layers.{n + k}.embed_tokens.weight"] = model.embed.weight.detach().clone()
        out[f"model.layers.{n + k}.shared_head.head.weight"] = model.head.weight.detach().clone()
    return out


def save_pretrained(model, path, max_shard_bytes=4 << 30):
    """Write config.json and safetensors (sharded with an index past max_shard_bytes). Every
    file goes to a temporary name first and is renamed, so a kill never leaves a torn file."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    state = hf_state_dict(model)
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = t.contiguous(), size + nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard_ in zip(names, shards):
        atomic_write(path / fname, lambda tmp: save_file(shard_, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
        atomic_write(path / "model.safetensors.index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    cfg = {**hf_config(model.args), "torch_dtype": str(model.embed.weight.dtype).split(".")[-1]}
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))


def meta_model(args, rank=0, world_size=1, dtype=torch.float32, placement=None):
    """The model as rank `rank` of world_size holds it (its experts as `placement` puts them, see
    shard), on the meta device (nothing allocated): high-precision tensors in dtype, or FP8
    projections when dtype is float8_e4m3fn (bfloat16 for the rest). The routing bias stays float32."""
    keep_fp8 = dtype == FP8_DTYPE
    with torch.device("meta"):
        model = Transformer(replace(args, fp8_weights=False))
        if world_size > 1:
            shard(model, rank, world_size, placement)
        if keep_fp8:
            use_fp8(model, store=True)
    model.args = replace(args, fp8_weights=keep_fp8)
    for name, p in model.named_parameters():
        if p.dtype != FP8_DTYPE and not name.endswith("scale"):
            p.data = p.data.to(torch.bfloat16 if keep_fp8 else dtype)
    return model


def load_pretrained(path, device="cpu", dtype=torch.float32, rank=0, world_size=1, placement=None):
    """Load a published-layout folder. FP8 weights are dequantized to `dtype`, or kept FP8
    (with bfloat16 compute) when dtype is torch.float8_e4m3fn. MTP layers load when present.
    With world_size > 1 (torchrun, process group initialised) this rank reads only its part:
    its slices of the split projections (NAMES) and the routed experts that `placement` gives
    it (see shard)."""
    from safetensors import safe_open
    from tqdm import tqdm
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} not found; train one with "
                              "`python train.py` or pass the folder of a published checkpoint")
    try:
        args = args_from_hf_config(json.loads(read_file(path / "config.json", fix="fix it or use another checkpoint")))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}; fix it or use another checkpoint") from None
    index = path / "model.safetensors.index.json"
    try:
        files = (sorted(set(json.loads(read_file(index, fix="re-save the checkpoint"))["weight_map"].values()))
                 if os.path.lexists(index) else [f.name for f in sorted(path.glob("model*.safetensors")) if f.is_file()])
    except (ValueError, RecursionError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"cannot read {index}: {e!r}") from None
    for f in files:  # an index names files of this folder, nothing else
        if not isinstance(f, str) or not f.endswith(".safetensors") or Path(f).name != f or not (path / f).is_file():
            raise CheckpointError(f"{index.name if index.exists() else path} names {f!r}, not a .safetensors "
                                  f"file of {path}; re-save the checkpoint or fix its index")
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    where = {}  # published tensor name -> file
    try:
        for f in files:
            with safe_open(path / f, "pt") as fh:
                keys = fh.keys()
            if twice := next((k for k in keys if k in where), None):
                raise CheckpointError(f"tensor {twice} is in both {where[twice]} and {f} of {path}; "
                                      "remove one copy or re-save the checkpoint")
            where.update(dict.fromkeys(keys, f))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {path / f}: {e}") from None
    if args.n_mtp and not any(k.startswith(f"model.layers.{args.n_layers}.") for k in where):
        args = replace(args, n_mtp=0)  # e.g. saved by a tool that drops the MTP layers
    keep_fp8 = dtype == FP8_DTYPE
    try:
        model = meta_model(args, rank, world_size, dtype, placement)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if short := memory_shortfall(need, device):  # refuse before allocating, not by the kernel's OOM killer
        raise CheckpointError(f"{path}: the model {short}; serve it on more ranks or a larger device "
                              f"(python infer.py --ckpt {path} --dry-run RANKS shows the memory per rank)")
    model.to_empty(device=device)
    # every destination: published name -> (our name, tensor to fill, expert index or None)
    targets = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith("scale"):
            continue  # filled together with their weight
        hf = hf_name(name, args.n_layers)
        if "{j}" in hf:  # stacked experts: this rank's (slot j holds expert held[j], see shard)
            held = getattr(model.get_submodule(name.rpartition(".")[0]), "held", range(t.size(0)))
            targets.update({hf.format(j=held[j]): (name, t, j) for j in range(t.size(0))})
        else:
            targets[hf] = (name, t, None)
    handles = {}

    def read(key, want, d):
        """This rank's part of tensor `key` -> (tensor, FP8 block scales or None): along dim d
        (None: all of it) rows [rank n, (rank + 1) n) of a tensor of world_size * n rows, for FP8
        the 128-blocks around them with their scales; dequantized unless FP8 is kept."""
        sl = handles[where[key]].get_slice(key)
        full = list(sl.get_shape())
        if d is not None:
            full[d] //= world_size
        if full != list(want) or d is not None and sl.get_shape()[d] % world_size:
            per_rank = f" on each of {world_size} ranks" if world_size > 1 else ""
            raise CheckpointError(f"shape mismatch for {key}: expected {tuple(want)}{per_rank}, "
                                  f"found {tuple(sl.get_shape())}")
        lo, hi = (rank * want[d], (rank + 1) * want[d]) if d is not None else (0, want[0])
        d = d or 0
        rows = lambda s, a, b: s[(slice(None),) * d + (slice(a, b),)]  # [a, b) along dim d
        scale_key = key.replace(".weight", ".weight_scale_inv")
        if scale_key not in where or sl.get_dtype() != "F8_E4M3":
            return rows(sl, lo, hi), None
        b0, b1 = lo // FP8_BLOCK, -(-hi // FP8_BLOCK)  # the 128-blocks covering [lo, hi)
        t = rows(sl, b0 * FP8_BLOCK, min(b1 * FP8_BLOCK, sl.get_shape()[d]))
        if where[scale_key] not in handles:  # each shard opened once
            handles[where[scale_key]] = safe_open(path / where[scale_key], "pt", device=str(device))
        scale = rows(handles[where[scale_key]].get_slice(scale_key), b0, b1)
        if keep_fp8 and lo % FP8_BLOCK:
            raise CheckpointError(f"{key}: rank {rank}'s rows start at {lo}, inside a 128-block; keep FP8 "
                                  "with a number of ranks that cuts at block edges, or load as bfloat16")
        if not keep_fp8:
            t, scale = fp8_dequantize(t, scale), None
        return t.narrow(d, lo - b0 * FP8_BLOCK, hi - lo), scale

    try:
        for f in tqdm(files, desc="loading", unit="shard", disable=True if len(files) < 2 else None):  # None: a terminal's
            handles[f] = safe_open(path / f, "pt", device=str(device))
            for key in handles[f].keys():
                if key not in targets:
                    continue  # another rank's expert, or unused (the MTP layer's copy of the embedding)
                name, dest, j = targets.pop(key)
                d = split_dim(name, args.n_layers) if world_size > 1 else None
                t, scale = read(key, dest.shape[1:] if j is not None else dest.shape, d)
                if t.dtype == FP8_DTYPE and scale is None:
                    raise CheckpointError(f"{key} is FP8 but its weight_scale_inv is missing")
                if not torch.isfinite(t.float() if t.dtype == FP8_DTYPE else t).all() or \
                        scale is not None and not torch.isfinite(scale).all():
                    raise CheckpointError(f"{key} in {path / f} holds NaN or inf; the checkpoint is corrupt: "
                                          "re-save it or point to another checkpoint")
                if dest.dtype == FP8_DTYPE and scale is None:  # a high-precision tensor where we keep FP8
                    t, scale = fp8_quantize(t, WEIGHT)
                with torch.no_grad():
                    (dest[j] if j is not None else dest).copy_(t)
                    if dest.dtype == FP8_DTYPE:  # keep FP8: bring the block scales along
                        sdest = model.get_parameter(name + "_scale" if j is not None else
                                                    name.replace(".weight", ".scale"))
                        (sdest[j] if j is not None else sdest).copy_(scale)
    finally:
        handles.clear()
    if targets:
        raise CheckpointError(f"missing tensor {next(iter(targets))} in {path} ({len(targets)} missing in all)")
    model.freqs_cis = precompute_freqs_cis(args).to(device)
    for m in model.moe_layers():
        m.load = torch.zeros_like(m.load)
    return model.eval()


# The tokenizer's side files: the ids that begin a prompt, end generation and frame a FIM prompt,
# read as Hugging Face reads them. The PSM tokens (§4.1) by name: DeepSeek-V3's tokenizer.json
# (full-width bars, U+2581 for the space), then our byte tokenizer's (train.py's SPECIALS, a test
# holds them equal), which a tokenizer.json trained for this repo would use.
FIM_NAMES = [("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
             ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>")]


def read_json(path):
    """A side file's JSON object; {} where the file is absent or holds no object."""
    if not os.path.lexists(path):
        return {}
    try:
        config = json.loads(read_file(path, fix="fix or remove it"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; fix or remove it") from None
    return config if isinstance(config, dict) else {}


def special_ids(ckpt, token_id, vocab_size):
    """-> (begin id to put before prompts or None, end ids). Each from the first file that names
    it: generation_config.json, then config.json (ids; eos may be a list), as Hugging Face's
    generate() reads them, then tokenizer_config.json (a token as a string or {"content": ...},
    looked up with token_id, None without a tokenizer). The begin id only where
    tokenizer_config.json sets add_bos_token. Ids outside the vocabulary are dropped."""
    generation, config, tokenizer = (read_json(os.path.join(ckpt, name)) for name in
                                     ("generation_config.json", "config.json", "tokenizer_config.json"))

    def ids(kind):
        key = f"{kind}_token_id"
        named = next((c[key] for c in (generation, config) if c.get(key) is not None), None)
        if named is None and token_id is not None:
            token = tokenizer.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            named = token_id(token) if isinstance(token, str) else None
        return [i for i in (named if isinstance(named, list) else [named]) if type(i) is int and 0 <= i < vocab_size]

    bos = ids("bos")
    return (bos[0] if bos and tokenizer.get("add_bos_token") is True else None), tuple(ids("eos"))


def tokenizer_ids(ckpt, token_id, vocab_size):
    """-> (begin id or None, end ids, FIM (begin, hole, end) ids or None) of the tokenizer in the
    folder ckpt: special_ids, and the first FIM_NAMES whose three tokens token_id (the
    tokenizer.json's token -> id or None; None without one) finds in the vocabulary."""
    bos, end = special_ids(ckpt, token_id, vocab_size)
    fims = [tuple(map(token_id, names)) for names in FIM_NAMES] if token_id is not None else []
    return bos, end, next((f for f in fims if all(i is not None and i < vocab_size for i in f)), None)


# ----------------------------------------------------------------------------------------------
# Accounting (no allocation: the model is built on the meta device)

def accounting(args, seq_len=None):
    """Parameters (total, activated per token, MTP), training FLOPs per token and the BF16 MLA
    cache bytes per token. Published V3: 671B total, 37B activated (§1); the MTP module is
    11.61B here, its block 11.51B (DeepSeek's weight notes: 11.5B unique)."""
    seq_len = seq_len or args.max_seq_len
    with torch.device("meta"):
        model = Transformer(args)
    total = active = mtp = 0
    E, K = max(args.n_routed_experts, 1), args.n_activated_experts
    for name, p in model.named_parameters():
        if name.endswith("scale"):
            continue
        n = p.numel()
        routed = ".experts." in name
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        active += n * K // E if routed else n
    mtp_active = sum(p.numel() * (K / E if ".experts." in n else 1)
                     for n, p in model.mtp.named_parameters() if not n.endswith("scale"))
    emb = args.vocab_size * args.dim
    matmul_params = active - emb + mtp_active + args.n_mtp * emb  # embeddings are lookups
    # causal attention: QK^T and PV over seq_len / 2 keys on average, x3 for forward + backward
    attn_flops = 3 * (args.n_layers + args.n_mtp) * args.n_heads * (args.qk_head_dim + args.v_head_dim) * seq_len
    return {"params_total": total, "params_active": active, "params_mtp": mtp,
            "params_embedding": emb,
            "flops_per_token": 6 * matmul_params + attn_flops,
            "kv_bytes_per_token": kv_bytes_per_token(args)}


def kv_bytes_per_token(args, bytes_per_number=2):
    """The MLA cache of one token: kv_lora_rank + qk_rope_head_dim numbers (the normalised latent
    and the RoPE key) in every layer that generate() gives a cache, the MTP layers included
    (speculative decoding runs them). V3 in BF16: 62 x 576 x 2 = 71,424 bytes (61 x 576 x 2 = 70,272
    for the main model alone)."""
    return (args.n_layers + args.n_mtp) * (args.kv_lora_rank + args.qk_rope_head_dim) * bytes_per_number


def weight_bytes_per_rank(args, world_size=1, dtype=torch.float32, n_redundant=0):
    """Bytes of weights that each of world_size serving ranks holds (see shard), in three parts:
    its 1/world_size of the routed experts; its slice of the tensors that tensor parallelism
    splits (NAMES' split dims: heads, FFN width, vocabulary); and the replicated rest. With
    n_redundant experts per MoE layer, a fourth: the copies on the rank that holds the most,
    ceil(n_redundant / world_size) per layer (redundant_placement's room). dtype as in meta_model
    (float8_e4m3fn: FP8 projections with their scales)."""
    E, room = args.n_routed_experts, -(-n_redundant // world_size)
    placement = None
    if n_redundant:  # rank 0 holds its home experts and copies of `room` experts of rank 1
        layer = [h + (0,) if E // world_size <= e < E // world_size + room else h
                 for e, h in enumerate(home_placement(E, world_size))]
        n_moe = sum(i >= args.n_dense_layers for i in [*range(args.n_layers)] + [args.n_layers] * args.n_mtp)
        placement = [layer] * n_moe
    model = meta_model(args, 0, world_size, dtype, placement)
    parts = {"routed experts": 0, "split (heads, FFN width, vocabulary)": 0, "replicated": 0}
    for name, p in model.named_parameters():
        part = 0 if ".experts." in name else 1 if split_dim(name, args.n_layers) is not None else 2
        parts[list(parts)[part]] += p.numel() * p.element_size()
    if n_redundant:  # the copies' share of the rank's experts, listed after them
        copies = parts["routed experts"] * room // (E // world_size + room)
        parts = {"routed experts": parts.pop("routed experts") - copies, "redundant experts": copies, **parts}
    return parts


def activation_bytes(args, batch_size, seq_len, autocast=True, attention="fused", expert_rows=1.0):
    """Bytes that autograd keeps from the forward to the backward of one training micro-batch, by
    component, counted tensor by tensor from what this file's forward saves (checked against
    saved_tensors_hooks and a measured CPU peak by the tests). Per token (N = batch_size * seq_len):
    - precision: autocast=True is bf16 autocast (c = 2 bytes per matmul activation, each Linear
      saving its own bf16 copy of a shared input, bf16 weight copies); False is float32, and also
      --fp8, whose FP8Matmul saves its float32 input and returns float32 (the e4m3 copies are
      transient); norms, residual stream, gate, losses are float32 (f = 4) either way;
    - MLA: norms (input, 1/rms, normed) and the inputs of wq_a/wkv_a, wq_b, wkv_b, wo; attention
      "fused" (CUDA flash/memory-efficient kernels): q, k, the kv_b output that v views, the output
      and its log-sum-exp, never the T x T matrix; "math" (the CPU path when qk and v head dims
      differ): float32 q, k, v and the full (T, T) probabilities of every head;
    - MoE: per routed row 4D + 4I numbers (not D + 3I: w1 and w3 each save a copy of the input
      under autocast, and index_add saves its source h * g beside h) times
      K * expert_rows rows per token: 1.0 for the grouped and segments back-ends (exactly N*K rows
      however uneven the routing: every CUDA run, and --fp8 everywhere), E * cap / (N*K) for the
      padded one (CPU training without --fp8), cap the largest expert load rounded up to 64;
      plus the gate and the shared expert;
    - the MTP module (two norms, eh_proj, one MoE block) on T - 1 positions, and the logits:
      float32 log-softmax of the main and MTP heads, and the main logits the caller holds."""
    a, N, T = args, batch_size * seq_len, seq_len
    f, c = 4, 2 if autocast else 4
    D, H, V = a.dim, a.n_heads, a.vocab_size
    copies = lambda k: k * c if autocast else f    # the saved input of k Linears fed by one tensor

    def norm(w, out_bytes, k):                     # RMSNorm: input, 1/rms, normed, Linear inputs
        return f * w + f + out_bytes * w + copies(k) * w

    def mlp(w):                                    # SwiGLU: w1 out, silu out, w3 out, w2 input
        return 4 * c * w

    def mla():
        q = norm(a.q_lora_rank, c, 1) if a.q_lora_rank else 0
        kv = norm(a.kv_lora_rank, c, 1) + (0 if autocast else f * a.qk_rope_head_dim)
        if attention == "fused":
            att = c * (2 * H * a.qk_head_dim + H * (a.qk_nope_head_dim + a.v_head_dim) + H * a.v_head_dim) + f * H
        else:
            att = f * (2 * H * a.qk_head_dim + H * a.v_head_dim + H * T)
        return norm(D, f, 2) + q + kv + att + c * H * a.v_head_dim  # + wo's input

    def moe():
        E, K, I, G = a.n_routed_experts, a.n_activated_experts, a.moe_inter_dim, a.n_expert_groups
        row = (c * (4 * D + 4 * I) if autocast else f * (3 * D + 4 * I)) + c + 3 * 8  # + gating weight, indices
        gate = f * E + 8 * (2 * G + a.n_limited_groups + K) + G + f * (K + 2)
        shared = mlp(a.n_shared_experts * I) + (2 * c * D if autocast else 0) if a.n_shared_experts else 0
        return norm(D, f, 0) + f * D + gate + shared + K * expert_rows * row

    dense = norm(D, f, 2) + mlp(a.inter_dim)
    n_moe = a.n_layers - a.n_dense_layers if a.n_routed_experts else 0
    block_moe = mla() + moe() if a.n_routed_experts else mla() + dense
    mtp = 2 * norm(D, f, 0) + copies(1) * 2 * D + block_moe + norm(D, f, 1) + f * V
    out = {"attention": a.n_layers * mla() * N,
           "dense FFN": (a.n_layers - n_moe) * dense * N,
           "MoE": n_moe * moe() * N,
           "MTP module": a.n_mtp * mtp * (N - batch_size),
           "head and logits": (norm(D, f, 1) + (c + f) * V + 8) * N}
    return {k: int(v) for k, v in out.items()}


def training_memory(args, batch_size, seq_len, autocast=True, attention="fused", expert_rows=1.0, grad_accum=1):
    """Bytes of one training step: float32 weights, gradients and the two AdamW moments; autocast's
    bf16 copy of every matmul weight (made once per forward, kept for the backward); the
    activations above; and the backward's first transient, the float32 gradients of the main and
    MTP log-softmax (2 x N x V x 4 bytes). Peak: at the start of the backward, weights + moments +
    copies + activations + transient (gradients are None then: zero_grad sets them so, and each
    one is allocated as the activations before it are freed), or at its end, weights + moments +
    gradients, whichever is larger; with grad_accum > 1 the later micro-batches run beside the
    gradients. Measured on CPU the peak lands within a few per cent of this."""
    with torch.device("meta"):
        model = Transformer(args)
    n = sum(p.numel() for p in model.parameters())
    matmul = sum(p.numel() for name, p in model.named_parameters()
                 if p.dim() >= 2 and "embed" not in name and "gate" not in name)
    act = activation_bytes(args, batch_size, seq_len, autocast, attention, expert_rows)
    out = {"weights": 4 * n, "gradients": 4 * n, "AdamW moments": 8 * n,
           "bf16 weight copies": 2 * matmul if autocast else 0, **act,
           "logits gradient": 2 * batch_size * seq_len * args.vocab_size * 4}
    forward = out["bf16 weight copies"] + sum(act.values()) + out["logits gradient"]
    out["activations total"] = sum(act.values())
    grads = out["gradients"]
    out["peak"] = out["weights"] + out["AdamW moments"] + (forward + grads if grad_accum > 1 else max(forward, grads))
    return out
