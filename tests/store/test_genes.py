"""The shipped gene table maps the mitochondrial genes under the names count matrices and models use."""

from __future__ import annotations

from pathlib import Path

import anndata as ad

from scdm.store.genes import gene_table, map_genes

PC9 = Path(__file__).resolve().parents[1] / "data" / "PC9_erlotinib_subsample300.h5ad"


def test_the_mt_genes_of_a_real_matrix_map_to_ensembl_and_back() -> None:
    """NCBI calls MT-CO1 "COX1" (an alias of PTGS1): with that name every MT- gene of a matrix was lost."""
    mt = [g for g in ad.read_h5ad(PC9, backed="r").var_names if g.startswith("MT-")]
    assert len(mt) >= 13
    ensembl = map_genes(mt, src="symbol", dst="ensembl")
    coding = [g for g, e in zip(mt, ensembl) if e is not None]
    assert {"MT-CO1", "MT-CYB", "MT-ND4L", "MT-ATP8"} <= set(coding)
    assert list(map_genes(map_genes(coding, src="symbol", dst="ensembl"), src="ensembl", dst="symbol")) == coding


def test_ensembl_ids_of_mt_genes_map_to_hgnc_symbols() -> None:
    assert list(map_genes(["ENSG00000198804", "ENSG00000198727", "ENSG00000198886"], src="ensembl", dst="symbol")) == [
        "MT-CO1", "MT-CYB", "MT-ND4"]
    assert map_genes(["COX1"], src="symbol", dst="ensembl")[0] is None
    assert not gene_table()["symbol"].isin(["COX1", "ND1", "CYTB", "TRNC"]).any()


def test_a_symbol_with_several_ensembl_ids_takes_the_one_a_model_knows() -> None:
    # ABCB11: the primary-assembly id and a patch/haplotype id; a vocabulary may hold either
    primary, patch = "ENSG00000073734", "ENSG00000276582"
    assert map_genes(["ABCB11"], src="symbol", dst="ensembl").tolist() == [primary]  # the table's first
    assert map_genes(["ABCB11", "abcb11", "TP53"], src="symbol", dst="ensembl", prefer={patch, "ENSG00000141510"}).tolist() \
        == [patch, patch, "ENSG00000141510"]
    assert map_genes(["ABCB11"], src="symbol", dst="ensembl", prefer={"ENSG00000141510"}).tolist() == [primary]  # none known


def test_a_geneformer_vocabulary_with_the_other_ensembl_id_of_a_symbol_uses_the_gene(tmp_path: Path) -> None:
    from scdm.embedding.models.geneformer import GeneformerAdapter, write_tiny_checkpoint

    genes = ["TP53", "GAPDH", "ACTB", "ABCB11"]
    vocabulary = ["ENSG00000141510", "ENSG00000111640", "ENSG00000075624", "ENSG00000276582"]  # ABCB11's patch id
    adapter = GeneformerAdapter(checkpoint=write_tiny_checkpoint(tmp_path / "ckpt", genes=vocabulary))
    audit = adapter.prepare(genes, gene_id_kind="symbol")
    assert audit.n_matched == 4 and "ABCB11" not in audit.unmatched_examples


def test_previous_symbols_of_a_real_matrix_map_to_their_genes() -> None:
    """PC9 (Drop-seq, 2020) names RACK1 'GNB2L1' and H3-3B 'H3F3B': among its most expressed genes, they mapped
    to nothing, so Geneformer, CellPLM and the llm read the cells without them."""
    names = list(ad.read_h5ad(PC9, backed="r").var_names)
    assert {"GNB2L1", "H3F3B", "ATP5E"} <= set(names) and "RACK1" not in names
    ensembl = dict(zip(names, map_genes(names, src="symbol", dst="ensembl")))
    assert ensembl["GNB2L1"] == "ENSG00000204628"  # RACK1
    assert ensembl["H3F3B"] == "ENSG00000132475"  # H3-3B
    assert map_genes(["GNB2L1", "gnb2l1"], src="symbol", dst="entrez").tolist() == ["10399", "10399"]


def test_an_alias_never_takes_the_place_of_an_official_symbol_or_of_an_ambiguous_name() -> None:
    # the official column is the gene: the alias column beside it maps to nothing, whatever their order
    assert map_genes(["GNB2L1", "RACK1"], src="symbol", dst="entrez").tolist() == [None, "10399"]
    assert map_genes(["RACK1", "GNB2L1"], src="symbol", dst="entrez").tolist() == ["10399", None]
    # CD97 was the symbol of ADGRE5 and is an alias of ADGRE2 too: it names no one gene
    assert map_genes(["CD97", "AC000036.4"], src="symbol", dst="entrez").tolist() == [None, None]
    # COX1 is NCBI's symbol of MT-CO1 (renamed here) and an alias of PTGS1: still refused
    assert map_genes(["COX1"], src="symbol", dst="ensembl")[0] is None
    # symbols are not rewritten: a symbol-keyed model reads the dataset's own names, as its reference does
    assert map_genes(["GNB2L1"], src="symbol", dst="symbol").tolist() == ["GNB2L1"]


def test_match_keys_name_one_gene_across_id_kinds_and_keep_different_genes_apart() -> None:
    from scdm.store.genes import gene_match_keys

    by_symbol = gene_match_keys(["AARS", "MEMO1", "ABCB11", "GPR75-ASB3", "ASB3", "c2orf15", "NOTAGENE"], "symbol").tolist()
    by_ensembl = gene_match_keys(["ENSG00000090861.5", "ENSG00000162959", "ENSG00000276582", "ENSG00000073734",
                                  "ENSG00000115239"], "ensembl").tolist()
    assert by_symbol[0] == by_ensembl[0] == "entrez:16"  # AARS, the symbol of AARS1 before 2019
    # MEMO1 is the official symbol of Entrez 7795 (no Ensembl id) and 51072: the one its Ensembl id is
    assert by_symbol[1] == by_ensembl[1] == "entrez:51072"
    assert by_symbol[2] == by_ensembl[2] == by_ensembl[3]  # ABCB11 on a patch and on the primary assembly
    assert by_symbol[3] != by_symbol[4] == by_ensembl[4]  # a readthrough is not the gene whose Ensembl id it shares
    assert by_symbol[5] == gene_match_keys(["C2ORF15"], "symbol")[0] and by_symbol[6] == "id:NOTAGENE"
