"""Network faults for the integration tests: a TCP proxy between the layer and the broker."""
