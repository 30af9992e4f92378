"""Processing: running mercure's processing modules over jobs in ``processing/``.

:mod:`.record` is the durable state of one job's processing (which step, which run, how it
ended), :mod:`.folders` prepares a module's folders and collects its results, :mod:`.results`
reads ``result.json`` with mercure's meaning, :mod:`.selection` picks the runner, and
:mod:`.job` drives one job through its steps. The ``processor`` service
(:mod:`mercure.services.processor`) claims the jobs.
"""
