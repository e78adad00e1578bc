"""Code both the agent and the server ship: the wire contract and small shared helpers."""

VERSION = "0.1.0"
