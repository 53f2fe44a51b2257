"""The echo client: republishes every ping, byte for byte, on the pong topic."""
