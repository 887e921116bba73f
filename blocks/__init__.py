"""queuejob's Prefect blocks: configuration and secrets only, no workflow logic.

Register them with ``prefect block register -m queuejob.blocks`` (and prefect-kubernetes' own
blocks, used for the cluster, with ``prefect block register -m prefect_kubernetes``).
"""

from queuejob.blocks.job_template import WorkQueueJobTemplate
from queuejob.blocks.rabbitmq import RabbitMQBroker

__all__ = ["RabbitMQBroker", "WorkQueueJobTemplate"]
