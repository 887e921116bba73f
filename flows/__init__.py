"""queuejob: fan a batch of work items out through RabbitMQ to a Kubernetes Job, as a Prefect flow.

Layers, each importing only those below it (checked by import-linter in ``make lint``):
`flows.cli` and the flows (`flows.work_queue`, `flows.rerun`) over `flows.tasks` and
`flows.monitor`, over `flows.adapters` (I/O, no Prefect), over `flows.core` (pure logic).
`flows.worker` is the pod program. ARCHITECTURE.md in the repository is the map.
"""
