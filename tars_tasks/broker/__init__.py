"""TARS's side of the Redis broker: the kombu transport workers and producers use, leases on
the messages a worker holds, and the fleet-wide admission bound."""
