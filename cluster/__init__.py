"""Running things: the application config that composes every component's settings, the
``alignray`` command line, the recipes it runs (train, train-rm, eval, demo, report, serve),
Ray Jobs submission, and the cluster manifests.

Top layer: the only code that sees the whole config; nothing imports it.
"""
