"""The trainer service, runnable without torch: the model store, the registry of agents and jobs, the on-disk
quarantine, the ZeroMQ collector, the gRPC model service, the repair job runner, ``serve`` (the wiring) and the
``fleet`` operator commands."""
