"""``python -m broker``."""

from broker.deferred import import_amqtt

# First, before anything else imports amqtt: see broker/deferred.py.
import_amqtt()

from broker.main import main  # noqa: E402

main()
