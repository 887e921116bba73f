"""Pure logic: no pika, kubernetes or prefect imports, no environment reads, no sleeps."""
