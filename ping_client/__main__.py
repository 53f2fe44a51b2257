"""``python -m ping_client``."""

from ping_client.main import main

main()
