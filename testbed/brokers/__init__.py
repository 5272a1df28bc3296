"""Extra RabbitMQ nodes on this machine, for the cluster and TLS tests (see :mod:`.nodes`)."""
