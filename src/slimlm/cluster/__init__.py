"""Past one machine: the single server's app driven in-process (asgi.py), prefix-aware routing
(routing.py) and serving replicas on Ray Serve (replicas.py). Offline batch jobs: slimlm.batch."""
