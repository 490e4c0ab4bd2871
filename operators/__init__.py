"""Kubernetes operator (kopf) that scales predictor replicas on p99 latency."""
