"""``make cluster``: our two clients across a two-node RabbitMQ cluster, under supervisord.

ping_client talks to node 1 and echo_client to node 2, so every round trip crosses the cluster.
See docs/cluster.md.
"""
