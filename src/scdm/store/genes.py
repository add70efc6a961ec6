"""Human gene identifiers: detect the id kind of a gene list and map between kinds.

The mapping table ships with the package (``store/_data/human_genes.tsv.gz``: NCBI Gene
2022-09-12 via Bioconductor org.Hs.eg.db 3.16.0, columns entrez, symbol, ensembl), with the
mitochondrial genes renamed to their HGNC symbols (:data:`MITOCHONDRIAL_SYMBOLS`). Nothing is
ever looked up on the network. Models that take Ensembl ids (Geneformer, CellPLM) and models that
take HGNC symbols (scGPT, tGPT, UCE, scBERT, scFoundation) both go through :func:`map_genes`.

Symbols are mapped to Entrez and Ensembl ids through their official symbol first, then through a
previous symbol or alias that names one gene only (``store/_data/human_gene_aliases.tsv.gz``, from
the same NCBI release): matrices annotated before a rename (``GNB2L1`` for RACK1, ``H3F3B`` for
H3-3B) would otherwise lose some of their most expressed genes. Symbols are never rewritten into
other symbols: a model keyed by symbols reads the dataset's own against its vocabulary, as its
reference does.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Sequence
from functools import lru_cache
from importlib import resources
from typing import Literal

import numpy as np
import pandas as pd

from scdm.store.errors import InputDataError

__all__ = [
    "GeneIdKind",
    "GENE_ID_KINDS",
    "MITOCHONDRIAL_SYMBOLS",
    "as_gene_id_kind",
    "gene_table",
    "gene_table_version",
    "gene_table_note_sql",
    "GENE_MATCH",
    "gene_match_keys",
    "stored_gene_keys",
    "space_notes_sql",
    "detect_gene_id_kind",
    "ids_not_of_kind",
    "map_genes",
    "strip_ensembl_version",
]

GeneIdKind = Literal["symbol", "ensembl", "entrez"]
GENE_ID_KINDS: tuple[str, ...] = ("symbol", "ensembl", "entrez")

_TABLE_FILE = "human_genes.tsv.gz"
_ALIAS_FILE = "human_gene_aliases.tsv.gz"
_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_ENTREZ_RE = re.compile(r"^\d+$")


def _table_bytes(name: str = _TABLE_FILE) -> bytes:
    return resources.files("scdm.store").joinpath("_data").joinpath(name).read_bytes()


@lru_cache(maxsize=1)
def gene_table() -> pd.DataFrame:
    """The shipped human gene table: one row per (entrez, symbol, ensembl) triple.

    An Entrez gene with several Ensembl ids has several rows; ``ensembl`` is empty where NCBI
    lists none.
    """
    import gzip
    import io

    raw = gzip.decompress(_table_bytes())
    table = pd.read_csv(io.BytesIO(raw), sep="\t", dtype=str, keep_default_na=False)
    hgnc = table["entrez"].map(MITOCHONDRIAL_SYMBOLS)
    table["symbol"] = hgnc.where(hgnc.notna(), table["symbol"])
    return table


MITOCHONDRIAL_SYMBOLS: dict[str, str] = {
    "4508": "MT-ATP6", "4509": "MT-ATP8", "4512": "MT-CO1", "4513": "MT-CO2", "4514": "MT-CO3", "4519": "MT-CYB",
    "4535": "MT-ND1", "4536": "MT-ND2", "4537": "MT-ND3", "4538": "MT-ND4", "4539": "MT-ND4L", "4540": "MT-ND5",
    "4541": "MT-ND6", "4549": "MT-RNR1", "4550": "MT-RNR2", "4511": "MT-TC", "4553": "MT-TA", "4555": "MT-TD",
    "4556": "MT-TE", "4558": "MT-TF", "4563": "MT-TG", "4564": "MT-TH", "4565": "MT-TI", "4566": "MT-TK",
    "4567": "MT-TL1", "4568": "MT-TL2", "4569": "MT-TM", "4570": "MT-TN", "4571": "MT-TP", "4572": "MT-TQ",
    "4573": "MT-TR", "4574": "MT-TS1", "4575": "MT-TS2", "4576": "MT-TT", "4577": "MT-TV", "4578": "MT-TW",
    "4579": "MT-TY",
}
"""HGNC symbols of the mitochondrial genes, by Entrez id. NCBI Gene names them ``COX1``, ``ND4``,
``CYTB``, ``TRNC``..., but count matrices and every model vocabulary use HGNC's ``MT-CO1``,
``MT-ND4``, ``MT-CYB``, ``MT-TC``: with NCBI's names a symbol dataset's ``MT-`` genes would map
to nothing (lost to Ensembl-keyed models) and Ensembl ids would map to symbols no symbol-keyed
model knows (or, for ``COX1``, the alias of another gene, PTGS1)."""


@lru_cache(maxsize=1)
def gene_table_version() -> str:
    """Short content hash of the shipped table and of the corrections applied to it; part of every embedding's parameters."""
    corrections = "".join(f"{k}={v};" for k, v in sorted(MITOCHONDRIAL_SYMBOLS.items())).encode()
    rules = (b"symbol->ensembl prefers the model's vocabulary"  # map_genes(prefer=...): a rule that changes mappings
             b"; symbols not official resolve through a unique alias, the official column first")
    return hashlib.blake2b(_table_bytes() + _table_bytes(_ALIAS_FILE) + corrections + rules, digest_size=6).hexdigest()


