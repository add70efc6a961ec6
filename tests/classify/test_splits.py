"""Splits: grouped folds, leave-one-study-out, identical partitions, determinism, skips."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from scdm.classify.splits import SampleLeakageWarning, make_splits
from scdm.store.errors import InputDataError
from scdm.store.splits import resolve_split_scheme

# dataset, study, tissue, cancer_type, drug_type, regimen, sensitive share
SPEC = [
    ("d1", "S1", "skin", "melanoma", "targeted", "plx", 0.5),
    ("d2", "S2", "skin", "melanoma", "targeted", "vem", 0.4),
    ("d3", "S3", "blood", "aml", "chemo", "ara", 0.6),
    ("d4", "S4", "blood", "aml", "chemo", "ara", 0.5),
    ("d5", "S5", "blood", "aml", "chemo", "ara", 1.0),  # a study with sensitive cells only
]


def make_cells(spec=SPEC, n: int = 80, samples: int = 4, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for ds, study, tissue, cancer, drug, regimen, share in spec:
        for i in range(n):
            sample = f"{study}_s{i % samples}"
            response = int(i % samples < samples * share) if share < 1 else 1  # constant within a sample
            rows.append({"dataset_id": ds, "row": i, "cell_id": f"c{i}", "study": study, "sample": sample,
                         "tissue": tissue, "cancer_type": cancer, "drug_type": drug, "regimen": regimen,
                         "response": response})
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=int(rng.integers(100)))  # order must not matter
    frame["response"] = frame["response"].astype("Int8")
    return frame


def by_key(splits, scenario, ctype, category):
    return next(s for s in splits if (s.scenario, s.category_type, s.category) == (scenario, ctype, category))


def cell_keys(split, mask) -> set[tuple[str, int]]:
    c = split.cells[mask]
    return set(zip(c["dataset_id"], c["row"]))


def test_every_category_of_every_type_is_a_split() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        splits = make_splits(make_cells(), scenarios=["pooled"], scheme="cell")
    got = {(s.category_type, s.category) for s in splits}
    assert got == {("all", "all"), ("tissue", "skin"), ("tissue", "blood"), ("cancer_type", "melanoma"),
                   ("cancer_type", "aml"), ("drug_type", "targeted"), ("drug_type", "chemo"), ("regimen", "plx"),
                   ("regimen", "vem"), ("regimen", "ara")}


def test_pooled_cell_folds_partition_the_category_and_are_stratified() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        splits = make_splits(make_cells(n=200), scenarios=["pooled"], n_folds=5, scheme="cell")
    for split in splits:
        folds = split.cells["fold"].to_numpy()
        assert sorted(np.unique(folds)) == list(range(5))
        share = split.cells["response"].mean()
        n_strata = split.cells.groupby(["dataset_id", "response"]).ngroups
        for f in range(5):
            test = split.cells[split.test_mask(f)]
            # each (dataset, response) stratum is dealt evenly: off by at most one cell per stratum
            assert abs(test["response"].sum() - share * len(test)) <= n_strata


def test_cell_folds_are_nested_across_category_types() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        splits = make_splits(make_cells(), scenarios=["pooled"], scheme="cell")
    fold_of: dict[tuple[str, int], int] = {}
    for split in splits:
        for ds, row, fold in split.cells[["dataset_id", "row", "fold"]].itertuples(index=False):
            assert fold_of.setdefault((ds, row), fold) == fold


def test_grouped_folds_keep_samples_disjoint() -> None:
    cells = make_cells(samples=8)
    for split in make_splits(cells, scenarios=["pooled"], scheme="sample", n_folds=5):
        merged = split.cells.merge(cells[["dataset_id", "row", "study", "sample"]], on=["dataset_id", "row"])
        for f in split.folds:
            test = split.test_mask(f)
            test_samples = set(zip(merged.loc[test, "study"], merged.loc[test, "sample"]))
            train_samples = set(zip(merged.loc[~test, "study"], merged.loc[~test, "sample"]))
            assert test_samples and not test_samples & train_samples


def test_sample_scheme_needs_sample_ids() -> None:
    cells = make_cells()
    cells.loc[cells.index[:3], "sample"] = None
    with pytest.raises(InputDataError, match="sample_key"):
        make_splits(cells, scenarios=["pooled"], scheme="sample")


def test_warns_when_labels_are_constant_within_samples_and_scheme_is_cell() -> None:
    with pytest.warns(SampleLeakageWarning, match="split_scheme='sample'"):
        make_splits(make_cells(), scenarios=["pooled"], by=["all"], scheme="cell")
    mixed = make_cells()
    mixed["sample"] = mixed["study"]  # each sample now holds both classes
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleLeakageWarning)
        make_splits(mixed, scenarios=["pooled"], by=["all"], scheme="cell")


def test_the_leakage_warning_says_when_grouped_folds_cannot_rescue_a_study() -> None:
    # following the advice on a study with one sample of a class left every fold one-class: the
    # warning now says so instead of sending the user to a split that evaluates nothing
    one_each = make_cells(spec=[("d1", "S1", "t", "c", "dt", "r", 0.5)], samples=2)
    with pytest.warns(SampleLeakageWarning, match=r"--split-scheme sample.*cannot rescue S1 on its own.*pooled with other") as w:
        make_splits(one_each, scenarios=["pooled"], by=["all"], scheme="cell")
    two_each = make_cells(spec=[("d1", "S1", "t", "c", "dt", "r", 0.5)], samples=4)
    with pytest.warns(SampleLeakageWarning, match="--split-scheme sample") as w:
        make_splits(two_each, scenarios=["pooled"], by=["all"], scheme="cell")
    assert not any("cannot rescue" in str(r.message) for r in w)


def test_cross_data_never_trains_on_the_test_study() -> None:
    cells = make_cells()
    study_of = {(r.dataset_id, r.row): r.study for r in cells.itertuples()}
    splits = make_splits(cells, scenarios=["cross"])
    evaluated = 0
    for split in splits:
        for f in split.folds:
            test = split.test_mask(f)
            test_studies = {study_of[k] for k in cell_keys(split, test)}
            train_studies = {study_of[k] for k in cell_keys(split, ~test)}
            assert test_studies == {split.fold_labels[f]}
            assert split.fold_labels[f] not in train_studies
            evaluated += 1
    assert evaluated > 0


def test_skipped_categories_and_folds_are_recorded_with_reasons() -> None:
    splits = make_splits(make_cells(), scenarios=["cross"])
    # one study in the category: the whole split is skipped
    plx = by_key(splits, "cross", "regimen", "plx")
    assert plx.status == "skipped" and "one study" in plx.reason and plx.folds == []
    # held-out study with one class: that fold is skipped, the others run
    aml = by_key(splits, "cross", "cancer_type", "aml")
    s5 = [f for f, study in aml.fold_labels.items() if study == "S5"][0]
    assert "one class" in aml.skipped_folds[s5] and s5 not in aml.folds and len(aml.folds) == 2
    assert aml.skipped_folds[s5] == "held-out study 'S5' holds one class only (80 cells, all sensitive)"  # not 'all 1'
    # a category holding one class only is skipped in every scenario
    cells = make_cells(spec=SPEC + [("d6", "S6", "bone", "mm", "immuno", "cart", 1.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        splits = make_splits(cells, scenarios=["pooled", "cross"], by=["tissue"], scheme="cell")
    for split in splits:
        if split.category == "bone":
            assert split.status == "skipped" and "one class" in split.reason


def test_identical_partitions_for_the_same_cells_and_seeded_determinism() -> None:
    cells = make_cells()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        a = make_splits(cells, scenarios=["pooled", "cross"], scheme="cell")
        b = make_splits(cells.sample(frac=1.0, random_state=3), scenarios=["pooled", "cross"], scheme="cell")
        c = make_splits(cells, scenarios=["pooled"], seed=1, scheme="cell")
    assert [s.split_id for s in a] == [s.split_id for s in b]
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x.cells, y.cells)
    pooled_a = [s for s in a if s.scenario == "pooled"]
    assert {s.split_id for s in pooled_a}.isdisjoint({s.split_id for s in c})
    assert not np.array_equal(pooled_a[0].cells["fold"], c[0].cells["fold"])


def test_a_category_partition_does_not_depend_on_other_datasets() -> None:
    """Two models embedding different dataset sets still share the partition of a common category."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        small = make_splits(make_cells(spec=SPEC[:2]), scenarios=["pooled"], by=["tissue"], scheme="cell")
        large = make_splits(make_cells(spec=SPEC), scenarios=["pooled"], by=["tissue"], scheme="cell")
    assert by_key(small, "pooled", "tissue", "skin").split_id == by_key(large, "pooled", "tissue", "skin").split_id


