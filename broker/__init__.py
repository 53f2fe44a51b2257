"""The MQTT broker process: amqtt 0.12.1, run by our own runner."""