GENE_MATCH = "gene"
"""``params["gene_match"]`` of a joint pca/hvg fit that matches its datasets' genes by :func:`gene_match_keys`.
Joint fits made before it matched the stored symbols as spelled, so a gene renamed between two datasets
(``AARS`` in one, ``AARS1`` in the other) was left out of the shared genes; they keep their ids and are noted."""


def gene_match_keys(gene_ids: Sequence[str] | np.ndarray, kind: GeneIdKind) -> np.ndarray:
    """One key per gene id naming the gene it resolves to, for matching the genes of two datasets.

    ``entrez:<id>`` where the shipped table resolves the id (a symbol through its official symbol,
    else a previous symbol or alias naming one gene, as :func:`map_genes` does for every model),
    else ``id:<the id upper-cased, without an Ensembl version>``. An outdated symbol (``AARS``) and
    the Ensembl id of its gene (``ENSG00000090861``, ``AARS1``) are then one gene, and so are the
    Ensembl ids of one gene on the primary assembly and on a patch, which a match on one of the
    Ensembl ids would have kept apart.
    """
    names = [str(i) for i in gene_ids]
    names = strip_ensembl_version(names) if kind == "ensembl" else names
    entrez = map_genes(names, src=kind, dst="entrez")
    if kind == "symbol":
        # a symbol official for two genes (MEMO1: Entrez 7795 without an Ensembl id, 51072 with one) is the gene
        # whose Ensembl id the models are given, so that it meets that Ensembl id in another dataset
        pair = _entrez_of_symbol_and_ensembl()
        ensembl = map_genes(names, src="symbol", dst="ensembl")
        entrez = np.asarray([pair.get((n, g), pair.get((n.upper(), g), e)) if g else e
                             for n, g, e in zip(names, ensembl, entrez)], dtype=object)
    return np.asarray([f"entrez:{e}" if e else f"id:{n.upper()}" for e, n in zip(entrez, names)], dtype=object)


@lru_cache(maxsize=1)
def _entrez_of_symbol_and_ensembl() -> dict[tuple[str, str], str]:
    """Entrez id of each (symbol, Ensembl id) row of the table, symbols also upper-cased (first row wins)."""
    table = gene_table()
    rows = table[table["ensembl"] != ""]
    out: dict[tuple[str, str], str] = {}
    for symbol, ensembl, entrez in zip(rows["symbol"], rows["ensembl"], rows["entrez"]):
        out.setdefault((symbol, ensembl), entrez)
    for symbol, ensembl, entrez in zip(rows["symbol"], rows["ensembl"], rows["entrez"]):
        out.setdefault((symbol.upper(), ensembl), entrez)
    return out


def stored_gene_keys(genes: pd.DataFrame, kind: GeneIdKind) -> np.ndarray:
    """:func:`gene_match_keys` of a dataset's ``genes`` rows (``gene_id``, ``symbol``, ``ensembl``).

    A row the genes table maps to nothing although its id may resolve (a GENCODE ``_PAR_Y`` copy of a
    gene that is also a column) keeps a key of its own: it is not a second column of that gene.
    """
    ids = genes["gene_id"].astype(str).to_numpy(dtype=object)
    resolved = gene_match_keys(ids, kind)
    unmapped = (genes["symbol"].isna() & genes["ensembl"].isna()).to_numpy()
    return np.asarray([f"id:{i}" if u else k for i, u, k in zip(ids, unmapped, resolved)], dtype=object)


