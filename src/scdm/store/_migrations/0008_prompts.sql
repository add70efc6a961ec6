-- scdm catalog, the language-model prompting arm (scdm_prompt): every request sent to a language
-- model and its raw answer, content-addressed, so that rerunning a prompting run costs nothing and an
-- interrupted run resumes at the first request that has no row here. The scores of the prompted cells
-- go into the evaluation tables like every head's (head 'prompt-zero-shot' / 'prompt-<k>-shot').

-- One request (a prompt holding up to cells_per_request cells) and the model's answer.
-- request_id = hash of (backend, model, template hash, messages as sent, decoding parameters): the
-- messages hold the cells' prompt content (source, genes, examples), so equal content = one request.
CREATE TABLE prompt_requests (
    request_id         VARCHAR PRIMARY KEY,
    backend            VARCHAR NOT NULL,   -- openai (any OpenAI-compatible endpoint) | hf (local causal LM)
    model              VARCHAR NOT NULL,   -- model name as sent to the endpoint, or the checkpoint folder name
    checkpoint_hash    VARCHAR,            -- hf: content hash of the checkpoint folder
    endpoint           VARCHAR,            -- base URL the answer came from (provenance, not identity)
    template_hash      VARCHAR NOT NULL,
    decoding           JSON NOT NULL,      -- temperature, seed, max_tokens, response_format, logprobs, ...
    messages           JSON NOT NULL,      -- the chat messages exactly as sent
    n_cells            INTEGER NOT NULL,
    status             VARCHAR NOT NULL,   -- answered (parsed, per-cell status below) | unparsed (no cell readable)
    answer_text        VARCHAR,            -- the model's message content
    response           JSON,               -- the raw response body (with token log-probabilities if any)
    prompt_tokens      INTEGER,
    completion_tokens  INTEGER,
    attempts           INTEGER NOT NULL,   -- 1 + retries (429, 5xx, timeouts)
    seconds            DOUBLE,
    created_at         TIMESTAMP NOT NULL
);

-- The answer for each cell of a request, by its number in the prompt (1-based).
CREATE TABLE prompt_answers (
    request_id   VARCHAR NOT NULL,
    position     INTEGER NOT NULL,
    status       VARCHAR NOT NULL,         -- ok | missing (no entry) | invalid (not sensitive/resistant) | unparsed
    label        TINYINT,                  -- 1 sensitive, 0 resistant; NULL unless status = ok
    p_sensitive  DOUBLE,                   -- from token log-probabilities (or the local model); NULL without scores
    PRIMARY KEY (request_id, position)
);
