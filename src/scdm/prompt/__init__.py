"""scdm.prompt: drug-response prediction by prompting a language model (the scDrugMap LLM arm).

Each cell becomes the symbols of its 10 most highly expressed genes; 10 cells of one data source go
into one request built from a four-module template (how to reason, the source, the genes, the
answer format); the model answers sensitive/resistant per cell, in JSON. The answers are scored on
the test cells of the same splits as every embedding head and written as evaluation rows (head
``prompt-zero-shot`` / ``prompt-<k>-shot``, model = the language model), so ``scdm results`` shows
them side by side. Every request is content-addressed and stored with its raw answer: rerunning is
free and an interrupted run resumes.

This package imports ``store`` only; the ``openai`` client and ``transformers``/``torch`` are
imported inside the backends that need them.

Example::

    import scdm.prompt
    s = scdm.prompt.prompt("scdm-store", ["a375"], backend="ollama", model="llama3.1:8b")
    s.results
"""

from scdm.prompt.backends import Backend, OpenAIBackend, PromptRequestError, Reply
from scdm.prompt.evaluate import PromptSummary, head_name, make_backend, prompt
from scdm.prompt.sentences import DEFAULT_TOP_K, top_genes
from scdm.prompt.templates import Template, load_template

__all__ = [
    "prompt",
    "PromptSummary",
    "head_name",
    "make_backend",
    "Backend",
    "OpenAIBackend",
    "Reply",
    "PromptRequestError",
    "Template",
    "load_template",
    "top_genes",
    "DEFAULT_TOP_K",
]
