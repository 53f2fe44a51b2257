"""``python -m echo_client``."""

from echo_client.main import main

main()