def gene_table_note_sql(params: str) -> str:
    """SQL on an ``embeddings.params`` column: ``'older gene table (<its>; this scdm: <current>)'`` where the
    embedding was made with another gene table than this scdm's, ``'older gene matching (...)'`` for a joint
    pca/hvg fit made before :data:`GENE_MATCH`, else ``''``.

    Such an embedding stays valid for itself, but embedding its dataset again makes a new space
    beside it (a second ``pca`` row, a second result): the note says which one this scdm would not
    make. One expression for every reader (``scdm ls``, the leaderboard, the report, the server),
    so they mark the same embeddings and results the same way.
    """
    current = gene_table_version()  # hex digits: safe inside a literal
    table = f"json_extract_string({params}, '$.gene_table')"
    joint = f"json_array_length(json_extract({params}, '$.fit_datasets')) > 1"
    return (f"CASE WHEN {table} IS NOT NULL AND {table} <> '{current}' "
            f"THEN 'older gene table (' || {table} || '; this scdm: {current})' "
            f"WHEN {table} IS NOT NULL AND {joint} AND json_extract_string({params}, '$.gene_match') IS NULL "
            "THEN 'older gene matching (a joint fit on the symbols as spelled: genes renamed between its datasets were "
            "left out; this scdm matches them by gene)' ELSE '' END")


def space_notes_sql() -> str:
    """SQL subquery of ``space_id, note`` per embedding space: its embeddings' :func:`gene_table_note_sql`
    (one space is one model with one set of parameters, gene table included)."""
    return f"(SELECT space_id, max({gene_table_note_sql('params')}) AS note FROM embeddings GROUP BY space_id)"


def strip_ensembl_version(ids: Sequence[str]) -> list[str]:
    """``ENSG00000121410.12`` -> ``ENSG00000121410``; other ids unchanged."""
    return [i.split(".", 1)[0] if i.startswith("ENS") else i for i in ids]


def as_gene_id_kind(kind: str) -> GeneIdKind:
    """``kind`` as a :data:`GeneIdKind`, or a clear error if it is not one of them.

    Raises
    ------
    InputDataError
        If ``kind`` is not ``"symbol"``, ``"ensembl"`` or ``"entrez"``.
    """
    known: dict[str, GeneIdKind] = {"symbol": "symbol", "ensembl": "ensembl", "entrez": "entrez"}
    if kind in known:
        return known[kind]
    msg = f"Unknown gene id kind {kind!r}; expected one of {', '.join(GENE_ID_KINDS)}."
    raise InputDataError(msg)


def detect_gene_id_kind(ids: Sequence[str], *, sample: int = 2000) -> GeneIdKind:
    """Guess whether ``ids`` are HGNC symbols, Ensembl gene ids or Entrez ids.

    Looks at up to ``sample`` ids; the majority pattern wins (Ensembl and Entrez ids have
    unmistakable shapes, everything else is taken as symbols).

    Raises
    ------
    InputDataError
        If ``ids`` is empty.
    """
    ids = [str(i) for i in list(ids)[:sample]]
    if not ids:
        msg = "Cannot detect the gene id kind of an empty gene list: the dataset has no genes."
        raise InputDataError(msg)
    n_ens = sum(bool(_ENSEMBL_RE.match(i)) for i in ids)
    n_ent = sum(bool(_ENTREZ_RE.match(i)) for i in ids)
    if n_ens >= 0.5 * len(ids):
        return "ensembl"
    if n_ent >= 0.5 * len(ids):
        return "entrez"
    return "symbol"


def ids_not_of_kind(ids: Sequence[str] | np.ndarray, kind: GeneIdKind) -> list[str]:
    """The ids of ``ids`` shaped like another kind than ``kind`` (all of them, in order).

    An Ensembl or Entrez list: ids without that shape. A symbol list: ids shaped like Ensembl or
    Entrez ids (anything else may be a symbol).
    """
    names = [str(i) for i in ids]
    if kind == "ensembl":
        return [i for i in names if not _ENSEMBL_RE.match(i)]
    if kind == "entrez":
        return [i for i in names if not _ENTREZ_RE.match(i)]
    return [i for i in names if _ENSEMBL_RE.match(i) or _ENTREZ_RE.match(i)]


@lru_cache(maxsize=16)
def _lookup(src: str, dst: str) -> dict[str, str]:
    table = gene_table()
    pairs = table[(table[src] != "") & (table[dst] != "")][[src, dst]]
    # first listed wins: the table is sorted by Entrez id, so the mapping is deterministic
    pairs = pairs.drop_duplicates(subset=src, keep="first")
    mapping = dict(zip(pairs[src], pairs[dst]))
    if src == "symbol":
        # symbols are matched case-insensitively as a fallback (some matrices upper-case them)
        upper = {k.upper(): v for k, v in mapping.items()}
        for k, v in upper.items():
            mapping.setdefault(k, v)
    return mapping


