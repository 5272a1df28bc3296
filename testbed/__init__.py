"""What the tests, the soak and the scripts share, apart from the layer itself: extra RabbitMQ nodes
on this machine (a cluster, TLS listeners, RabbitMQ 4.x beside the system broker) and their
certificates (:mod:`testbed.brokers`), and a TCP proxy that injects faults (:mod:`testbed.faults`).
Not installed with the package."""
