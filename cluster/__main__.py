"""``python -m cluster``."""

from cluster.main import main

main()
