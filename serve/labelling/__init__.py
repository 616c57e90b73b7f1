"""The labelling app: people (or a simulated annotator) compare two responses on several criteria.

- :mod:`serve.labelling.settings`: ``FeedbackSettings``, the ``feedback`` section.
- :mod:`serve.labelling.store`: annotators, items, slots and labels behind SQLAlchemy (SQLite in
  WAL mode by default, any SQLAlchemy URL such as PostgreSQL); export and agreement statistics.
- :mod:`serve.labelling.candidates`: where items come from (the policy deployment through a
  handle, or a Parquet file of candidate pairs).
- :mod:`serve.labelling.app`: the Ray Serve deployment (annotator page, admin page, JSON API).
- :mod:`serve.labelling.client` and :mod:`serve.labelling.simulated`: an HTTP client of that API
  and the simulated Bradley-Terry VADER annotator that labels through it, as a browser would.

Part of the ``serve`` layer: imports ``envs``, never ``cluster``.
"""
