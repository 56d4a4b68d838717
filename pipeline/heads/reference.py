"""A slow, loop-structured STRM forward written directly from STRM_SPEC sections 2-7: the test oracle.

It reads the parameters of an `STRMHeads` module but none of its fast code paths: separate Q, K, V
products and an explicit softmax in PLE (and in each Jnt-ST layer, over the literally flattened L*P
tokens), literal tuple concatenation with itertools, and Python
loops over queries and classes for TRM and QC (torch.cdist for the QC distances). Dropout follows
the module's train/eval mode, so the benchmark can time a training step with it.
"""

from __future__ import annotations

import itertools
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.heads.fle import MixerEnrich
from pipeline.heads.jnt import JointEnrich
from pipeline.heads.model import STRMHeads
from pipeline.heads.ple import SelfAttentionEnrich
from pipeline.heads.qc import QC
from pipeline.heads.trm import TRM


def _pe(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """x [N, tokens, D] + pe, pe[pos, 2i] = 0.1 sin(pos / 10000^(2i/D)), pe[pos, 2i+1] = 0.1 cos(..); dropout."""
    tokens, dim = x.shape[-2], x.shape[-1]
    angle = torch.arange(tokens, dtype=torch.float64)[:, None] / 10000 ** (
        torch.arange(0, dim, 2, dtype=torch.float64) / dim
    )
    table = torch.zeros(tokens, dim, dtype=torch.float64)
    table[:, 0::2] = 0.1 * torch.sin(angle)
    table[:, 1::2] = 0.1 * torch.cos(angle[:, : dim // 2])
    return F.dropout(x + table.to(x.dtype), p, training)


def _self_attention_block(block: SelfAttentionEnrich, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return _attention_layer(block, _pe(x, p, training))


def _attention_layer(block: SelfAttentionEnrich, x: torch.Tensor) -> torch.Tensor:
    """The block after its PE: alpha = gamma * softmax(Q K^T * scale) V + x, then psi(alpha) + alpha."""
    if block.qkv is not None:
        wq, wk, wv = block.qkv.weight.chunk(3, dim=0)
        bq, bk, bv = block.qkv.bias.chunk(3, dim=0)
        q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
        attention = torch.softmax(q @ k.transpose(1, 2) * block.scale, dim=-1)
        assert block.gamma is not None  # built together with qkv
        x = block.gamma * (attention @ v) + x
    fc1, fc2, fc3 = block.psi[0], block.psi[2], block.psi[4]
    psi = fc3(torch.relu(fc2(torch.relu(fc1(x)))))
    return psi + x


def _mixer_block(block: MixerEnrich, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    x = _pe(x, p, training)
    t1, t2 = block.token_mlp[0], block.token_mlp[2]
    x = x + t2(torch.relu(t1(x.transpose(1, 2)))).transpose(1, 2)
    c1, c2 = block.channel_mlp[0], block.channel_mlp[2]
    return x + c2(torch.relu(c1(x)))


def _joint_block(block: JointEnrich, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Jnt-ST, x [n, L, P, D]: token l*P + q of a video is patch q of frame l; PE over that index once,
    then every layer attends over all L*P tokens of the video. Returns the tokens as [n, L, P, D]."""
    L, P = x.shape[1:3]
    tokens = torch.stack([x[:, t, q] for t in range(L) for q in range(P)], dim=1)
    tokens = _pe(tokens, p, training)
    for layer in block.layers:
        tokens = _attention_layer(cast(SelfAttentionEnrich, layer), tokens)
    return torch.stack([torch.stack([tokens[:, t * P + q] for q in range(P)], dim=1) for t in range(L)], dim=1)


def _enrich(block: nn.Module | None, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if block is None:
        return x
    if isinstance(block, SelfAttentionEnrich):
        return _self_attention_block(block, x, p, training)
    if isinstance(block, MixerEnrich):
        return _mixer_block(block, x, p, training)
    raise TypeError(f"no reference for enrichment block {type(block).__name__}")


def _tuple_vectors(x: torch.Tensor, tuples: list[tuple[int, ...]]) -> torch.Tensor:
    """x [n, L, D] -> [n, T, w*D], each tuple the concatenation of its frames, first frame first."""
    return torch.stack([torch.cat([x[:, t] for t in tup], dim=-1) for tup in tuples], dim=1)


def reference_forward(
    heads: STRMHeads, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor
) -> dict:
    """Logits and intermediates of `heads` for one task, the slow way.

    Returns a dict: logits, trm_logits, qc_logits (or None) [n_q, way]; ple_patches_support,
    H_support, E_support, H_query, E_query.
    """
    p, training = heads.options["dropout"], heads.training
    way = int(support_labels.max()) + 1
    out: dict[str, torch.Tensor | None] = {}
    frames: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, x in (("support", support), ("query", query)):
        n, L, P, D = x.shape
        x = (x.float() - heads.feature_mean) / heads.feature_std
        if heads.joint is not None:
            patches = _joint_block(heads.joint, x, p, training)
        else:
            patches = _enrich(heads.ple, x.reshape(n * L, P, D), p, training).reshape(n, L, P, D)
        h = patches.mean(dim=2)
        e = _enrich(heads.fle, h, p, training)
        out[f"ple_patches_{name}"], out[f"H_{name}"], out[f"E_{name}"] = patches, h, e
        frames[name] = (h, e)

    trm_all, qc_all = [], []
    for i, w in enumerate(heads.cardinalities):
        all_tuples = list(itertools.combinations(range(heads.frames), w))
        keep = heads.kept_tuples(i)
        tuples = all_tuples if keep is None else [all_tuples[j] for j in keep.tolist()]
        trm = cast(TRM, heads.trm[i])
        kv = {}
        for name, (_h, e) in frames.items():
            t = _tuple_vectors(_pe(e, p, training), tuples)
            norm = trm.norm_k
            k = F.layer_norm(trm.k_linear(t), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            kv[name] = (k, trm.v_linear(t))
        (sk, sv), (qk, qv) = kv["support"], kv["query"]
        logits = torch.zeros(query.shape[0], way, dtype=sk.dtype)
        for q in range(query.shape[0]):
            for c in range(way):
                members = (support_labels == c).nonzero().flatten()
                class_k = sk[members].reshape(-1, sk.shape[-1])  # all tuples of all shots: [K*T, D']
                class_v = sv[members].reshape(-1, sv.shape[-1])
                scores = qk[q] @ class_k.T / math.sqrt(sk.shape[-1])
                prototype = torch.softmax(scores, dim=-1) @ class_v
                logits[q, c] = -((qv[q] - prototype) ** 2).sum() / len(tuples)
        trm_all.append(logits)

        if heads.qc is not None:
            qc = cast(QC, heads.qc[i])
            z = {
                name: torch.relu(qc.proj(_tuple_vectors(F.dropout(h, p, training), tuples)))
                for name, (h, _) in frames.items()
            }
            logits = torch.zeros(query.shape[0], way, dtype=sk.dtype)
            for q in range(query.shape[0]):
                for c in range(way):
                    members = (support_labels == c).nonzero().flatten()
                    class_z = z["support"][members].reshape(-1, z["support"].shape[-1])
                    distances = torch.cdist(z["query"][q], class_z)  # [T_q, K*T]
                    logits[q, c] = -distances.min(dim=1).values.mean()
            qc_all.append(logits)

    trm_logits = torch.stack(trm_all).mean(0)
    qc_logits = torch.stack(qc_all).mean(0) if qc_all else None
    out["trm_logits"], out["qc_logits"] = trm_logits, qc_logits
    out["logits"] = trm_logits if qc_logits is None else trm_logits + heads.lambda_qc * qc_logits
    return out
