"""Layer-to-layer, head-to-head similarity of Top-k selections, streamed tile block by block.

For a source layer l1 <= target layer l2, target KV head h2, source KV head h1 and query tile t:

    ratio[t] = (sum_{j in I_l1[h1,t]} A_l2[h2,t,j] + D_l2[h2,t])
             / (sum_{j in I_l2[h2,t]} A_l2[h2,t,j] + D_l2[h2,t])

the share of l2's own Top-k mass (diagonal tile included) that l1's selection recovers. It is
reduced by the minimum over the sample's sparse tiles (tiles whose budget is smaller than their
candidate count; dense tiles give exactly 1) and averaged over samples:
``sim[l1, l2, h2, h1]``. Entries with l1 > l2 are NaN.

Memory: the selections of every layer of the current sample (int32 ``[layers, Hkv, tiles, kmax]``),
one block of the target layer's pooled probabilities and one bounded gather temporary; never an
L x L matrix.
"""

from __future__ import annotations

import torch


class SimilarityAccumulator:
    """Collects sim[l1, l2, h2, h1] over samples; layers must arrive in order within a sample.

    ``gather_bytes`` bounds the temporary of one gather (target heads x source layers x source
    heads x tiles x k, float32); source layers are processed in chunks that fit.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, device="cpu",
                 gather_bytes: int = 64 << 20):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.device = torch.device(device)
        self.gather_bytes = gather_bytes
        shape = (num_layers, num_layers, num_kv_heads, num_kv_heads)
        self.total = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self.num_samples = 0
        self._sel = None
        self._next_layer = 0

    # -- one sample -------------------------------------------------------------------------
    def begin_sample(self, num_tiles: int, kmax: int, sentinel: int) -> None:
        """``sentinel``: the index (the sample length L) that marks an unused selection slot."""
        n, h = self.num_layers, self.num_kv_heads
        # every layer's selection for the whole sample: int32 [layers, Hkv, tiles, kmax]
        self._sel = torch.full((n, h, num_tiles, kmax), sentinel, dtype=torch.int32,
                               device=self.device)
        self._min = torch.full((n, n, h, h), float("inf"), dtype=torch.float64,
                               device=self.device)
        self._next_layer = 0
        self._current = None

    def add_block(self, layer: int, a: int, b: int, A: torch.Tensor, D: torch.Tensor,
                  idx: torch.Tensor, sparse: torch.Tensor) -> None:
        """Tiles [a, b) of ``layer``.

        A: [Hkv, b-a, L+1] pooled probabilities, column L (the sentinel) zero;
        D: [Hkv, b-a] diagonal-tile mass; idx: [Hkv, b-a, k<=kmax] the layer's own selection
        (sentinel where unused); sparse: [b-a] bool, the tiles that count.
        """
        if layer != self._current:
            if layer != self._next_layer:
                raise RuntimeError(f"layer {layer} arrived, expected {self._next_layer}")
            self._current, self._next_layer = layer, layer + 1
        A = A.to(self.device, torch.float32)
        D = D.to(self.device, torch.float32)
        self._sel[layer, :, a:b, : idx.shape[-1]] = idx.to(self.device, torch.int32)
        sparse = sparse.to(self.device)
        if not bool(sparse.any()):
            return
        sel = self._sel[: layer + 1, :, a:b]  # [layer+1, H1, nb, kmax]
        if not bool(sparse.all()):
            A, D, sel = A[:, sparse], D[:, sparse], sel[:, :, sparse]
        sel = sel.long()
        h2, nt, p = A.shape
        h1, k = sel.shape[1], sel.shape[-1]
        den = torch.gather(A, 2, sel[layer]).sum(-1) + D  # [H2, nt] own Top-k + diagonal
        per_layer = max(1, h2 * h1 * nt * max(k, 1) * 4)
        chunk = max(1, self.gather_bytes // per_layer)
        for l0 in range(0, layer + 1, chunk):
            l1 = min(layer + 1, l0 + chunk)
            m = (l1 - l0) * h1
            index = sel[l0:l1].reshape(m, nt, k)
            rec = torch.gather(A[:, None].expand(h2, m, nt, p), 3,
                               index[None].expand(h2, m, nt, k)).sum(-1)  # [H2, m, nt]
            rec = rec.view(h2, l1 - l0, h1, nt).transpose(0, 1)  # [c, H2, H1, nt]
            ratio = (rec + D[None, :, None]) / den[None, :, None]
            self._min[l0:l1, layer] = torch.minimum(self._min[l0:l1, layer],
                                                    ratio.amin(-1).double())

    def end_sample(self) -> None:
        m = self._min
        m = torch.where(torch.isinf(m), torch.ones_like(m), m)  # no sparse tile: all kept
        self.total += m
        self.num_samples += 1
        self._sel = self._min = None

    # -- result -----------------------------------------------------------------------------
    def result(self) -> torch.Tensor:
        """sim[l1, l2, h2, h1] (float64, CPU); NaN where l1 > l2."""
        if self.num_samples == 0:
            raise RuntimeError("no samples")
        sim = (self.total / self.num_samples).cpu()
        n = self.num_layers
        lower = torch.ones(n, n, dtype=torch.bool).tril(-1)  # l1 > l2
        sim[lower] = float("nan")
        return sim
