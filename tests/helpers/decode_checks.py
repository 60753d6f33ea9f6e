"""Checks shared by the decode tests: selections against float64 pooled scores, oracle outputs.

``reference.py`` is the float64 oracle of the method (one request, keys in position order); these
helpers map the batched, paged layout onto it.
"""

from __future__ import annotations

import torch

import reference as ref


def request_kv(batch, b):
    """Keys/values of request b in position order (CPU): [L, Hkv, D] each."""
    n = int(batch.seq_lens[b])
    slots = batch.req_to_token[int(batch.req_idx[b]), :n].long()
    return batch.k_pool[slots].cpu(), batch.v_pool[slots].cpu()


def oracle_pooled(batch, b, scale):
    """[Hkv, L] float64 group-pooled post-softmax probabilities of request b's decode query."""
    k, _ = request_kv(batch, b)
    n = k.shape[0]
    tiles = ref.oracle_decode_tiles(n, lambda visible: visible)
    return ref.pooled_scores(batch.q[b:b + 1].cpu(), k, tiles, scale)[:, 0]


def assert_valid_topk(pos, valid, batch, scale, rel=1e-4):
    """Each (request, KV head) row picks topk[b] distinct in-range keys that form a Top-k of the
    float64 pooled scores, up to ``rel`` of the row's largest score (float near-ties)."""
    for b in range(batch.q.shape[0]):
        scores = oracle_pooled(batch, b, scale)  # [Hkv, L]
        n, kb = scores.shape[1], int(batch.topk[b])
        for h in range(scores.shape[0]):
            chosen = pos[b, h][valid[b, h]].cpu().long()
            assert chosen.numel() == kb
            assert int(chosen.unique().numel()) == kb, "duplicate keys"
            assert int(chosen.min()) >= 0 and int(chosen.max()) < n, "key out of range"
            kth = scores[h].topk(kb).values[-1]
            tol = rel * float(scores[h].max())
            assert float(scores[h][chosen].min()) >= float(kth) - tol
            # and nothing left out beats the weakest chosen key by more than the tolerance
            left = torch.ones(n, dtype=torch.bool)
            left[chosen] = False
            if left.any():
                assert float(scores[h][left].max()) <= float(scores[h][chosen].min()) + tol


def oracle_sparse_out(batch, pos, valid, scale, head_map=None):
    """[B, Hq, Dv] float64 oracle attention over the given selection (row head_map[h] for KV
    head h)."""
    b_sz, hq, _ = batch.q.shape
    hkv = batch.k_pool.shape[1]
    g = hq // hkv
    hm = list(range(hkv)) if head_map is None else [int(x) for x in head_map]
    outs = []
    for b in range(b_sz):
        k, v = request_kv(batch, b)
        n = k.shape[0]
        mask = torch.zeros(hq, 1, n, dtype=torch.bool)
        for h in range(hkv):
            chosen = pos[b, hm[h]][valid[b, hm[h]]].cpu().long()
            mask[h * g:(h + 1) * g, 0, chosen] = True
        outs.append(ref.masked_attention(batch.q[b:b + 1].cpu(), k, v, mask, scale)[0])
    return torch.stack(outs)