def test_custom_assignments() -> None:
    cells = make_cells()
    custom = cells[["dataset_id", "row"]].copy()
    custom["fold"] = np.where(cells["dataset_id"] == "d3", "test", "train")
    split = by_key(make_splits(cells, scenarios=["custom"], by=["all"], custom=custom), "custom", "all", "all")
    assert split.n_folds == 1 and split.folds == [0]
    assert set(split.cells.loc[split.test_mask(0), "dataset_id"]) == {"d3"}
    assert split.cells["fold"].isna().sum() == len(cells) - 80
    with pytest.raises(InputDataError, match="integers >= 0 or 'train'/'test'"):
        make_splits(cells, scenarios=["custom"], custom=custom.assign(fold="x"))
    with pytest.raises(InputDataError, match=r"found \[(0\.5, 1\.5|1\.5, 0\.5)\]"):  # fractional folds: it said 'found []'
        make_splits(cells, scenarios=["custom"], custom=custom.assign(fold=np.where(cells["dataset_id"] == "d3", 0.5, 1.5)))


def test_unlabelled_cells_are_left_out_and_bad_options_explained() -> None:
    cells = make_cells()
    cells.loc[cells.index[:10], "response"] = pd.NA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        split = make_splits(cells, scenarios=["pooled"], by=["all"], scheme="cell")[0]
    assert split.n_cells == len(cells) - 10
    with pytest.raises(InputDataError, match="Unknown category type"):
        make_splits(cells, by=["organ"], scheme="cell")
    with pytest.raises(InputDataError, match="--folds 1 must be an integer >= 2"):
        make_splits(cells, n_folds=1, scheme="cell")


