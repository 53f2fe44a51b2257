"""``python -m broker``."""

from broker.main import main

main()
