"""The ping client: a round-trip probe through the broker, in the manner of ping(8)."""