def test_leakage_warning_names_the_confounded_study_in_a_mixed_collection() -> None:
    from scdm.store.splits import confounded_studies

    cells = make_cells()
    cells["sample"] = cells["study"]  # every study: one sample holding both classes (not confounded)
    first = cells["study"].iloc[0]
    in_first = cells["study"] == first
    cells.loc[in_first, "sample"] = np.where(cells.loc[in_first, "response"] == 1, "pos", "neg")  # one sample per class
    assert list(confounded_studies(cells)) == [first]
    with pytest.warns(SampleLeakageWarning, match=rf"1 study \({first}: labels constant within each of its 2 samples"):
        make_splits(cells, scenarios=["pooled"], by=["all"], scheme="cell")


def test_the_default_scheme_groups_by_sample_when_sample_ids_allow_it() -> None:
    cells = make_cells()
    assert {s.scheme for s in make_splits(cells, scenarios=["pooled"], by=["all"], n_folds=2)} == {"sample"}
    assert resolve_split_scheme(cells.assign(sample=None), "auto", 5) == "cell"  # no sample ids: the paper's folds
    with pytest.warns(SampleLeakageWarning, match="only 2 samples for 5 folds"):
        assert resolve_split_scheme(cells.assign(study="one", sample=cells["response"].astype(str)), "auto", 5) == "cell"
    assert resolve_split_scheme(cells, "cell", 5) == "cell"


