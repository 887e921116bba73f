"""queuejob: fan a batch of work items out through RabbitMQ to a Kubernetes Job, as a Prefect flow.

Layers, each importing only those below it (checked by import-linter in ``make lint``):
`queuejob.flows.cli` and the flows (`queuejob.flows.work_queue`, `queuejob.flows.rerun`) over
`queuejob.flows.tasks` and `queuejob.flows.monitor`, over `queuejob.flows.adapters` (I/O, no
Prefect), over `queuejob.flows.core` (pure logic). `queuejob.flows.worker` is the pod program.
ARCHITECTURE.md in the repository is the map.
"""
