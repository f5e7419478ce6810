"""Thin Ray Serve deployments: a family's models, their batch queues and the front door in one replica."""