def test_cells_without_a_category_value_are_left_out_with_a_warning() -> None:
    # a tissue column with gaps: 30 of SCC47's 120 cells silently dropped out of the tissue results
    cells = make_cells()
    cells.loc[cells["dataset_id"] == "d1", "tissue"] = None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        splits = make_splits(cells, scenarios=["pooled"], by=["all", "tissue"], scheme="cell")
    said = [str(w.message) for w in seen if "have no tissue" in str(w.message)]
    assert said and said[0].startswith("80 of 400 labelled cells have no tissue and are left out of the tissue categories")
    assert by_key(splits, "pooled", "tissue", "skin").n_cells == 80 and by_key(splits, "pooled", "all", "all").n_cells == 400


def test_auto_scheme_says_when_missing_sample_ids_make_the_folds_cell_level() -> None:
    cells = make_cells()
    cells.loc[cells["dataset_id"] == "d2", "sample"] = None
    with pytest.warns(SampleLeakageWarning, match=r"80 of 400 labelled cells have no sample id \(studies: S2\), so the pooled folds are cell-level"):
        assert resolve_split_scheme(cells, "auto", 5) == "cell"
    cells["sample"] = None  # no sample ids at all: cell-level as documented, nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleLeakageWarning)
        assert resolve_split_scheme(cells, "auto", 5) == "cell"


