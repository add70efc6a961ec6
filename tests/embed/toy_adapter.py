"""A small but real adapter used to test the runner's mechanics (not shipped in the package).

It tokenises like the rank-based models (non-zero genes by decreasing expression, a random
subsample above ``max_genes`` seeded per cell) and runs one masked transformer layer, so padding,
sorting, batching and sampling all matter to its output.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scdm.embedding._adapter import Adapter, GeneAudit, register_adapter
from scdm.store.genes import map_genes


class ToyNet(nn.Module):
    def __init__(self, n_tokens: int, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_tokens + 1, d, padding_idx=0)
        self.value = nn.Linear(1, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, ids, values, mask):
        h = self.emb(ids) + self.value(values.unsqueeze(-1))
        h = self.layer(h, src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp(min=1)


@register_adapter
class ToyAdapter(Adapter):
    name = "toy-test"
    description = "test adapter"
    gene_id_kind = "symbol"
    requires_counts = True
    checkpoint_files = ("toy.pt", "vocab.json")
    default_batch_size = 8

    def __init__(self, checkpoint=None, *, seed=0, max_genes=12, **params):
        super().__init__(checkpoint, seed=seed)
        self.max_genes = max_genes

    def load(self, device="cpu"):
        vocab = json.loads((self.checkpoint / "vocab.json").read_text())
        self.vocab = vocab
        self.model = ToyNet(len(vocab))
        self.model.load_state_dict(torch.load(self.checkpoint / "toy.pt", weights_only=True))
        self.model.eval().to(device)

    @property
    def emb_dim(self):
        return 16

    def params(self):
        return {"max_genes": self.max_genes}

    def prepare(self, var_genes, *, gene_id_kind):
        symbols = map_genes(var_genes, src=gene_id_kind, dst="symbol")
        self.token_of_col = np.array([self.vocab.get(s, 0) if s else 0 for s in symbols], dtype=np.int64)
        matched = int((self.token_of_col > 0).sum())
        return GeneAudit(len(var_genes), matched, tuple(g for g, t in zip(var_genes, self.token_of_col) if t == 0)[:20])

    def tokenize(self, x, rows):
        delay = float(os.environ.get("SCDM_TOY_DELAY", "0"))
        if delay:
            time.sleep(delay)
        cells = []
        for i, row in enumerate(rows):
            lo, hi = x.indptr[i], x.indptr[i + 1]
            cols, vals = x.indices[lo:hi], x.data[lo:hi]
            keep = self.token_of_col[cols] > 0
            cols, vals = cols[keep], vals[keep]
            if len(cols) > self.max_genes:
                pick = np.sort(np.random.default_rng([self.seed, int(row)]).choice(len(cols), self.max_genes, replace=False))
                cols, vals = cols[pick], vals[pick]
            order = np.argsort(-vals, kind="stable")
            cells.append({"input_ids": self.token_of_col[cols[order]], "values": np.log1p(vals[order]).astype(np.float32)})
        return cells

    def collate(self, cells):
        n = max(max(len(c["input_ids"]) for c in cells), 1)
        ids = torch.zeros(len(cells), n, dtype=torch.long)
        vals = torch.zeros(len(cells), n)
        for i, c in enumerate(cells):
            ids[i, : len(c["input_ids"])] = torch.from_numpy(c["input_ids"])
            vals[i, : len(c["values"])] = torch.from_numpy(c["values"])
        return {"ids": ids, "values": vals, "mask": ids > 0}

    def embed(self, batch):
        return self.model(batch["ids"], batch["values"], batch["mask"]).float()


def write_toy_checkpoint(folder: Path, genes: list[str], seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {g: i + 1 for i, g in enumerate(genes)}
    torch.manual_seed(seed)
    net = ToyNet(len(vocab))
    torch.save(net.state_dict(), folder / "toy.pt")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return folder


if __name__ == "__main__":  # used by the SIGKILL test: python toy_adapter.py STORE DATASET CKPT CHUNK_ROWS
    import sys

    from scdm.embedding.runner import embed

    embed(sys.argv[1], sys.argv[2], "toy-test", sys.argv[3], chunk_rows=int(sys.argv[4]), progress=False)