def map_genes(ids: Sequence[str] | np.ndarray, *, src: GeneIdKind, dst: GeneIdKind,
              prefer: Collection[str] | None = None) -> np.ndarray:
    """Map gene ids from one kind to another with the shipped table.

    Parameters
    ----------
    ids
        Gene ids of kind ``src``; Ensembl version suffixes are ignored.
    src, dst
        ``"symbol"``, ``"ensembl"`` or ``"entrez"``.
    prefer
        A model's vocabulary (ids of kind ``dst``). Where an id has several matches (1,649 symbols
        have several Ensembl ids: a gene on the primary assembly and on a patch or haplotype), the
        first one in ``prefer`` is taken; without it, or where none is in it, the table's first.

    Returns
    -------
    ndarray of object, shape (len(ids),)
        The mapped id, or ``None`` where the table has no match.
    """
    for kind in (src, dst):
        as_gene_id_kind(kind)
    names = [str(i) for i in ids]
    if src == "ensembl":
        names = strip_ensembl_version(names)
    if src == dst:
        return np.asarray(names, dtype=object)
    if src == "symbol":
        names = _official_symbols(names)
    mapping = _lookup(src, dst)
    if src == "symbol":
        out = [mapping.get(i, mapping.get(i.upper())) for i in names]
    else:
        out = [mapping.get(i) for i in names]
    if prefer is not None:
        keys = [i if src != "symbol" or i in mapping else i.upper() for i in names]  # the key the lookup used
        out = _preferred(keys, out, _alternatives(src, dst), prefer)
    return np.asarray(out, dtype=object)


@lru_cache(maxsize=1)
def _alias_entrez() -> dict[str, str]:
    """Entrez id of each previous symbol or alias that names one gene only, keyed upper-cased.

    The shipped file holds only such aliases, and none that is (in any case) the official symbol
    of a gene: an official symbol always means its own gene.
    """
    import gzip
    import io

    raw = gzip.decompress(_table_bytes(_ALIAS_FILE))
    aliases = pd.read_csv(io.BytesIO(raw), sep="\t", dtype=str, keep_default_na=False)
    return dict(zip(aliases["alias"].str.upper(), aliases["entrez"]))


def _official_symbols(names: list[str]) -> list[str]:
    """``names`` with each symbol the table does not know replaced by the official symbol of its alias.

    Where the dataset also has a column under the official symbol, that column is the gene and the
    alias column maps to nothing (``""``): two columns of one gene would otherwise be read as one
    in a model-dependent way.
    """
    official = _lookup("symbol", "entrez")
    unknown = [i for i, n in enumerate(names) if n not in official and n.upper() not in official]
    if not unknown:
        return names
    aliases = _alias_entrez()
    symbol_of = _lookup("entrez", "symbol")
    present = {official.get(n, official.get(n.upper())) for n in names} - {None}
    out = list(names)
    for i in unknown:
        entrez = aliases.get(names[i].upper())
        if entrez is not None:
            out[i] = "" if entrez in present else symbol_of[entrez]
    return out


def _preferred(keys: list[str], mapped: list[str | None], alternatives: dict[str, tuple[str, ...]],
               prefer: Collection[str]) -> list[str | None]:
    """``mapped``, with an id that has several matches mapped to the first match in ``prefer``."""
    out = list(mapped)
    for i, key in enumerate(keys):
        if mapped[i] is None or mapped[i] in prefer:
            continue
        found = next((c for c in alternatives.get(key, ()) if c in prefer), None)
        if found is not None:
            out[i] = found
    return out


@lru_cache(maxsize=16)
def _alternatives(src: str, dst: str) -> dict[str, tuple[str, ...]]:
    """Every match, in table order, of the ids with more than one (symbols also upper-cased, as :func:`_lookup`)."""
    table = gene_table()
    pairs = table[(table[src] != "") & (table[dst] != "")][[src, dst]].drop_duplicates()
    several = pairs[pairs.duplicated(subset=src, keep=False)]
    out = {str(k): tuple(dict.fromkeys(v)) for k, v in several.groupby(src, sort=False)[dst]}
    if src == "symbol":
        first = _lookup(src, dst)  # an upper-cased key means what the lookup's fallback means
        for k, v in list(out.items()):
            if k.upper() not in out and first.get(k.upper()) == v[0]:
                out[k.upper()] = v
    return out