def test_a_one_class_study_pooled_with_other_studies_is_named_in_a_warning() -> None:
    """PC9 (all resistant) pooled with A375, JHU006 and SCC47: a head can score PC9's cells by recognising the
    study, in cell- and sample-grouped folds alike; the warning names it, and the splits are made as before."""
    from scdm.store.splits import StudyLeakageWarning, one_class_studies

    spec = [("pc9", "PC9", "lung", "nsclc", "targeted", "erlotinib", 0.0),
            ("a375", "A375", "skin", "melanoma", "targeted", "vemurafenib", 0.5),
            ("jhu006", "JHU006", "head and neck", "hnscc", "targeted", "gefitinib", 0.5),
            ("scc47", "SCC47", "head and neck", "hnscc", "targeted", "gefitinib", 0.5)]
    cells = make_cells(spec, samples=8)
    assert one_class_studies(cells) == {"PC9": "all 80 labelled cells resistant"}
    for scheme in ("sample", "cell"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            splits = make_splits(cells, scenarios=["pooled", "cross"], scheme=scheme, n_folds=4)
        study = [str(w.message) for w in caught if issubclass(w.category, StudyLeakageWarning)]
        assert len(study) == 1, study  # one line for all the splits made
        assert study[0].startswith("1 study whose labelled cells are all one class is pooled with other studies "
                                   "(PC9: all 80 labelled cells resistant (in all, drug_type targeted))")
        assert {s.scheme for s in splits if s.scenario == "pooled"} == {scheme}
    # PC9 alone in its categories (tissue lung: one class, skipped), and studies holding both classes: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", StudyLeakageWarning)
        make_splits(cells, scenarios=["pooled"], by=["tissue", "cancer_type", "regimen"], n_folds=4)
        make_splits(make_cells(spec[1:], samples=8), scenarios=["pooled", "cross"], n_folds=4)
        make_splits(cells, scenarios=["cross"])


def _parental_and_derived(samples_per_dataset: int = 4) -> pd.DataFrame:
    """Study P ingested as two datasets, a parental line (all sensitive) and its resistant derivative,
    pooled with two studies holding both classes."""
    spec = [("par", "P", "lung", "nsclc", "targeted", "erl", 1.0),
            ("der", "P", "lung", "nsclc", "targeted", "erl", 0.0),
            ("d1", "S1", "skin", "melanoma", "targeted", "plx", 0.5),
            ("d2", "S2", "skin", "melanoma", "targeted", "vem", 0.5)]
    cells = make_cells(spec, n=40, samples=4)
    cells["sample"] = cells["dataset_id"] + "_s" + (cells["row"] % samples_per_dataset).astype(str)
    return cells


def test_a_one_class_dataset_of_a_mixed_study_is_named_in_the_leakage_warning() -> None:
    """Study P holds both classes, but each class is a dataset of its own (parental line all sensitive,
    derived line all resistant): pooled folds put both datasets on both sides, so a head scores them by
    recognising the dataset. No warning named them (the study-level check saw a mixed study)."""
    from scdm.store.splits import StudyLeakageWarning, one_class_datasets, one_class_studies

    cells = _parental_and_derived()
    assert one_class_studies(cells) == {}
    names = {"par": "PC9-parental", "der": "PC9-ER"}
    assert one_class_datasets(cells, names=names) == {
        "PC9-ER of study P": "all 40 labelled cells resistant, the study's other class in its other datasets",
        "PC9-parental of study P": "all 40 labelled cells sensitive, the study's other class in its other datasets"}
    for scheme in ("sample", "cell"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_splits(cells, scenarios=["pooled", "cross"], by=["all", "tissue"], scheme=scheme, n_folds=4,
                        dataset_names=names)
        said = [str(w.message) for w in caught if issubclass(w.category, StudyLeakageWarning)]
        assert len(said) == 1, said
        assert said[0].startswith("2 datasets whose labelled cells are all one class are pooled with datasets of the "
                                  "other class of their study (PC9-ER of study P: all 40 labelled cells resistant, "
                                  "the study's other class in its other datasets (in all, tissue lung)")
    # P's category alone (tissue lung holds one study): the datasets are still the labels' only source
    with pytest.warns(StudyLeakageWarning, match=r"der of study P: .* \(in tissue lung\)"):
        lung = make_splits(cells, scenarios=["pooled"], by=["tissue"], scheme="sample", n_folds=4)
    assert by_key(lung, "pooled", "tissue", "lung").reason is None


def test_a_one_class_group_tested_whole_in_one_fold_is_not_named() -> None:
    """A one-sample dataset under sample-grouped folds is tested whole in one fold and never trained on:
    nothing identifies it, so it is not named; under cell-level folds it is on both sides, and named."""
    from scdm.store.splits import StudyLeakageWarning

    cells = _parental_and_derived(samples_per_dataset=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_splits(cells, scenarios=["pooled"], by=["all"], scheme="sample", n_folds=4)
    assert not [w for w in caught if issubclass(w.category, StudyLeakageWarning)]
    with pytest.warns(StudyLeakageWarning, match="der of study P: all 40 labelled cells resistant"):
        make_splits(cells, scenarios=["pooled"], by=["all"], scheme="cell", n_folds=4)


@pytest.mark.parametrize("scheme", ["cell", "sample"])
def test_a_numpy_int_seed_deals_the_folds_of_that_int(scheme) -> None:
    # the folds were dealt from the seed's JSON: numpy.int64(1) is "1" there, another partition (and id) stored as seed 1
    cells = make_cells()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        plain = make_splits(cells, scenarios=["pooled"], by=["all"], seed=1, scheme=scheme, n_folds=4)
        numpy = make_splits(cells, scenarios=["pooled"], by=["all"], seed=np.int64(1), scheme=scheme, n_folds=4)
    assert [s.split_id for s in numpy] == [s.split_id for s in plain]
    pd.testing.assert_frame_equal(numpy[0].cells, plain[0].cells)
    assert numpy[0].seed == 1 and type(numpy[0].seed) is int


@pytest.mark.parametrize("seed", [1.0, 1.5, True, -1, "1"])
def test_a_seed_that_is_no_whole_number_is_refused(seed) -> None:
    # 1.0 dealt other folds than 1, both stored as seed 1; -1 and 1.5 ended in numpy tracebacks
    with pytest.raises(InputDataError, match=r"seed=.* must be an integer >= 0"):
        make_splits(make_cells(), scenarios=["pooled"], seed=seed, scheme="cell")
