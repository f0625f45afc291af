"""The run-dir file the metrics sinks append to and the plots read: one name, imported by both."""

METRICS_FILE = "metrics.jsonl"
