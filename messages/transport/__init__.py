"""The transport: the ``Broker`` interface, ``connect()`` by URL scheme, the in-memory and
RabbitMQ brokers, TLS, the chunking broker, the federation's topology and the reconnect
supervisor. Imports the wire, never daemon plumbing; only ``rabbitmq`` imports pika."""
