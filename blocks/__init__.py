"""queuejob's Prefect blocks: configuration and secrets only, no workflow logic.

Register them with ``prefect block register -m blocks`` (and prefect-kubernetes' own blocks, used
for the cluster, with ``prefect block register -m prefect_kubernetes``).
"""

from blocks.job_template import WorkQueueJobTemplate
from blocks.rabbitmq import RabbitMQBroker

__all__ = ["RabbitMQBroker", "WorkQueueJobTemplate"]
