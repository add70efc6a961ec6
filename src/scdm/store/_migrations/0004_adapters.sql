-- scdm catalog, LoRA adapters (owned by scdm_embed.finetune): one row per adapter trained on the
-- training cells of one (split, fold). The weights live in <store>/artifacts/adapters/<adapter_id>/
-- (peft format: adapter_config.json + adapter_model.safetensors, the MLP head in head.safetensors,
-- the card scdm_adapter.json). Embeddings made with an adapter have variant 'lora:<adapter_id>'
-- and carry the adapter's content hash in embeddings.adapter_hash.
CREATE TABLE adapters (
    adapter_id        VARCHAR PRIMARY KEY,  -- hash of tuning_id and fold
    tuning_id         VARCHAR NOT NULL,     -- hash of everything but the fold: the folds of one protocol share it
    adapter_hash      VARCHAR NOT NULL,     -- blake2b of the saved adapter and head files (embeddings.adapter_hash)
    model             VARCHAR NOT NULL,     -- base model family
    checkpoint_hash   VARCHAR NOT NULL,     -- content hash of the base checkpoint folder
    model_params      JSON NOT NULL,        -- the adapter's parameters (layer, pooling, seed, ...)
    split_id          VARCHAR NOT NULL,     -- splits.split_id the adapter was trained on
    fold              INTEGER NOT NULL,     -- trained on every cell of the split outside this test fold
    scenario          VARCHAR NOT NULL,
    category_type     VARCHAR NOT NULL,
    category          VARCHAR NOT NULL,
    scheme            VARCHAR NOT NULL,
    lora_config       JSON NOT NULL,        -- r, alpha, dropout, target modules (as given and as matched)
    train_config      JSON NOT NULL,        -- epochs, lr, weight decay, batch size, precision, seed, head
    n_train           BIGINT NOT NULL,      -- training cells
    train_cells_hash  VARCHAR NOT NULL,     -- hash of the training cells' (dataset_id, row), for audits
    train_curve       JSON NOT NULL,        -- per epoch: loss, accuracy, seconds
    wall_seconds      DOUBLE NOT NULL,      -- training wall time
    device            VARCHAR NOT NULL,     -- cpu | cuda (+ GPU name in telemetry)
    telemetry         JSON,                 -- peak memory, OOM back-offs, trainable parameters, versions
    path              VARCHAR NOT NULL,     -- adapter folder, relative to the store root
    created_at        TIMESTAMP NOT NULL
);
