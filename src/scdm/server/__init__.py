"""``scdm serve``: a results explorer and prediction API over one store (FastAPI, served by uvicorn).

One process (or ``--workers`` processes) serves a JSON API, described by the generated
``/openapi.json`` and ``/docs``, and a web page (``/``: Jinja2 templates and static JavaScript,
no build step) straight from the store:

- datasets, embeddings (provenance and telemetry), the leaderboard with filters, per-fold
  results, skipped tasks, read-only SQL (row limit and time limit), trained heads, predictions
  (JSON or CSV);
- jobs: ``POST /api/jobs/predict`` predicts a stored dataset with a trained head;
  ``POST /api/upload`` ingests an ``.h5ad`` body (and, for a pca/hvg head, embeds and predicts
  it); ``POST /api/report`` writes the report into ``<store>/artifacts/report/``. At most
  ``--max-jobs`` run at once, the rest queue; ``GET /api/jobs/{id}`` reports state, progress and
  queue position.

Safe by default (see :mod:`scdm.server.security`): it binds 127.0.0.1 and answers only to the host
names it knows; a token (required for any other address) protects every route; state-changing
requests must be JSON from this origin; the page runs under a strict Content-Security-Policy.

Layout: ``app`` (the FastAPI app, errors, :func:`serve`), ``routes``, ``models`` (request and
response schemas), ``jobs``, ``security``, ``config``, ``templates/``, ``static/``. The command is
``scdm serve`` (scdm/cli.py).
"""

from scdm.server.app import create_app, serve
from scdm.server.config import ServerConfig

__all__ = ["create_app", "serve", "ServerConfig"]
