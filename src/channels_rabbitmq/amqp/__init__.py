"""A small AMQP 0-9-1 client: :mod:`.frames` (codec), :mod:`.protocol` (state, no I/O),
:mod:`.connection` (the asyncio transport)."""
