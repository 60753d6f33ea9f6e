"""Batched Kascade decode in plain PyTorch: the reference for the Triton decode kernels.

One decode query per request, keys read straight from SGLang's token-major pool
(``k_pool[slot, kv_head, :]``) through ``req_to_token[req_pool_idx[b], pos]`` (any page size: pages
only change that mapping). Written one request at a time, in float32, with no attempt at speed.

  q            [B, Hq, D]        the step's queries (Hq = G * Hkv; query head h -> KV head h // G)
  k_pool       [slots, Hkv, D]   token-major key pool (v_pool alike, [slots, Hkv, Dv])
  req_to_token [R, C] int        position -> pool slot, per request-pool row
  req_idx      [B] int           each request's row in req_to_token
  seq_lens     [B] int           keys visible to each request (the new one included)
  topk         [B] int           Top-k budget of each request (<= seq_lens)

Selections are ``(pos, valid)`` with ``pos [B, Hkv, kmax]`` key positions and ``valid`` marking the
first ``topk[b]`` entries of each row.
"""

from __future__ import annotations

import torch


def _keys(pool, req_to_token, row, n):  # [n, Hkv, D] keys of one request in position order
    return pool[req_to_token[row, :n].long()].float()


def decode_pooled_scores_torch(q, k_pool, req_to_token, req_idx, seq_lens, scale, lmax):
    """Group-pooled post-softmax probabilities, [B, Hkv, lmax] float32 (-1 past seq_lens[b])."""
    b_sz, hq, _ = q.shape
    hkv = k_pool.shape[1]
    out = torch.full((b_sz, hkv, lmax), -1.0, device=q.device)
    for b in range(b_sz):
        n = int(seq_lens[b])
        k = _keys(k_pool, req_to_token, int(req_idx[b]), n)  # [n, Hkv, D]
        qg = q[b].float().unflatten(0, (hkv, -1))  # [Hkv, G, D]
        logits = torch.einsum("hgd,nhd->hgn", qg, k) * scale  # [Hkv, G, n]
        out[b, :, :n] = logits.softmax(-1).sum(1)
    return out


def decode_select_torch(q, k_pool, req_to_token, req_idx, seq_lens, topk, scale, kmax):
    """Top-k of the pooled scores per (request, KV head): (pos [B, Hkv, kmax] int64, valid)."""
    lmax = int(seq_lens.max())
    pooled = decode_pooled_scores_torch(q, k_pool, req_to_token, req_idx, seq_lens, scale, lmax)
    kk = min(kmax, lmax)
    pos = torch.zeros(*pooled.shape[:2], kmax, dtype=torch.int64, device=q.device)
    pos[..., :kk] = pooled.topk(kk, dim=-1, sorted=True).indices
    valid = torch.arange(kmax, device=q.device)[None, None, :] < topk.long()[:, None, None]
    return pos, valid.expand_as(pos)


def decode_sparse_attention_torch(q, k_pool, v_pool, req_to_token, req_idx, pos, valid, scale,
                                  head_map=None):
    """Attention of each request's query over its selected keys, [B, Hq, Dv] in q's dtype.

    KV head h reads selection row ``head_map[h]`` (identity when None): a reuse layer attends over
    its own keys/values at the positions an anchor head chose.
    """
    b_sz, hq, _ = q.shape
    hkv = k_pool.shape[1]
    hm = torch.arange(hkv, device=q.device) if head_map is None else head_map.long()
    out = torch.empty(b_sz, hq, v_pool.shape[-1], dtype=q.dtype, device=q.device)
    for b in range(b_sz):
        row = int(req_idx[b])
        qg = q[b].float().unflatten(0, (hkv, -1))  # [Hkv, G, D]
        for h in range(hkv):
            p = pos[b, hm[h]][valid[b, hm[h]]]  # [k] positions
            slots = req_to_token[row, p].long()
            k = k_pool[slots, h].float()  # [k, D]
            v = v_pool[slots, h].float()
            w = (qg[h] @ k.T * scale).softmax(-1)  # [G, k]
            out[b, h * qg.shape[1]:(h + 1) * qg.shape[1]] = (w @ v).to(q.dtype)
    return out
