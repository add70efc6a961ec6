-- scdm catalog, core tables: datasets, their genes and cells, embeddings and their chunks.
CREATE TABLE meta (
    key   VARCHAR PRIMARY KEY,
    value VARCHAR
);

CREATE TABLE datasets (
    dataset_id    VARCHAR PRIMARY KEY,   -- first 16 hex digits of content_hash
    name          VARCHAR NOT NULL UNIQUE,
    content_hash  VARCHAR NOT NULL UNIQUE, -- blake2b of expression matrix, gene ids, cell ids
    n_cells       BIGINT NOT NULL,
    n_genes       BIGINT NOT NULL,
    gene_id_kind  VARCHAR NOT NULL,      -- symbol | ensembl | entrez
    x_kind        VARCHAR NOT NULL,      -- counts | normalized | scaled (detected, overridable)
    x_format      VARCHAR NOT NULL,      -- dense | csr | csc
    source_path   VARCHAR,               -- where the data came from (NULL for an in-memory AnnData)
    stored_path   VARCHAR NOT NULL,      -- the copy inside the store, relative to the store root
    options       JSON,                  -- ingest options (column mapping, constants)
    created_at    TIMESTAMP NOT NULL
);

CREATE TABLE genes (
    dataset_id  VARCHAR NOT NULL,
    idx         INTEGER NOT NULL,        -- column in the expression matrix
    gene_id     VARCHAR NOT NULL,        -- as the dataset names it
    symbol      VARCHAR,                 -- mapped with the shipped table (NULL if unknown)
    ensembl     VARCHAR,
    PRIMARY KEY (dataset_id, idx)
);

CREATE TABLE cells (
    dataset_id   VARCHAR NOT NULL,
    "row"        INTEGER NOT NULL,       -- row in the expression matrix and in every embedding
    cell_id      VARCHAR NOT NULL,
    study        VARCHAR,
    sample       VARCHAR,
    tissue       VARCHAR,
    cancer_type  VARCHAR,
    drug_type    VARCHAR,
    regimen      VARCHAR,
    response     TINYINT,                -- 1 sensitive, 0 resistant, NULL unknown
    PRIMARY KEY (dataset_id, "row")
);

CREATE TABLE embeddings (
    embedding_id     VARCHAR PRIMARY KEY,
    dataset_id       VARCHAR NOT NULL,
    space_id         VARCHAR NOT NULL,   -- same space_id = comparable vectors (may be pooled)
    model            VARCHAR NOT NULL,
    variant          VARCHAR NOT NULL,   -- frozen | lora:<adapter id>
    checkpoint_hash  VARCHAR,
    adapter_hash     VARCHAR,
    params           JSON NOT NULL,
    dim              INTEGER NOT NULL,
    dtype            VARCHAR NOT NULL,
    n_cells          BIGINT NOT NULL,
    chunk_rows       INTEGER NOT NULL,
    n_chunks         INTEGER NOT NULL,
    array_path       VARCHAR NOT NULL,   -- relative to the store root
    status           VARCHAR NOT NULL,   -- pending | complete
    created_at       TIMESTAMP NOT NULL,
    completed_at     TIMESTAMP,
    telemetry        JSON,               -- cells/s, device, peak memory, wall time, versions
    audit            JSON                -- gene matching audit, tokens per cell
);

CREATE TABLE embedding_chunks (
    embedding_id  VARCHAR NOT NULL,
    chunk         INTEGER NOT NULL,
    n_rows        INTEGER NOT NULL,
    checksum      VARCHAR NOT NULL,      -- blake2b of the chunk's rows as stored
    seconds       DOUBLE,
    written_at    TIMESTAMP NOT NULL,
    PRIMARY KEY (embedding_id, chunk)
);
