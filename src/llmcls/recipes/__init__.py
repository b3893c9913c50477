"""Recipes: one file per command, each reading top to bottom like the tutorial (prepare, train, evaluate,
predict, export, baseline, ``pipeline`` for ``llmcls run``, and ``plan`` for their ``--dry-run``). They put
together the components of the package (data, encode, collate, model, trainer, infer, metrics, rundir, reporting)."""
