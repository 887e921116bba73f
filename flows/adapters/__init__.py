"""I/O only: each adapter translates its library's exceptions into queuejob.flows.core.errors.

Packages and modules: `broker` (RabbitMQ through pika), `kube` (the Kubernetes Job backend),
`local` (the local Job backend: pods as processes), `ledger_storage` (a run's files in a
Prefect filesystem block's location, through fsspec) and `ledger_store` (the run's ledger in
SQLite). None imports Prefect (import-linter checks it).
"""
